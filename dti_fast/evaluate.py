"""The paper's metrics: DINOv2 subject similarity, SigLIP text fidelity, CLIP-I and CLIP-T.

Every scorer loads with transformers' ``from_pretrained`` from a hub id or a local folder
(model, image processor and, for the text metrics, tokenizer), on the PIL image-processing
backend (no torchvision needed):

- **Image** (subject similarity): DINOv2 CLS embedding (the first token of the last,
  layer-normed hidden state), cosine against every reference image of the subject
  (optionally background-masked), averaged over the references.
  Default ``facebook/dinov2-base``.
- **Text** (text fidelity): SigLIP's score of the image and the prompt with the placeholder
  replaced by the class noun, ``sigmoid(exp(logit_scale) * cos + logit_bias)``, text padded
  to the model's 64 tokens as SigLIP was trained. Default ``google/siglip-base-patch16-512``.
- **CLIP-T**: cosine of CLIP's projected image and text embeddings (same text).
- **CLIP-I**: cosine of CLIP's projected image embeddings, generated vs each reference,
  averaged. Default ``openai/clip-vit-base-patch32``.
- **Content** (style concepts only, with the Text metric): SigLIP's score of the image and
  the prompt's content part alone ("a lighthouse" of "a lighthouse in <style> style"): does
  the style token leave the rest of the prompt its say.

For a style concept the references are the style's images, so Image and CLIP-I measure
style similarity, and Text / CLIP-T score the whole prompt with the style's class words in
place of its placeholder ("a lighthouse in watercolor painting style"), as the authors'
style evaluation does (kunheek/dti ``scripts/eval_style.py``: DINOv2 cosine to the style
images, CLIP cosine to the prompt with the class words).

Aggregation (:func:`aggregate`): per image as above, the mean over a subject's images
(prompts x seeds) per subject, then the mean over subjects per method.

:mod:`dti_fast.testing.metric_models` has tiny random-weight stand-ins for tests and
``suite --quick``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .io import first_line

__all__ = [
    "DEFAULT_MODELS",
    "METRICS",
    "METRIC_LABELS",
    "ClipScorer",
    "DinoScorer",
    "Evaluator",
    "SiglipScorer",
    "aggregate",
    "apply_mask",
    "evaluate_generated",
    "load_references",
]

DEFAULT_MODELS = {
    "dino": "facebook/dinov2-base",
    "siglip": "google/siglip-base-patch16-512",
    "clip": "openai/clip-vit-base-patch32",
}
#: Metric keys in the order of the report's table.
METRICS = ("image", "text", "clip_i", "clip_t")
METRIC_LABELS = {
    "image": "Image (DINOv2)",
    "text": "Text (SigLIP)",
    "clip_i": "CLIP-I",
    "clip_t": "CLIP-T",
    "content": "Content (SigLIP)",
}


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _transformers_major() -> int:
    import transformers

    return int(re.findall(r"\d+", transformers.__version__)[0])


def _source(model: str | Path, what: str) -> tuple[str, dict[str, Any]]:
    """Where from_pretrained loads ``model`` from, with local_files_only when the hub cannot be used."""
    from .models import hub_reachable, looks_like_path, offline_by_env

    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{what} model folder {path} has no config.json; pass a folder written by "
                "save_pretrained (model, preprocessor_config.json, tokenizer files)"
            )
        return str(path), {"local_files_only": True}
    if path.exists():
        raise ValueError(f"{what} model {text} is a file; pass a model folder or a hub id")
    if looks_like_path(text):
        raise FileNotFoundError(
            f"{what} model folder {text} does not exist; pass a folder or a hub id such as "
            f"{DEFAULT_MODELS.get(what, 'org/name')}"
        )
    offline = offline_by_env() or not hub_reachable()
    return text, ({"local_files_only": True} if offline else {})


def _load_error(what: str, model: str, err: Exception) -> Exception:
    return FileNotFoundError(
        f"{what} model {model!r} could not be loaded ({type(err).__name__}: {first_line(err)}). "
        f"If it is a hub id, this machine may be offline and the model not in the Hugging Face cache: download it "
        f"where there is network (`hf download {model}`) and pass the folder (--{what}-model FOLDER)"
    )


def load_image_processor(src: str, **kw):
    """``AutoImageProcessor`` on the PIL backend (works without torchvision)."""
    from transformers import AutoImageProcessor

    extra = {"backend": "pil"} if _transformers_major() >= 5 else {"use_fast": False}
    try:
        return AutoImageProcessor.from_pretrained(src, **extra, **kw)
    except TypeError:  # an older transformers without the keyword
        return AutoImageProcessor.from_pretrained(src, **kw)


def _load_parts(what: str, model: str | Path, device: torch.device, need_text: bool, tokenizer=None):
    from transformers import AutoModel, AutoTokenizer

    src, kw = _source(model, what)
    try:
        net = AutoModel.from_pretrained(src, **kw)
        processor = load_image_processor(src, **kw)
    except (OSError, ValueError) as err:
        raise _load_error(what, str(model), err) from None
    if need_text and tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(src, **kw)
        except ImportError as err:
            raise ImportError(
                f"the {what} tokenizer of {model} needs {err.name or 'a missing package'}: "
                "pip install sentencepiece protobuf"
            ) from err
        except (OSError, ValueError) as err:
            msg = str(err)
            if "sentencepiece" in msg.lower() or "protobuf" in msg.lower():
                raise ImportError(
                    f"the {what} tokenizer of {model} needs sentencepiece and protobuf: "
                    "pip install sentencepiece protobuf"
                ) from err
            raise _load_error(what, str(model), err) from None
    net.eval().requires_grad_(False).to(device)
    return net, processor, tokenizer


def _device(device: str | torch.device) -> torch.device:
    from .models import resolve_device

    return resolve_device(device)


def _pooled(out) -> torch.Tensor:
    """Features from get_*_features: a tensor (transformers 4) or an output's pooler_output (5)."""
    if torch.is_tensor(out):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        raise ValueError("the model's get_*_features returned no pooled features")
    return pooled


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def _rgb(images: Sequence) -> list:
    return [im.convert("RGB") for im in images]


class _Scorer:
    what = "?"
    need_text = False

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        device: str | torch.device = "auto",
        batch_size: int = 16,
        tokenizer=None,
    ) -> None:
        self.name = os.fspath(model) if model is not None else DEFAULT_MODELS[self.what]
        self.device = _device(device)
        self.batch_size = batch_size
        self.model, self.processor, self.tokenizer = _load_parts(
            self.what, self.name, self.device, self.need_text, tokenizer
        )
        self._check()

    def _check(self) -> None:
        pass

    def _pixels(self, images: Sequence) -> torch.Tensor:
        return self.processor(images=_rgb(images), return_tensors="pt")["pixel_values"].to(self.device)

    @torch.inference_mode()
    def _batched(self, items: Sequence, fn) -> torch.Tensor:
        if not len(items):
            return torch.zeros(0)
        return torch.cat(
            [fn(items[i : i + self.batch_size]).float().cpu() for i in range(0, len(items), self.batch_size)]
        )


class DinoScorer(_Scorer):
    """DINOv2 subject similarity: CLS-token cosine."""

    what = "dino"

    def _check(self) -> None:
        if hasattr(self.model, "get_text_features"):
            raise ValueError(
                f"dino model {self.name} is a {type(self.model).__name__} (an image-text model); pass a "
                "DINOv2 model, e.g. facebook/dinov2-base"
            )

    def image_features(self, images: Sequence) -> torch.Tensor:
        """Unit CLS embeddings ``(N, D)``."""
        return self._batched(
            images, lambda b: _normalize(self.model(pixel_values=self._pixels(b)).last_hidden_state[:, 0])
        )

    def similarity(self, images: Sequence, references: Sequence) -> torch.Tensor:
        """Per image: mean cosine to the references ``(N,)``."""
        if not references:
            raise ValueError("subject similarity needs at least one reference image")
        return (self.image_features(images) @ self.image_features(references).T).mean(dim=1)


class SiglipScorer(_Scorer):
    """SigLIP text fidelity: ``sigmoid(exp(logit_scale) * cos + logit_bias)``."""

    what = "siglip"
    need_text = True

    def _check(self) -> None:
        if not (hasattr(self.model, "get_text_features") and hasattr(self.model, "logit_bias")):
            raise ValueError(
                f"siglip model {self.name} is a {type(self.model).__name__}, not a SigLIP model; pass "
                "e.g. google/siglip-base-patch16-512"
            )
        cfg = getattr(self.model.config, "text_config", None)
        self.max_length = int(getattr(cfg, "max_position_embeddings", 64) or 64)

    def image_features(self, images: Sequence) -> torch.Tensor:
        return self._batched(
            images, lambda b: _normalize(_pooled(self.model.get_image_features(pixel_values=self._pixels(b))))
        )

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        def run(batch):
            # SigLIP was trained on text padded to max_length (64); its scores assume it.
            enc = self.tokenizer(
                list(batch), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
            )
            return _normalize(_pooled(self.model.get_text_features(input_ids=enc["input_ids"].to(self.device))))

        return self._batched(list(texts), run)

    def score(self, images: Sequence, texts: Sequence[str]) -> torch.Tensor:
        """Per image, its score against its own text ``(N,)``."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts; give one text per image")
        cos = (self.image_features(images) * self.text_features(texts)).sum(-1)
        scale = float(self.model.logit_scale.detach().float().exp())
        bias = float(self.model.logit_bias.detach().float())
        return torch.sigmoid(cos * scale + bias)


class ClipScorer(_Scorer):
    """CLIP-T (image-text cosine) and CLIP-I (image-image cosine) with projected embeddings."""

    what = "clip"
    need_text = True

    def _check(self) -> None:
        if not (hasattr(self.model, "get_text_features") and hasattr(self.model, "visual_projection")):
            raise ValueError(
                f"clip model {self.name} is a {type(self.model).__name__}, not a CLIP model; pass e.g. "
                "openai/clip-vit-base-patch32"
            )

    def image_features(self, images: Sequence) -> torch.Tensor:
        return self._batched(
            images, lambda b: _normalize(_pooled(self.model.get_image_features(pixel_values=self._pixels(b))))
        )

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        def run(batch):
            enc = self.tokenizer(list(batch), padding=True, truncation=True, max_length=77, return_tensors="pt")
            return _normalize(
                _pooled(
                    self.model.get_text_features(
                        input_ids=enc["input_ids"].to(self.device), attention_mask=enc["attention_mask"].to(self.device)
                    )
                )
            )

        return self._batched(list(texts), run)

    def clip_t(self, images: Sequence, texts: Sequence[str]) -> torch.Tensor:
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts; give one text per image")
        return (self.image_features(images) * self.text_features(texts)).sum(-1)

    def clip_i(self, images: Sequence, references: Sequence) -> torch.Tensor:
        if not references:
            raise ValueError("CLIP-I needs at least one reference image")
        return (self.image_features(images) @ self.image_features(references).T).mean(dim=1)


# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------


def apply_mask(image, mask, fill=(0, 0, 0)):
    """``image`` with the pixels outside ``mask`` (mask <= 127: background) set to ``fill``."""
    from PIL import Image

    image = image.convert("RGB")
    m = mask.convert("L").resize(image.size, Image.Resampling.NEAREST).point(lambda v: 255 if v > 127 else 0)
    background = Image.new("RGB", image.size, fill)
    return Image.composite(image, background, m)


def load_references(folder: str | Path, masks: str | Path | None = None, fill=(0, 0, 0)) -> list:
    """The reference photos of a subject; with ``masks`` (a folder of one mask per photo, same file
    stem, white = subject) each photo's background is set to ``fill``."""
    from PIL import Image

    from .data import IMAGE_SUFFIXES, load_rgb

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"reference folder {folder} does not exist; pass the subject's photo folder")
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
    if not files:
        raise ValueError(f"reference folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
    images = [load_rgb(p) for p in files]
    if masks is None:
        return images
    masks = Path(masks)
    out = []
    for p, im in zip(files, images):
        found = [m for m in (masks / (p.stem + s) for s in (".png",) + IMAGE_SUFFIXES) if m.is_file()]
        if not found:
            raise FileNotFoundError(
                f"no mask for reference {p} in {masks} (expected {masks / (p.stem + '.png')}, "
                "white = subject); add it or run without masks"
            )
        with Image.open(found[0]) as m:
            out.append(apply_mask(im, m, fill))
    return out


# --------------------------------------------------------------------------------------------
# Evaluation and aggregation
# --------------------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else float("nan")


def aggregate(per_image: dict[str, dict[str, Sequence[float]]]) -> dict[str, Any]:
    """``{subject: {metric: [per-image scores]}}`` -> per-subject means and their mean over subjects.

    Returns ``{"subjects": {subject: {metric: mean}}, "mean": {metric: mean over subjects},
    "images": {subject: n_images}}``: every subject weighs the same, whatever its image count.
    """
    subjects = {s: {m: _mean(v) for m, v in metrics.items()} for s, metrics in per_image.items()}
    names = [m for m in METRICS if any(m in v for v in subjects.values())]
    names += sorted({m for v in subjects.values() for m in v} - set(names))
    mean = {m: _mean([v[m] for v in subjects.values() if m in v]) for m in names}
    images = {s: max((len(v) for v in metrics.values()), default=0) for s, metrics in per_image.items()}
    return {"subjects": subjects, "mean": mean, "images": images}


@dataclass
class Evaluator:
    """The metric models, loaded on first use. ``metrics`` picks which of :data:`METRICS` to compute.

    ``siglip_tokenizer``/``clip_tokenizer`` replace the models' own tokenizers (tests only: a
    tiny random SigLIP without sentencepiece).
    """

    dino: str | Path | None = None
    siglip: str | Path | None = None
    clip: str | Path | None = None
    device: str = "auto"
    batch_size: int = 16
    metrics: Sequence[str] = METRICS
    siglip_tokenizer: Any = None
    clip_tokenizer: Any = None
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        unknown = set(self.metrics) - set(METRICS)
        if unknown:
            raise ValueError(f"unknown metric(s) {', '.join(sorted(unknown))}; choose from {', '.join(METRICS)}")

    def _get(self, kind: str):
        if kind not in self._cache:
            cls = {"dino": DinoScorer, "siglip": SiglipScorer, "clip": ClipScorer}[kind]
            kw: dict[str, Any] = {"device": self.device, "batch_size": self.batch_size}
            tok = {"siglip": self.siglip_tokenizer, "clip": self.clip_tokenizer}.get(kind)
            if tok is not None:
                kw["tokenizer"] = tok
            self._cache[kind] = cls(getattr(self, kind), **kw)
        return self._cache[kind]

    def model_names(self) -> dict[str, str]:
        used = {
            "dino": "image" in self.metrics,
            "siglip": "text" in self.metrics,
            "clip": bool({"clip_i", "clip_t"} & set(self.metrics)),
        }
        return {k: os.fspath(getattr(self, k) or DEFAULT_MODELS[k]) for k, on in used.items() if on}

    def score(
        self,
        images: Sequence,
        texts: Sequence[str],
        references: Sequence,
        content: Sequence[str] | None = None,
    ) -> dict[str, list[float]]:
        """Per-image scores of one subject's images: ``{metric: [score per image]}``.

        ``content`` (one text per image): also the "content" score, SigLIP against that text, when the
        Text metric is on.
        """
        out: dict[str, list[float]] = {}
        if "image" in self.metrics:
            out["image"] = self._get("dino").similarity(images, references).tolist()
        if "text" in self.metrics:
            out["text"] = self._get("siglip").score(images, texts).tolist()
            if content is not None:
                out["content"] = self._get("siglip").score(images, content).tolist()
        if "clip_t" in self.metrics:
            out["clip_t"] = self._get("clip").clip_t(images, texts).tolist()
        if "clip_i" in self.metrics:
            out["clip_i"] = self._get("clip").clip_i(images, references).tolist()
        return out


def evaluate_generated(
    generated: str | Path,
    references: dict[str, str | Path | Sequence],
    evaluator: Evaluator,
    masks: dict[str, str | Path] | None = None,
    concepts: Sequence[str] | None = None,
    content: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Score a folder written by :func:`dti_fast.generate.generate` against each concept's references.

    ``references`` maps a concept name to its photo folder (or a list of PIL images);
    ``masks`` optionally a concept name to its mask folder; ``concepts`` limits the scoring to
    those concepts of the folder; ``content`` maps a prompt template (``{}`` = the concept) to
    its content text, scored as "content" (every scored prompt needs one). Returns
    :func:`aggregate`'s result plus ``"per_image"``: one entry per image (subject, file, prompt,
    ``scored_text``, ``content_text`` with ``content``, seed, and the scores by metric name).
    """
    from PIL import Image

    from .generate import read_manifest

    generated = Path(generated)
    records = read_manifest(generated)
    by_subject: dict[str, list] = {}
    for r in records:
        if r.concept is None or (concepts is not None and r.concept not in concepts):
            continue
        by_subject.setdefault(r.concept, []).append(r)
    if content is not None:
        lacking = sorted({r.prompt for recs in by_subject.values() for r in recs} - set(content))
        if lacking:
            raise ValueError(f"no content text for prompt(s) {', '.join(map(repr, lacking[:3]))}")
    missing = sorted(set(by_subject) - set(references))
    if missing:
        raise ValueError(f"no reference images for concept(s) {', '.join(missing)}; map each to its photo folder")
    per_image_scores: dict[str, dict[str, list[float]]] = {}
    rows = []
    for subject, recs in by_subject.items():
        ref = references[subject]
        refs = ref if isinstance(ref, (list, tuple)) else load_references(ref, (masks or {}).get(subject))
        images = []
        for r in recs:
            path = generated / r.file
            if not path.is_file():
                raise FileNotFoundError(f"generated image {path} is missing; rerun the generation")
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        contents = [content[r.prompt] for r in recs] if content is not None else None
        scores = evaluator.score(images, [r.text for r in recs], refs, content=contents)
        per_image_scores[subject] = scores
        for k, r in enumerate(recs):
            rows.append(
                {
                    "subject": subject,
                    "file": r.file,
                    "prompt": r.prompt,
                    # "text" is the Text score below; the text it scored is "scored_text".
                    "scored_text": r.text,
                    **({"content_text": content[r.prompt]} if content is not None else {}),
                    "seed": r.seed,
                    **{m: v[k] for m, v in scores.items()},
                }
            )
    result = aggregate(per_image_scores)
    result["per_image"] = rows
    result["models"] = evaluator.model_names()
    return result

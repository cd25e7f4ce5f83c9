"""Tiny random-weight DINOv2, SigLIP and CLIP models for tests and ``dti-fast suite --quick``.

Real architectures, shrunk (hidden size 32, 2 layers, 32-56 px images), with
processor and tokenizer files, so :mod:`dti_fast.evaluate` runs end to end
without downloads. Their scores exercise the code path and mean nothing;
:func:`is_tiny_metric_model` lets a report say so.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..models import build_once

__all__ = ["TINY_METRICS_VERSION", "is_tiny_metric_model", "make_tiny_metric_models", "tiny_metric_models_path"]

TINY_METRICS_VERSION = 1

_TINY_README = (
    "Tiny RANDOM-WEIGHT {kind} model written by dti_fast.testing.make_tiny_metric_models for tests and\n"
    "`dti-fast suite --quick`. The architecture is the real one, shrunk; the weights are random, so its\n"
    "scores exercise the code path and mean nothing.\n"
)


def _tiny_corpus() -> list[str]:
    from importlib import resources

    root = Path(str(resources.files("dti_fast") / "assets"))
    lines = []
    try:
        prompts = json.loads((root / "eval_prompts.json").read_text(encoding="utf-8"))["prompt_sets"]
        subjects = json.loads((root / "dreambooth_subjects.json").read_text(encoding="utf-8"))["subjects"]
        nouns = sorted({v["class"] for v in subjects.values()} | {v["initialization"] for v in subjects.values()})
        for kinds in prompts.values():
            for plist in kinds.values():
                for p in plist:
                    lines += [p.replace("{}", n) for n in nouns[:6]]
        lines += [f"a photo of a {n}" for n in nouns]
    except (OSError, KeyError, ValueError):
        lines = ["a photo of a dog", "a cat in the snow", "a red backpack on the beach"]
    return lines


def _tiny_siglip_tokenizer(folder: Path, max_length: int):
    """A SigLIP sentencepiece tokenizer trained on the shipped prompts, or (without sentencepiece and
    protobuf) CLIP's BPE tokenizer as a stand-in. Returns the saved tokenizer."""
    import io

    try:
        import google.protobuf  # noqa: F401  (SiglipTokenizer requires it)
        import sentencepiece as spm
        from transformers import SiglipTokenizer
    except ImportError:
        from .tiny import clip_tokenizer

        tok = clip_tokenizer(pad_token="<|endoftext|>")
        tok.model_max_length = max_length
        tok.save_pretrained(str(folder))
        return tok
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_tiny_corpus()),
        model_writer=buf,
        vocab_size=400,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        hard_vocab_limit=False,
        minloglevel=2,
        character_coverage=1.0,
    )
    (folder / "spiece.model").write_bytes(buf.getvalue())
    tok = SiglipTokenizer(vocab_file=str(folder / "spiece.model"), model_max_length=max_length)
    tok.save_pretrained(str(folder))
    return tok


class _QuietTransformers:
    """transformers' logger at ERROR while the tiny configs (with off-vocabulary default ids) are built."""

    def __enter__(self):
        from transformers.utils import logging as tlog

        self._tlog = tlog
        self._level = tlog.get_verbosity()
        tlog.set_verbosity_error()
        return self

    def __exit__(self, *exc):
        self._tlog.set_verbosity(self._level)
        return False


def make_tiny_metric_models(folder: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write tiny random-weight DINOv2, SigLIP and CLIP models (real architectures, hidden size 32,
    2 layers, 32-56 px images) with processor and tokenizer files; returns ``{kind: folder}``."""
    with _QuietTransformers():
        return _make_tiny_metric_models(Path(folder), seed)


def _make_tiny_metric_models(folder: Path, seed: int) -> dict[str, Path]:
    from transformers import (
        BitImageProcessorPil,
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPModel,
        Dinov2Config,
        Dinov2Model,
        SiglipConfig,
        SiglipImageProcessorPil,
        SiglipModel,
    )

    from .tiny import clip_tokenizer

    root = Path(folder)
    out = {k: root / k for k in ("dino", "siglip", "clip")}
    for p in out.values():
        p.mkdir(parents=True, exist_ok=True)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dino = Dinov2Model(Dinov2Config(**small, image_size=56, patch_size=14))
        dino.save_pretrained(str(out["dino"]))
        BitImageProcessorPil(
            size={"shortest_edge": 64},
            crop_size={"height": 56, "width": 56},
            do_center_crop=True,
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
            do_convert_rgb=True,
        ).save_pretrained(str(out["dino"]))

        sig_len = 16
        stok = _tiny_siglip_tokenizer(out["siglip"], sig_len)
        pad = stok.pad_token_id if stok.pad_token_id is not None else 0
        text = dict(
            small,
            vocab_size=len(stok),
            max_position_embeddings=sig_len,
            pad_token_id=pad,
            bos_token_id=pad,
            eos_token_id=stok.eos_token_id if stok.eos_token_id is not None else pad,
        )
        vision = dict(small, image_size=32, patch_size=8)
        siglip = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        with torch.no_grad():  # scale 10, bias 0: random scores spread around 0.5 instead of ~0
            siglip.logit_scale.fill_(math.log(10.0))
            siglip.logit_bias.fill_(0.0)
        siglip.save_pretrained(str(out["siglip"]))
        SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(str(out["siglip"]))

        ctok = clip_tokenizer(pad_token="<|endoftext|>")
        clip_text = dict(
            small,
            vocab_size=len(ctok),
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            projection_dim=32,
        )
        clip = CLIPModel(
            CLIPConfig(text_config=clip_text, vision_config=dict(small, image_size=32, patch_size=8), projection_dim=32)
        )
        clip.save_pretrained(str(out["clip"]))
        ctok.save_pretrained(str(out["clip"]))
        CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
            str(out["clip"])
        )
    for kind, p in out.items():
        (p / "README.txt").write_text(_TINY_README.format(kind=kind), encoding="utf-8")
    (root / "tiny_metric_models.json").write_text(
        json.dumps(
            {
                "version": TINY_METRICS_VERSION,
                "random_weights": True,
                "seed": seed,
                "siglip_tokenizer": type(stok).__name__,
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    return out


def tiny_metric_models_path(cache_dir: str | Path | None = None) -> dict[str, Path]:
    """The cached tiny metric models (built once, atomically) under ``<cache>/tiny-metrics-v<N>/``."""
    final = build_once(
        f"tiny-metrics-v{TINY_METRICS_VERSION}", "tiny_metric_models.json", make_tiny_metric_models, cache_dir
    )
    return {k: final / k for k in ("dino", "siglip", "clip")}


def is_tiny_metric_model(folder: str | Path | None) -> bool:
    """True for a folder written by :func:`make_tiny_metric_models` (random weights)."""
    return (
        folder is not None
        and (Path(folder) / "README.txt").is_file()
        and "RANDOM-WEIGHT" in (Path(folder) / "README.txt").read_text(encoding="utf-8", errors="replace")
    )

"""Generating images with learned concepts: a diffusers pipeline with the embeddings loaded.

:func:`load_pipeline` builds ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` /
``SanaPipeline`` / ``WanPipeline`` with ``from_pretrained`` from a model folder or hub id
(validated by :mod:`dti_fast.models` first), and :func:`dti_fast.concept_files.load_concepts`
loads concepts into it (SD/SDXL with diffusers' own ``pipe.load_textual_inversion``, once per
text encoder; SANA/Wan with dti_fast's own embedding), after checking that every vector's
size matches its text encoder. :func:`render` runs any of the four pipelines (Wan: one
frame per prompt, as an image). :func:`generate` runs prompts x seeds in batches (one
CPU generator per image, so an image depends on its seed only, not on the batch it ran in),
writes PNGs, a manifest and a contact sheet per concept, and skips images already on disk.

In a prompt, ``{}`` stands for the concept: its placeholder in the text the model sees, its
class noun in the text the metrics score (:func:`scoring_text`).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .concept_files import ConceptEmbeddings, load_concepts, read_concept, unload_concepts
from .io import atomic_write, write_json

__all__ = [
    "GenerateResult",
    "ImageRecord",
    "SCHEDULERS",
    "expand_prompts",
    "generate",
    "load_pipeline",
    "prompt_word",
    "render",
    "scoring_text",
]

SCHEDULERS = ("auto", "model", "ddim", "euler", "dpm", "pndm")
MANIFEST = "images.json"
#: The most images one call makes (concepts x prompts x seeds): more is a typo, or days of sampling.
MAX_IMAGES = 100_000


# --------------------------------------------------------------------------------------------
# Reading concepts
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """``auto``: cuda if available; bf16 on a GPU, fp32 on the CPU (:func:`dti_fast.models.resolve_device`)."""
    from .models import resolve_device, resolve_dtype

    dev = resolve_device(device)
    return dev, resolve_dtype(dtype, dev)


def _set_scheduler(pipe, scheduler: str) -> None:
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler

    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
    current = type(pipe.scheduler).__name__
    if scheduler == "model" or (scheduler == "auto" and current != "DDPMScheduler"):
        return
    cls = {
        "auto": DDIMScheduler,
        "ddim": DDIMScheduler,
        "euler": EulerDiscreteScheduler,
        "dpm": DPMSolverMultistepScheduler,
        "pndm": PNDMScheduler,
    }[scheduler]
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


def load_pipeline(
    model: str | Path, *, device: str = "auto", dtype: str = "auto", scheduler: str = "auto", progress: bool = False
):
    """A diffusers text-to-image pipeline of ``model`` (SD 1.x/2.x or SDXL folder or hub id), on ``device``.

    ``scheduler``: "auto" keeps the model's scheduler unless it is the training DDPM one (then
    DDIM), "model" keeps it always, or one of ddim, euler, dpm (DPM-Solver++), pndm.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from .models import model_load_errors, probe_tokenizer, resolve_source

    r = resolve_source(str(model), None, None)
    dev, dt = resolve_device_dtype(device, dtype)
    kwargs: dict[str, Any] = dict(r.hub_kwargs, torch_dtype=dt)
    if r.local:
        kwargs["local_files_only"] = True
    from diffusers.utils import logging as dlog

    bars_were_off = not dlog.is_progress_bar_enabled()
    if not progress:
        dlog.disable_progress_bar()  # diffusers' "Loading pipeline components" bar
    try:
        # A damaged or mismatched part (a UNet config that does not fit its weights) is named in one
        # line, not with diffusers' advice about from_pretrained's arguments.
        with warnings.catch_warnings(), model_load_errors(r):
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)  # newer: dtype=
            if r.family in ("sana", "wan"):
                import diffusers

                cls = getattr(diffusers, "SanaPipeline" if r.family == "sana" else "WanPipeline")
                if r.family == "wan" and dt != torch.float32:  # Wan's VAE runs in fp32, as its examples load it
                    kwargs["torch_dtype"] = {"default": dt, "vae": torch.float32}
                pipe = cls.from_pretrained(r.source, **kwargs)
            elif r.family == "sdxl":
                pipe = StableDiffusionXLPipeline.from_pretrained(r.source, **kwargs)
            else:
                pipe = StableDiffusionPipeline.from_pretrained(
                    r.source, safety_checker=None, requires_safety_checker=False, **kwargs
                )
    finally:
        if not progress and not bars_were_off:
            dlog.enable_progress_bar()
    if r.family in ("sana", "wan"):
        if scheduler not in ("auto", "model"):
            raise ValueError(
                f"scheduler {scheduler!r}: {r.family} models sample with their own flow-matching scheduler; "
                "use auto or model"
            )
    else:
        _set_scheduler(pipe, scheduler)
    for part in ("tokenizer", "tokenizer_2"):  # a tokenizer that loads but cannot tokenize: named now
        if getattr(pipe, part, None) is not None:
            probe_tokenizer(getattr(pipe, part), r.shown, part)
    pipe.to(dev)
    pipe.set_progress_bar_config(disable=not progress)
    pipe._dti_fast_model = r.shown  # for error messages
    index = {}
    if r.local:
        try:
            index = json.loads((Path(r.source) / "model_index.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            index = {}
    if index.get("_dti_fast_resolution"):
        pipe._dti_fast_resolution = int(index["_dti_fast_resolution"])  # the tiny models' native size
    return pipe


def default_size(pipe) -> int:
    """The pipeline's native square size in pixels (SANA: sample_size x VAE factor; Wan: 480)."""
    if getattr(pipe, "_dti_fast_resolution", None):
        return int(pipe._dti_fast_resolution)
    from .concept_files import pipeline_family

    fam = pipeline_family(pipe)
    if fam == "wan":
        return 480
    model = pipe.transformer if fam == "sana" else pipe.unet
    size = model.config.sample_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return int(size) * int(pipe.vae_scale_factor)


def render(
    pipe,
    prompts: Sequence[str],
    generators: Sequence[torch.Generator] | torch.Generator,
    *,
    steps: int,
    guidance: float | None = None,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: Sequence[str] | None = None,
) -> list:
    """Run any of the four families' pipelines on ``prompts``; returns one PIL image per prompt.

    SANA: no resolution binning (the size asked for is the size made) and no
    complex-human-instruction prefix (training runs without it). Wan: one frame per prompt
    (``num_frames=1``), returned as an image. ``guidance`` None keeps the pipeline's default.
    """
    from PIL import Image

    from .concept_files import pipeline_family

    fam = pipeline_family(pipe)
    kwargs: dict[str, Any] = {"num_inference_steps": steps, "generator": generators}
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    if negative_prompt:
        kwargs["negative_prompt"] = list(negative_prompt)
    if fam in ("sana", "wan"):
        side = default_size(pipe)
        kwargs["height"], kwargs["width"] = height or side, width or side
    else:
        kwargs["height"], kwargs["width"] = height, width
    if fam == "sana":
        kwargs.update(use_resolution_binning=False, complex_human_instruction=None)
    if fam == "wan":
        frames = pipe(prompt=list(prompts), num_frames=1, output_type="np", **kwargs).frames
        return [Image.fromarray((f[0].clip(0, 1) * 255).round().astype("uint8")) for f in frames]
    return list(pipe(prompt=list(prompts), **kwargs).images)


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def prompt_word(concept: ConceptEmbeddings) -> str:
    """What stands for ``concept`` in a prompt: its placeholder (SD/SDXL pipelines expand a multi-vector
    one), or all of its tokens for SANA/Wan, whose pipelines do not."""
    from .concept_files import DIFFUSERS_ONLY_FAMILIES

    return concept.prompt_string if concept.family in DIFFUSERS_ONLY_FAMILIES else concept.placeholder


def scoring_text(prompt: str, class_noun: str | None, placeholders: Sequence[str] = ()) -> str:
    """The prompt as the metrics see it: ``{}`` and the placeholder tokens replaced by the class noun."""
    noun = class_noun or "object"
    text = prompt.replace("{}", noun)
    for p in sorted(placeholders, key=len, reverse=True):
        # "<x>", or a multi-vector concept written out as "<x> <x>_1 <x>_2": one noun.
        text = re.sub(re.escape(p) + r"(?:_\d+)?(?:\s+" + re.escape(p) + r"_\d+)*", lambda m: noun, text)
    return text


@dataclass
class ImageRecord:
    """One image to make: concept, prompt (``{}`` = subject), seed, where it goes."""

    concept: str | None
    prompt_index: int
    prompt: str  # the template, {} = the subject
    prompt_text: str  # what the pipeline gets
    text: str  # what the text metrics get (class noun instead of the placeholder)
    seed: int
    file: str  # relative to the output folder

    def to_json(self) -> dict:
        return dict(self.__dict__)


def expand_prompts(
    prompts: Sequence[str] | Mapping[str, Sequence[str]], concepts: Sequence[ConceptEmbeddings], seeds: Sequence[int]
) -> list[ImageRecord]:
    """Prompts x seeds per concept: a prompt with ``{}`` runs once per concept, one without once alone.

    ``prompts`` may also map each concept's name to its own prompt list (e.g. DreamBooth's
    object and live prompt sets); every prompt of such a list needs ``{}``.
    """
    if isinstance(prompts, Mapping):
        missing = [c.name for c in concepts if c.name not in prompts]
        if missing:
            raise ValueError(f"no prompts for concept(s) {', '.join(missing)}; give every concept a prompt list")
        records = []
        for c in concepts:
            for rec in expand_prompts(list(prompts[c.name]), [c], seeds):
                if rec.concept is None:
                    raise ValueError(f"prompt {rec.prompt!r} of concept {c.name!r} has no {{}} for the concept")
                records.append(rec)
        return records
    records: list[ImageRecord] = []
    placeholders = [c.placeholder for c in concepts]
    for i, prompt in enumerate(prompts):
        if "{}" in prompt:
            if not concepts:
                raise ValueError(f"prompt {prompt!r} has {{}} for a concept but no concept was given; pass --concept")
            targets = [
                (c.name, prompt.replace("{}", prompt_word(c)), scoring_text(prompt, c.class_noun)) for c in concepts
            ]
        else:
            owner = next((c for c in concepts if c.placeholder in prompt), None)
            noun = owner.class_noun if owner else None
            targets = [(None, prompt, scoring_text(prompt, noun, placeholders))]
        for name, text_in, text_scored in targets:
            for seed in seeds:
                folder = name if name is not None else "prompts"
                records.append(
                    ImageRecord(name, i, prompt, text_in, text_scored, int(seed), f"{folder}/p{i:03d}_s{int(seed)}.png")
                )
    return records


# --------------------------------------------------------------------------------------------
# Generating
# --------------------------------------------------------------------------------------------


def concept_digest(concept: ConceptEmbeddings) -> str:
    """A SHA-256 of a concept's placeholder and vectors: the same learned concept wherever its files lie."""
    import hashlib

    h = hashlib.sha256(concept.placeholder.encode("utf-8"))
    for v in concept.vectors:
        h.update(str(tuple(v.shape)).encode("ascii"))
        h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _run_differences(before: dict, now: dict) -> list[str]:
    """What differs between two runs' settings (``images.json``'s ``run``), one phrase each.

    A model recorded as None (a caller's own pipeline, unnamed) is not compared.
    """
    out = []
    for key in sorted(set(before) | set(now)):
        a, b = before.get(key), now.get(key)
        if key == "concepts":
            a, b = a or {}, b or {}
            out += [f"concept {n!r} has other vectors" for n in sorted(set(a) & set(b)) if a[n] != b[n]]
        elif key == "model" and None in (a, b):
            continue
        elif a != b:
            out.append(f"{key} {a!r} -> {b!r}")
    return out


@dataclass
class GenerateResult:
    output_dir: Path
    records: list[ImageRecord]
    grids: dict[str, Path]
    manifest: Path
    generated: int  # images made by this call (the rest were on disk already)


def generate(
    model: str | Path | None,
    concepts: Sequence[str | Path | ConceptEmbeddings],
    prompts: Sequence[str] | Mapping[str, Sequence[str]],
    output_dir: str | Path,
    *,
    seeds: Sequence[int] = (0,),
    steps: int = 30,
    guidance: float = 7.5,
    negative_prompt: str | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 4,
    device: str = "auto",
    dtype: str = "auto",
    scheduler: str = "auto",
    pipe=None,
    skip_existing: bool = True,
    grid: bool = True,
    progress: bool = False,
) -> GenerateResult:
    """Generate ``prompts`` x ``seeds`` for every concept (``{}`` = the concept) and write PNGs.

    ``prompts`` is one list for all concepts, or ``{concept name: prompts}``.

    ``model`` defaults to the first concept's training model (concept.json). A ready ``pipe``
    (from :func:`load_pipeline`) may be passed; the concepts are loaded into it and removed
    again at the end. Images already on disk are kept (``skip_existing``). Writes
    ``images.json`` (the records) and, with ``grid``, ``<concept>/grid.png``: prompts as rows,
    seeds as columns.
    """
    from PIL import Image

    from .io import check_output_folder
    from .plots import image_grid

    if not prompts:
        raise ValueError("no prompts: give at least one (use {} where the concept goes)")
    if not seeds:
        raise ValueError("no seeds: give at least one")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name, value in (("height", height), ("width", width)):
        if value is not None and (value <= 0 or value % 8):
            raise ValueError(f"--{name} must be a positive multiple of 8, got {value}")
    if not (isinstance(guidance, (int, float)) and guidance >= 0 and guidance < float("inf")):
        raise ValueError(f"--guidance must be a finite number >= 0, got {guidance!r}")
    loaded = [c if isinstance(c, ConceptEmbeddings) else read_concept(c) for c in concepts]
    names = [c.name for c in loaded]
    if len(set(names)) != len(names):
        raise ValueError(
            f"two concepts share the name {sorted(n for n in names if names.count(n) > 1)[0]!r} "
            "(their output folders would clash); rename one concept folder"
        )
    records = expand_prompts(prompts, loaded, seeds)
    if len(records) > MAX_IMAGES:
        raise ValueError(
            f"this run would make {len(records)} images (concepts x prompts x seeds), more than {MAX_IMAGES}; "
            "split it into several runs"
        )
    if loaded and not isinstance(prompts, Mapping):
        for prompt in dict.fromkeys(prompts):
            if "{}" not in prompt and not any(c.placeholder in prompt for c in loaded):
                warnings.warn(
                    f"prompt {prompt!r} has no {{}} and names no loaded concept: it is drawn without any "
                    "(write {} where the concept goes)",
                    stacklevel=2,
                )
    out = check_output_folder(output_dir, owner="dti-fast generate", marks=(MANIFEST,))
    if model is None and pipe is None:
        model = next((c.info.get("model") for c in loaded if c.info.get("model")), None)
    shown_model = str(model) if model is not None else getattr(pipe, "_dti_fast_model", None)
    if shown_model is not None and Path(shown_model).expanduser().exists():
        shown_model = str(Path(shown_model).expanduser().resolve())  # a folder, however it was typed
    for c in loaded:  # the right family but another model (SD 1.5 vs a fine-tune of it): it loads, warned
        trained_on = c.info.get("model")
        if isinstance(trained_on, str) and Path(trained_on).expanduser().exists():
            trained_on = str(Path(trained_on).expanduser().resolve())
        if shown_model is not None and isinstance(trained_on, str) and trained_on != shown_model:
            warnings.warn(
                f"concept {c.name!r} was trained on {trained_on}, not on {shown_model}: its vectors may mean "
                "less there",
                stacklevel=2,
            )
    run = {
        "model": shown_model,
        "steps": steps,
        "guidance": float(guidance),
        "negative_prompt": negative_prompt,
        "height": height,
        "width": width,
        "scheduler": scheduler if pipe is None else type(pipe.scheduler).__name__,
        "concepts": {c.name: concept_digest(c) for c in loaded},
    }
    pending = [r for r in records if not (skip_existing and (out / r.file).is_file())]
    if skip_existing and len(pending) < len(records):
        _check_kept_images(out, run)
    # Written before the first image: a run stopped part way (Ctrl-C, a crash) is continued by the
    # same call, which keeps the images made so far because this records what made them.
    manifest = write_json(
        {
            "records": [r.to_json() for r in records],
            "steps": steps,
            "guidance": guidance,
            "seeds": [int(s) for s in seeds],
            "prompts": {k: list(v) for k, v in prompts.items()} if isinstance(prompts, Mapping) else list(prompts),
            "concepts": {c.name: str(c.source) for c in loaded},
            "run": run,
        },
        out / MANIFEST,
    )
    own_pipe = pipe is None
    made = 0
    if pending:
        if own_pipe:
            if model is None:
                raise ValueError("no model given and the concepts' concept.json names none; pass --model")
            pipe = load_pipeline(model, device=device, dtype=dtype, scheduler=scheduler, progress=progress)
        load_concepts(pipe, *loaded)
        try:
            for start in range(0, len(pending), batch_size):
                batch = pending[start : start + batch_size]
                gens = [torch.Generator(device="cpu").manual_seed(r.seed) for r in batch]
                with torch.inference_mode():
                    images = render(
                        pipe,
                        [r.prompt_text for r in batch],
                        gens,
                        steps=steps,
                        guidance=guidance,
                        height=height,
                        width=width,
                        negative_prompt=[negative_prompt] * len(batch) if negative_prompt else None,
                    )
                for r, img in zip(batch, images):
                    target = out / r.file
                    atomic_write(target, lambda tmp, img=img: img.save(tmp, format="PNG"))
                    made += 1
        finally:
            unload_concepts(pipe, loaded)
    grids: dict[str, Path] = {}
    if grid:
        by_folder: dict[str, list[ImageRecord]] = {}
        for r in records:
            by_folder.setdefault(r.file.split("/")[0], []).append(r)
        for folder, recs in by_folder.items():
            recs = sorted(recs, key=lambda r: (r.prompt_index, seeds.index(r.seed) if r.seed in seeds else r.seed))
            imgs = []
            for r in recs:
                with Image.open(out / r.file) as im:
                    imgs.append(im.convert("RGB"))
            labels = [f"{r.prompt_index}/s{r.seed}: {r.text}" for r in recs]
            sheet = image_grid(imgs, columns=len(seeds), labels=labels, min_tile=128, max_tile=256)
            path = out / folder / "grid.png"
            atomic_write(path, lambda tmp, sheet=sheet: sheet.save(tmp, format="PNG"))
            grids[folder] = path
    return GenerateResult(out, records, grids, manifest, made)


def _check_kept_images(out: Path, run: dict) -> None:
    """Refuse to keep images on disk that another run made (other model, concepts or settings)."""
    path = out / MANIFEST
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        before = None
    if not isinstance(before, dict):
        raise ValueError(
            f"{out} holds images but its {MANIFEST} is missing or damaged, so what made them is unknown; "
            "add --overwrite to make them again, or give a new --output"
        )
    if not isinstance(before.get("run"), dict):
        return  # written before runs were recorded (dti-fast <= 2026-12-01): kept as before
    diff = _run_differences(before["run"], run)
    if diff:
        raise ValueError(
            f"{out} holds images of another run ({'; '.join(diff)}); add --overwrite to make them again, or "
            "give a new --output"
        )


def read_manifest(output_dir: str | Path) -> list[ImageRecord]:
    """The image records :func:`generate` wrote to ``output_dir/images.json``."""
    path = Path(output_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run dti-fast generate into {output_dir} first")
    data = json.loads(path.read_text(encoding="utf-8"))
    return [ImageRecord(**r) for r in data["records"]]

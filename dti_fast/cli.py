"""The ``dti-fast`` command: train, demo, make-tiny-model, optim-demo."""

from __future__ import annotations

import argparse
import os
import sys
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional, Sequence

from .data import Concept

# TrainConfig fields a job file or flag may set, with the parser for each.
_JOB_KEYS: dict[str, Any] = {
    "model": str, "output_dir": Path, "method": str, "steps": int, "batch_size": int, "max_batch": None,
    "resolution": int, "lr": float, "scale_lr": bool, "kappa": float, "beta": float, "norm_scale": None,
    "init": str, "weight_decay": float, "seed": int, "checkpoint_every": int, "keep_checkpoints": int,
    "resume": bool, "precision": str, "device": str, "validation_prompts": list,
    "validation_inference_steps": int, "export_ti_rescaled": bool, "progress": bool, "max_bad_steps": int,
    "parallel": str, "latent_cache": bool, "latent_cache_crops": int, "text_cache": None, "attention": str, "gradient_checkpointing": bool,
    "channels_last": bool, "compile": bool, "optim_bits": int,
}
_CONCEPT_KEYS = {f.name for f in fields(Concept)} | {"class"}


def _scale_value(text: str):
    if text in ("mean", "min", "max"):
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--scale takes mean, min, max or a positive number, got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def parse_concept_flag(text: str) -> Concept:
    """``NAME:IMAGES_DIR:INIT[:CLASS]`` -> Concept (INIT may hold spaces)."""
    parts = text.split(":")
    if len(parts) < 3 or not all(parts[:3]):
        raise argparse.ArgumentTypeError(
            f"--concept {text!r}: expected NAME:IMAGES_DIR:INIT[:CLASS], e.g. dog:photos/dog:dog"
        )
    try:
        return Concept(name=parts[0], images=Path(parts[1]), init=parts[2], class_noun=parts[3] if len(parts) > 3 else None)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def load_job_file(path: Path) -> dict[str, Any]:
    """Read a TOML job file into TrainConfig keyword arguments (concepts resolved relative to the file)."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SystemExit(f"dti-fast: job file {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise SystemExit(f"dti-fast: job file {path} is not valid TOML: {err}") from None
    job: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "concept":
            continue
        if key not in _JOB_KEYS:
            raise SystemExit(f"dti-fast: job file {path}: unknown key {key!r} (known: {', '.join(sorted(_JOB_KEYS))})")
        kind = _JOB_KEYS[key]
        if kind is Path:
            value = (Path(path).parent / value) if not Path(value).is_absolute() else Path(value)
        elif kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise SystemExit(f"dti-fast: job file {path}: {key} must be a number, got {value!r}")
        elif kind is int and not isinstance(value, int):
            raise SystemExit(f"dti-fast: job file {path}: {key} must be an integer, got {value!r}")
        elif kind is float:
            value = float(value)
        elif kind in (str, bool, list) and not isinstance(value, kind):
            raise SystemExit(f"dti-fast: job file {path}: {key} must be a {kind.__name__}, got {value!r}")
        job[key] = value
    concepts = []
    entries = raw.get("concept", [])
    if not isinstance(entries, list):
        raise SystemExit(f"dti-fast: job file {path}: write concepts as [[concept]] tables")
    for n, entry in enumerate(entries, 1):
        unknown = set(entry) - _CONCEPT_KEYS
        if unknown:
            raise SystemExit(f"dti-fast: job file {path}: concept #{n} has unknown key(s) {', '.join(sorted(unknown))}")
        missing = {"name", "images", "init"} - set(entry)
        if missing:
            raise SystemExit(f"dti-fast: job file {path}: concept #{n} lacks {', '.join(sorted(missing))}")
        entry = dict(entry)
        if "class" in entry:
            entry["class_noun"] = entry.pop("class")
        images = Path(entry["images"])
        entry["images"] = images if images.is_absolute() else Path(path).parent / images
        try:
            concepts.append(Concept(**entry))
        except (TypeError, ValueError) as err:
            raise SystemExit(f"dti-fast: job file {path}: concept #{n}: {err}") from None
    job["concepts"] = concepts
    return job


def _train_config(args: argparse.Namespace):
    from .trainer import TrainConfig

    job: dict[str, Any] = load_job_file(args.config) if args.config else {"concepts": []}
    for key in _JOB_KEYS:
        value = getattr(args, key, None)
        if value is not None and value != []:
            job[key] = value
    if args.concept:
        job["concepts"] = list(job.get("concepts", [])) + list(args.concept)
    for required in ("model", "output_dir"):
        if required not in job:
            raise SystemExit(f"dti-fast train: give --{required.replace('_dir', '')} (or set {required} in the job file)")
    if not job["concepts"]:
        raise SystemExit("dti-fast train: no concepts: give --concept NAME:IMAGES_DIR:INIT or [[concept]] in a job file")
    return TrainConfig(**job)


def _report(result, cfg) -> None:
    print(f"\nTrained {len(result.concept_dirs)} concept(s) with {cfg.method.upper()} in {result.seconds:.1f} s "
          f"({result.samples_per_second:.1f} samples/s, {result.job_steps} steps, {result.skipped_steps} skipped).")
    for name, folder in result.concept_dirs.items():
        norms = ", ".join(
            f"encoder {e + 1}: |e| = {float(v.norm(dim=-1).mean()):.4f}" + (f" (m* = {s:.4f})" if cfg.method == "dti" else "")
            for e, (v, s) in enumerate(zip(result.vectors[name], result.scales))
        )
        print(f"  {name}: {folder}  [{norms}]")
    for name, why in result.stopped.items():
        print(f"  {name} was stopped early: {why}")


def _cmd_train(args: argparse.Namespace) -> int:
    from .trainer import train

    cfg = _train_config(args)
    result = train(cfg)
    _report(result, cfg)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(output=args.output, steps=args.steps, seed=args.seed)
    return 0


def _cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from .models import make_tiny_model

    path = make_tiny_model(args.dir, family=args.family, seed=args.seed)
    print(f"tiny {args.family} model written to {path}")
    return 0


def _cmd_optim_demo(args: argparse.Namespace) -> int:
    from .toy import run_toy

    r = run_toy(concepts=args.concepts, vectors=args.vectors, dim=args.dim, steps=args.steps, seed=args.seed)
    print(f"SphericalSGD toy: {r.concepts} concepts x {r.vectors} vectors x dim {r.dim}, {r.steps} steps ({r.path})")
    print(f"  mean cosine to the hidden targets: {r.start_cosine:.3f} -> {r.final_cosine:.3f}")
    print(f"  rows stay on the unit sphere: max | ||v|| - 1 | = {r.max_norm_error:.2e}")
    print(f"  AdamW on the same loss, unconstrained (plain TI): mean norm 0.390 -> {r.adamw_final_norm:.3f}")
    print(f"  {r.seconds:.2f} s for both optimizers")
    return 0


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML job file: the keys below (underscored) and [[concept]] tables "
                   "with name, images, init, and optionally class, placeholder, kind (object|style), steps")
    p.add_argument("--model", help="diffusers model: a local folder or a hub id (SD 1.x/2.x or SDXL)")
    p.add_argument("--output", dest="output_dir", type=Path, help="output folder (one sub-folder per concept)")
    p.add_argument("--concept", action="append", type=parse_concept_flag, default=[],
                   help="NAME:IMAGES_DIR:INIT[:CLASS]; repeat for many concepts trained together "
                   "(placeholder <NAME>; INIT's tokenizer pieces give the number of vectors)")
    p.add_argument("--method", choices=["dti", "ti"], help="dti (default): fixed norm m*, Riemannian SGD on the "
                   "direction with a vMF prior; ti: plain Textual Inversion (AdamW on a free vector)")
    p.add_argument("--steps", type=_positive_int, help="optimizer steps per concept (default 400)")
    p.add_argument("--batch-size", type=_positive_int, help="images per concept per step (default 4)")
    p.add_argument("--max-batch", type=_max_batch_value, help="most images in one forward pass; concepts take turns "
                   "when the job has more (default: every concept in every step); 'auto' measures the step's "
                   "memory and fills the device")
    p.add_argument("--resolution", type=_positive_int, help="training resolution in pixels (default 512)")
    p.add_argument("--lr", type=_positive_float, help="learning rate before batch scaling (default: dti 0.01, ti 5e-3)")
    p.add_argument("--no-scale-lr", dest="scale_lr", action="store_const", const=False,
                   help="do not multiply the learning rate by --batch-size (scaled by default, as in the paper)")
    p.add_argument("--kappa", type=float, help="DTI: vMF prior concentration (default 1e-4)")
    p.add_argument("--beta", type=float, help="DTI: decay of the squared-gradient average (default 0)")
    p.add_argument("--scale", dest="norm_scale", type=_scale_value,
                   help="DTI: the fixed norm m*: mean (default), min or max of the vocabulary's norms, or a number")
    p.add_argument("--init", choices=["token", "random", "mean"],
                   help="start direction: the initializer's embedding (default), random, or the vocabulary mean")
    p.add_argument("--weight-decay", type=float, help="TI: AdamW weight decay (default 1e-2)")
    p.add_argument("--seed", type=int, help="random seed (default 0); seeded CPU runs repeat exactly")
    p.add_argument("--checkpoint-every", type=_positive_int, help="job steps between checkpoints (default 100)")
    p.add_argument("--keep-checkpoints", type=_positive_int, help="checkpoints kept (default 2)")
    p.add_argument("--resume", action="store_const", const=True,
                   help="continue from the newest checkpoint in the output folder (same settings required)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                   help="frozen weights and autocast: auto (default) = bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--validation-prompt", dest="validation_prompts", action="append", default=[],
                   help="prompt for a sample grid after training ({} stands for the concept); repeatable")
    p.add_argument("--validation-inference-steps", type=_positive_int, help="denoising steps of the samples (default 25)")
    p.add_argument("--export-ti-rescaled", action="store_const", const=True,
                   help="TI: also export vectors rescaled to m* (the paper's TI-rescaled baseline) under rescaled/")
    p.add_argument("--max-bad-steps", type=_positive_int,
                   help="stop a concept after this many steps in a row with a NaN/inf loss or gradient (default 3)")
    p.add_argument("--parallel", choices=["shard", "data"],
                   help="under torchrun / accelerate launch: shard (default) splits the concepts over the ranks; "
                   "data trains every concept on every rank with different samples and all-reduced gradients "
                   "(W ranks = one rank with W times the batch)")
    perf = p.add_argument_group("throughput and memory")
    perf.add_argument("--no-latent-cache", dest="latent_cache", action="store_const", const=False,
                      help="VAE-encode every sampled crop every step, at any pixel offset (default: a fixed set of "
                      "crops per image on the 8-pixel grid is encoded once and reused)")
    perf.add_argument("--latent-cache-crops", type=_positive_int,
                      help="most cached crops per image, evenly spaced 8-pixel offsets along the longer side "
                      "(default 16)")
    perf.add_argument("--text-cache", dest="text_cache", action=argparse.BooleanOptionalAction, default=None,
                      help="reuse the text encoders' states before the first learned token and skip layers "
                      "whose output is unused (exact; default: on for SDXL, off for SD, as measured)")
    perf.add_argument("--attention", choices=["sdpa", "xformers"],
                      help="attention kernels: sdpa (default, PyTorch's fused attention) or xformers (CUDA, needs "
                      "the xformers package)")
    perf.add_argument("--gradient-checkpointing", action="store_const", const=True,
                      help="recompute UNet and text-encoder activations in backward: less memory, more time")
    perf.add_argument("--channels-last", action="store_const", const=True,
                      help="run the UNet in channels-last memory format")
    perf.add_argument("--compile", action="store_const", const=True,
                      help="torch.compile the UNet: faster steps after a compile of a minute or more, so for long "
                      "jobs (see the README's measurements)")
    perf.add_argument("--optim-bits", type=int, choices=[32, 8],
                      help="TI: keep AdamW's two moments blockwise in 8 bits (bitsandbytes); DTI's optimizer keeps "
                      "one fp32 scalar per row, which this does not change (default 32)")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bar")


def _max_batch_value(text: str):
    if text == "auto":
        return text
    return _positive_int(text)


def _int_list(text: str) -> list[int]:
    """``0,1,2`` or ``0-3`` (inclusive) -> a list of ints."""
    import re

    out: list[int] = []
    for part in (x.strip() for x in text.split(",")):
        if not part:
            continue
        span = re.fullmatch(r"(\d+)-(\d+)", part)
        if span:
            out.extend(range(int(span.group(1)), int(span.group(2)) + 1))
            continue
        try:
            out.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected integers like 0,1,2 or 0-3, got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
    return out


def _read_prompt_file(path: Path) -> list[str]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _cmd_generate(args: argparse.Namespace) -> int:
    from .generate import generate

    prompts = list(args.prompt)
    if args.prompt_file:
        prompts += _read_prompt_file(args.prompt_file)
    if not prompts:
        prompts = ["a photo of {}"]
    result = generate(
        args.model, args.concept, prompts, args.output, seeds=args.seeds, steps=args.steps, guidance=args.guidance,
        negative_prompt=args.negative_prompt, height=args.height, width=args.width, batch_size=args.batch_size,
        device=args.device, dtype=args.dtype, scheduler=args.scheduler, skip_existing=not args.overwrite,
        grid=not args.no_grid, progress=args.progress,
    )
    print(f"{len(result.records)} image(s) in {result.output_dir} ({result.generated} generated now, "
          f"{len(result.records) - result.generated} already there); manifest {result.manifest}")
    for name, path in result.grids.items():
        print(f"  contact sheet {name}: {path}")
    return 0


def _add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate images with learned concepts (diffusers pipeline)",
                       description="Load a diffusers SD/SDXL pipeline, load the learned concepts with "
                       "load_textual_inversion (SDXL: both encoders), and generate prompts x seeds; writes PNGs, "
                       "images.json and a contact sheet per concept. Images already on disk are kept.")
    p.add_argument("--concept", action="append", default=[], type=Path, required=True,
                   help="a concept folder written by dti-fast train (or its rescaled/ folder, or an interpolation "
                   "folder), or an embedding file; repeatable")
    p.add_argument("--model", help="diffusers model folder or hub id (default: the model in the first concept's "
                   "concept.json); must be the family the concepts were trained on")
    p.add_argument("--prompt", action="append", default=[],
                   help="prompt; {} stands for the concept (run once per concept), a prompt without {} runs once "
                   "as written (it may name placeholders); repeatable (default: 'a photo of {}')")
    p.add_argument("--prompt-file", type=Path, help="text file with one prompt per line (# starts a comment)")
    p.add_argument("--output", type=Path, required=True, help="output folder")
    p.add_argument("--seeds", type=_int_list, default=[0], help="seeds, e.g. 0,1,2,3 or 0-3 (default 0); one image "
                   "per prompt and seed, reproducible whatever the batch")
    p.add_argument("--steps", type=_positive_int, default=30, help="denoising steps (default 30)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--negative-prompt", help="negative prompt for every image")
    p.add_argument("--height", type=_positive_int, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=_positive_int, help="image width in pixels (default: the model's)")
    p.add_argument("--batch-size", type=_positive_int, default=4, help="images per pipeline call (default 4)")
    p.add_argument("--scheduler", choices=["auto", "model", "ddim", "euler", "dpm", "pndm"], default="auto",
                   help="sampler: auto (default) = the model's, DDIM instead of a training DDPM scheduler; model; "
                   "ddim; euler; dpm (DPM-Solver++); pndm")
    p.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="weights dtype: auto (default) = bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--overwrite", action="store_true", help="regenerate images that already exist")
    p.add_argument("--no-grid", action="store_true", help="do not write the contact sheets")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no denoising progress bar")
    p.set_defaults(func=_cmd_generate)


def _cmd_interpolate(args: argparse.Namespace) -> int:
    from .interpolate import interpolate_concepts

    out = args.output or Path(f"interp-{Path(args.a).name}-{Path(args.b).name}")
    result = interpolate_concepts(
        args.a, args.b, out, steps=args.steps, mode=args.mode, images=not args.no_images, model=args.model,
        prompt=args.prompt, seed=args.seed, inference_steps=args.inference_steps, guidance=args.guidance,
        resolution=args.resolution, device=args.device, dtype=args.dtype,
    )
    print(f"interpolated {args.a} -> {args.b} at t = {', '.join(f'{t:g}' for t in result.times)} "
          f"({', '.join(result.modes)}) into {result.output_dir}")
    for mode, folders in result.folders.items():
        print(f"  {mode}: {len(folders)} concept folders under {result.output_dir / mode}")
    for mode, path in result.strips.items():
        print(f"  strip ({mode}): {path}")
    return 0


def _add_interpolate_parser(sub) -> None:
    p = sub.add_parser("interpolate", help="slerp between two learned concepts: an embedding per t and an image strip",
                       description="Interpolate two concepts vector by vector (SDXL: both encoders with the same t). "
                       "DTI: slerp of the directions at the fixed norm m*. TI: lerp and/or slerp of the directions "
                       "with linearly interpolated norms. Writes one concept folder per t (diffusers format, "
                       "placeholder <a-b-t0.25>) and an image strip.")
    p.add_argument("a", type=Path, help="first concept (folder written by dti-fast train, or an embedding file)")
    p.add_argument("b", type=Path, help="second concept (same model and the same number of vectors as A)")
    p.add_argument("--steps", type=int, default=5, help="number of t values in [0, 1], ends included (default 5)")
    p.add_argument("--mode", choices=["auto", "slerp", "lerp", "both"], default="auto",
                   help="auto (default): slerp for two DTI concepts, both lerp and slerp otherwise")
    p.add_argument("--output", type=Path, help="output folder (default ./interp-A-B)")
    p.add_argument("--model", help="model for the strip (default: the model in A's concept.json)")
    p.add_argument("--prompt", default="a photo of {}", help="strip prompt, {} = the interpolated concept "
                   "(default 'a photo of {}')")
    p.add_argument("--seed", type=int, default=0, help="the strip's seed, the same at every t (default 0)")
    p.add_argument("--inference-steps", type=_positive_int, default=30, help="denoising steps (default 30)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--resolution", type=_positive_int, help="strip image size in pixels (default: the model's)")
    p.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="weights dtype: auto (default) = bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--no-images", action="store_true", help="only write the embeddings, no image strip")
    p.set_defaults(func=_cmd_interpolate)


def _cmd_suite(args: argparse.Namespace) -> int:
    if args.world:  # the toy world (dti_fast.world)
        from .world.cli import run_toy_suite
        return run_toy_suite(args)
    from .suite import SuiteConfig, run_suite

    cfg = SuiteConfig(output_dir=args.output, model=args.model, data_dir=args.data, subjects_file=args.subjects_file,
                      subjects=args.subject or None, quick=args.quick, force=args.force, progress=args.progress)
    for key in ("steps", "batch_size", "resolution", "seed", "prompt_set", "prompts_file", "max_prompts", "seeds",
                "inference_steps", "guidance", "gen_batch_size", "scheduler", "masks_dir", "dino_model",
                "siglip_model", "clip_model", "device", "precision", "slerp_steps"):
        value = getattr(args, key)
        if value is not None:
            setattr(cfg, key, value)
    if args.methods:
        cfg.methods = args.methods
    if args.metrics:
        cfg.metrics = args.metrics
    if args.max_batch is not None:
        cfg.max_batch = args.max_batch or None
    if args.slerp_pair:
        cfg.slerp_pair = tuple(args.slerp_pair)
    result = run_suite(cfg)
    print(f"\nsuite finished in {result.seconds:.1f} s (ran: {', '.join(result.ran) or 'nothing'}; "
          f"skipped as done: {', '.join(result.skipped) or 'nothing'})")
    keys = [k for k in ("image", "text", "clip_i", "clip_t") if k in cfg.metrics]
    print(f"  {'method':<12}" + "".join(f"{k:>10}" for k in keys))
    for method, row in result.table.items():
        print(f"  {method:<12}" + "".join(f"{row.get(k, float('nan')):>10.4f}" for k in keys))
    print(f"report: {result.report_md} (and {result.report_json.name})")
    return 0


def _comma_list(choices: Sequence[str]):
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(choices)}, got {text!r}")
        return items
    return parse


def _pair(text: str) -> list[str]:
    parts = [x.strip() for x in text.split(",")]
    if len(parts) != 2 or not all(parts):
        raise argparse.ArgumentTypeError(f"expected two subject names A,B, got {text!r}")
    return parts


def _add_suite_parser(sub) -> None:
    p = sub.add_parser("suite", help="the TI-vs-DTI benchmark in one command: train, generate, score, report",
                       description="Run the paper's protocol on a DreamBooth-layout folder: train every subject with "
                       "each method (all subjects of a method in one job), generate the evaluation prompts x seeds, "
                       "score (DINOv2 Image, SigLIP Text, CLIP-I, CLIP-T; per subject, then mean over subjects), and "
                       "write report.json and report.md with plots. Resumable: a rerun skips finished stages. "
                       "--quick: the tiny model, the shipped photos and tiny random-weight metric models "
                       "(a smoke test, minutes on a CPU).")
    p.add_argument("--output", type=Path, default=Path("dti-suite"), help="output folder (default ./dti-suite)")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny SD model, shipped dreambooth_mini, 20 "
                   "steps, resolution 64, 3 prompts, 1 seed, tiny random-weight metric models (numbers mean nothing)")
    p.add_argument("--model", help="diffusers SD 1.x/2.x or SDXL folder or hub id (required without --quick)")
    p.add_argument("--data", type=Path, help="DreamBooth-layout folder, one sub-folder of photos per subject "
                   "(required without --quick)")
    p.add_argument("--subjects-file", type=Path, help="JSON {\"subjects\": {name: {\"class\", \"initialization\"}}} "
                   "(default: the shipped DreamBooth list of 30 subjects)")
    p.add_argument("--subject", action="append", default=[], help="run only this subject; repeatable (default: every "
                   "subject of the list with a folder in --data)")
    p.add_argument("--methods", type=_comma_list(["dti", "ti", "ti-rescaled"]),
                   help="comma-separated subset of dti, ti, ti-rescaled (default all three; ti-rescaled reuses ti's "
                   "training)")
    p.add_argument("--steps", type=_positive_int, help="training steps per subject (default 400; --quick 20)")
    p.add_argument("--batch-size", type=_positive_int, help="training images per subject per step (default 4)")
    p.add_argument("--max-batch", type=int, help="most training images per forward pass, subjects take turns "
                   "(default 16; 0 = every subject every step)")
    p.add_argument("--resolution", type=_positive_int, help="training resolution (default: 768 for SDXL, else the "
                   "model's native size)")
    p.add_argument("--seed", type=int, help="training seed (default 0)")
    p.add_argument("--prompt-set", help="prompt set of the prompts file: simple (default), complex_lv1, complex_lv2")
    p.add_argument("--prompts-file", type=Path, help="prompts JSON (default: the shipped eval_prompts.json)")
    p.add_argument("--max-prompts", type=_positive_int, help="use only the first N prompts of each kind (default all)")
    p.add_argument("--seeds", type=_int_list, help="generation seeds, e.g. 0-3 (default 0,1,2,3; --quick 0)")
    p.add_argument("--inference-steps", type=_positive_int, help="denoising steps (default 50; --quick 10)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--gen-batch-size", type=_positive_int, help="images per pipeline call (default 8)")
    p.add_argument("--scheduler", choices=["auto", "model", "ddim", "euler", "dpm", "pndm"],
                   help="sampler (default auto: the model's, DDIM instead of a training DDPM scheduler)")
    p.add_argument("--masks", dest="masks_dir", type=Path, help="reference masks for the Image metric: "
                   "<masks>/<subject>/<photo stem>.png, white = subject (default: unmasked references)")
    p.add_argument("--dino-model", help="DINOv2 id or folder (default facebook/dinov2-base)")
    p.add_argument("--siglip-model", help="SigLIP id or folder (default google/siglip-base-patch16-512)")
    p.add_argument("--clip-model", help="CLIP id or folder (default openai/clip-vit-base-patch32)")
    p.add_argument("--metrics", type=_comma_list(["image", "text", "clip_i", "clip_t"]),
                   help="comma-separated subset of image, text, clip_i, clip_t (default all)")
    p.add_argument("--slerp-pair", type=_pair, help="two subjects A,B for the slerp strip (default: the first two "
                   "with the same number of vectors)")
    p.add_argument("--slerp-steps", type=int, help="t values in the slerp strip (default 5)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                   help="training and generation precision: auto (default) = bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--force", action="store_true", help="ignore the state file and redo every stage")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress output")
    from .world.cli import add_toy_suite_flags
    add_toy_suite_flags(p)
    p.set_defaults(func=_cmd_suite)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dti-fast",
        description="Directional Textual Inversion (arXiv 2512.13672) for diffusers models: learn token "
        "embeddings of fixed norm whose direction is trained on the sphere.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train concepts (many at once) on a diffusers model",
                           description="Train one or more concepts concurrently on one frozen model. Flags "
                           "override the job file.")
    _add_train_flags(train)
    train.set_defaults(func=_cmd_train)

    demo = sub.add_parser("demo", help="build the tiny model and train shipped concepts concurrently (about a minute on a CPU)",
                          description="Build the built-in tiny random-weight SD model, train DTI on the shipped "
                          "DreamBooth images (several concepts in one job), and the TI baseline on the same "
                          "concepts; write the outputs and print where they are and the learned norms.")
    demo.add_argument("--output", type=Path, default=Path("dti-demo-output"), help="output folder (default ./dti-demo-output)")
    demo.add_argument("--steps", type=_positive_int, default=400, help="steps per concept (default 400, the paper's)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.set_defaults(func=_cmd_demo)

    tiny = sub.add_parser("make-tiny-model", help="write a tiny random-weight SD or SDXL model in diffusers' layout",
                          description="Write a tiny random-weight model (real architecture family, CLIP's real "
                          "tokenizer) that diffusers' from_pretrained loads: for tests and demos.")
    tiny.add_argument("dir", type=Path, help="folder to write")
    tiny.add_argument("--family", choices=["sd", "sdxl"], default="sd", help="architecture family (default sd)")
    tiny.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    tiny.set_defaults(func=_cmd_make_tiny_model)

    toy = sub.add_parser("optim-demo", help="SphericalSGD alone on a toy problem on the sphere",
                         description="Train toy concepts on the unit sphere with SphericalSGD next to unconstrained "
                         "AdamW on the same loss; print the cosine reached and the norms.")
    toy.add_argument("--concepts", type=_positive_int, default=64, help="number of toy concepts (default 64)")
    toy.add_argument("--vectors", type=_positive_int, default=4, help="vectors per concept (default 4)")
    toy.add_argument("--dim", type=_positive_int, default=768, help="vector size (default 768, CLIP-L)")
    toy.add_argument("--steps", type=_positive_int, default=200, help="optimizer steps (default 200)")
    toy.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    toy.set_defaults(func=_cmd_optim_demo)

    _add_generate_parser(sub)
    _add_interpolate_parser(sub)
    _add_suite_parser(sub)
    from .world.cli import add_world_parser
    add_world_parser(sub)
    return parser


def _quiet_libraries() -> None:
    """Keep diffusers'/transformers' info chatter (weight-loading bars, notices) off the console."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("diffusers", "transformers", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.set_verbosity_error()
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not os.environ.get("DTI_FAST_VERBOSE"):
        _quiet_libraries()
    from .trainer import JobError, TrainingInterrupted

    try:
        return args.func(args)
    except TrainingInterrupted as err:
        print(f"dti-fast {args.command}: {err}", file=sys.stderr)
        return 128 + err.signum
    except (ValueError, OSError, JobError) as err:
        if os.environ.get("DTI_FAST_DEBUG"):
            raise
        print(f"dti-fast {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

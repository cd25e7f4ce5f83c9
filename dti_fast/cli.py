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
    "model": str, "output_dir": Path, "method": str, "steps": int, "batch_size": int, "max_batch": int,
    "resolution": int, "lr": float, "scale_lr": bool, "kappa": float, "beta": float, "norm_scale": None,
    "init": str, "weight_decay": float, "seed": int, "checkpoint_every": int, "keep_checkpoints": int,
    "resume": bool, "precision": str, "device": str, "validation_prompts": list,
    "validation_inference_steps": int, "export_ti_rescaled": bool, "progress": bool, "max_bad_steps": int,
    "parallel": str,
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
    p.add_argument("--max-batch", type=_positive_int, help="most images in one forward pass; concepts take turns "
                   "when the job has more (default: every concept in every step)")
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
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bar")


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
    demo.add_argument("--steps", type=_positive_int, default=300, help="steps per concept (default 300)")
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

"""The ``dti-fast`` command: train, demo, make-tiny-model, optim-demo, generate, interpolate, suite.

The train and suite flags derive from the settings declared in
:class:`~dti_fast.train.TrainConfig` and :class:`~dti_fast.suite.SuiteConfig`.
Every error a user can cause ends in one line naming the input and the fix
(exit 2); anything unexpected ends in one line plus the path of a log file
holding the traceback (``--debug`` prints it instead).
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import settings as S
from .data import Concept
from .train.config import load_job_file  # re-exported: the job-file reader of the command

__all__ = ["build_parser", "load_job_file", "main", "parse_concept_flag"]


_positive_int = S.argparse_type(S.POSITIVE_INT)
_seed = S.argparse_type(S.SEED)
_seeds = S.argparse_type(S.SEEDS)
_guidance = S.argparse_type(S.NONNEG_FLOAT)

#: The largest image side generate and interpolate take (SANA 4K's 4096 px); a larger one would
#: fill the memory before the first image.
MAX_SIDE = 4096


def _image_side(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_SIDE:
        raise argparse.ArgumentTypeError(f"{value} px is above the largest side dti-fast samples, {MAX_SIDE} px")
    return value


#: The most t values an interpolation takes (a strip of more images is not a strip).
MAX_INTERPOLATION_STEPS = 1001


def _interpolation_steps(text: str) -> int:
    value = _positive_int(text)
    if not 2 <= value <= MAX_INTERPOLATION_STEPS:
        raise argparse.ArgumentTypeError(
            f"expected 2 to {MAX_INTERPOLATION_STEPS} t values (t = 0 and t = 1 included), got {value}"
        )
    return value


_output_path = S.argparse_type(S.PATH)


def parse_concept_flag(text: str) -> Concept:
    """``NAME:IMAGES_DIR:INIT[:CLASS[:TRIGGER]]`` -> Concept (INIT may hold spaces; CLASS may be empty)."""
    parts = text.split(":")
    if len(parts) < 3 or not all(parts[:3]):
        raise argparse.ArgumentTypeError(
            f"--concept {text!r}: expected NAME:IMAGES_DIR:INIT[:CLASS[:TRIGGER]], e.g. dog:photos/dog:dog"
        )
    joined = [":".join(parts[1:k]) for k in range(3, len(parts) + 1)]
    if len(parts) > 5 or (
        not Path(parts[1]).expanduser().exists() and any(Path(j).expanduser().exists() for j in joined)
    ):
        raise argparse.ArgumentTypeError(
            f"--concept {text!r}: a colon inside the folder path or the initializer makes the parts ambiguous; "
            "use a job file ([[concept]] with name, images, init, class, trigger)"
        )
    try:
        return Concept(
            name=parts[0],
            images=Path(parts[1]).expanduser(),
            init=parts[2],
            class_noun=parts[3] if len(parts) > 3 and parts[3] else None,
            trigger=parts[4] if len(parts) > 4 and parts[4] else None,
        )
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _train_config(args: argparse.Namespace):
    from .train import TrainConfig

    job: dict[str, Any] = load_job_file(args.config) if args.config else {"concepts": []}
    job.update(S.flag_values(args, TrainConfig))
    if args.concept:
        job["concepts"] = list(job.get("concepts", [])) + list(args.concept)
    for required in ("model", "output_dir"):
        if required not in job:
            raise SystemExit(
                f"dti-fast train: give --{required.replace('_dir', '')} (or set {required} in the job file)"
            )
    if not job["concepts"]:
        raise SystemExit(
            "dti-fast train: no concepts: give --concept NAME:IMAGES_DIR:INIT or [[concept]] in a job file"
        )
    return TrainConfig(**job)


def _report(result, cfg) -> None:
    from .concept_files import summary_lines

    print(
        f"\nTrained {len(result.concept_dirs)} concept(s) with {cfg.method.upper()} in {result.seconds:.1f} s "
        f"({result.samples_per_second:.1f} samples/s, {result.job_steps} steps, {result.skipped_steps} skipped)."
    )
    for name, folder in result.concept_dirs.items():
        norms = ", ".join(
            f"encoder {e + 1}: |e| = {float(v.norm(dim=-1).mean()):.4f}"
            + (f" (m* = {s:.4f})" if cfg.method == "dti" else "")
            for e, (v, s) in enumerate(zip(result.vectors[name], result.scales))
        )
        print(f"  {name}: {folder}  [{norms}]")
        for line in summary_lines(folder):
            print(line)
    for name, why in result.stopped.items():
        print(f"  {name} was stopped early: {why}")


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import JobError, train

    cfg = _train_config(args)
    result = train(cfg)
    _report(result, cfg)
    if result.stopped and len(result.stopped) == len(result.concept_dirs):
        raise JobError(
            f"every concept was stopped early ({len(result.stopped)}); nothing usable was learned: check "
            "the images and lower the learning rate"
        )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(output=args.output, steps=args.steps, seed=args.seed)
    return 0


_PIPELINE_FAMILY = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "SanaPipeline": "sana",
    "WanPipeline": "wan",
}


def _cmd_make_tiny_model(args: argparse.Namespace) -> int:
    import json

    from .io import check_output_folder, umask_modes
    from .testing import make_tiny_model

    out = check_output_folder(args.dir, owner="dti-fast make-tiny-model", flag="DIR", marks=("model_index.json",))
    index_file = out / "model_index.json"
    if index_file.is_file():  # a model already there: replaced only by a tiny model of the same family
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            index = None
        tiny = isinstance(index, dict) and "_dti_fast_tiny" in index
        family = _PIPELINE_FAMILY.get(str(index.get("_class_name"))) if isinstance(index, dict) else None
        if not tiny or family != args.family:
            what = f"a tiny {family} model" if tiny else "a model that make-tiny-model did not write"
            raise ValueError(
                f"DIR {out} holds {what}; concepts trained on it would stop fitting: give another folder "
                "(or delete it first)"
            )
    path = make_tiny_model(out, family=args.family, seed=args.seed)
    umask_modes(path)  # readable by others as any file the user makes (safetensors writes 0600)
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
    from .train import TrainConfig

    p.add_argument(
        "--config",
        type=Path,
        help="TOML job file: the keys below (underscored) and [[concept]] tables "
        "with name, images, init, and optionally class, placeholder, trigger, kind (object|style), steps",
    )
    p.add_argument(
        "--concept",
        action="append",
        type=parse_concept_flag,
        default=[],
        help="NAME:IMAGES_DIR:INIT[:CLASS[:TRIGGER]]; repeat for many concepts trained together "
        "(placeholder <NAME>; INIT's tokenizer pieces give the number of vectors; TRIGGER, the word "
        "A1111/ComfyUI type and the embedding files' name, defaults to NAME-METHOD)",
    )
    S.add_arguments(p, TrainConfig)


def _read_prompt_file(path: Path) -> list[str]:
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--prompt-file {path} is a folder; give a text file with one prompt per line")
    if not path.is_file():
        raise ValueError(f"--prompt-file {path} does not exist; check the path")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"--prompt-file {path} is not UTF-8 text; save it as UTF-8, one prompt per line") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"--prompt-file {path} holds no prompts (only blank lines or # comments); add one per line")
    return prompts


def _cmd_generate(args: argparse.Namespace) -> int:
    from .generate import generate

    prompts = list(args.prompt)
    if any(not p.strip() for p in prompts):
        raise ValueError("--prompt is empty; give the text to draw ({} stands for the concept)")
    if args.prompt_file:
        prompts += _read_prompt_file(args.prompt_file)
    if not prompts:
        prompts = ["a photo of {}"]
    result = generate(
        args.model,
        args.concept,
        prompts,
        args.output,
        seeds=args.seeds,
        steps=args.steps,
        guidance=args.guidance,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        scheduler=args.scheduler,
        skip_existing=not args.overwrite,
        grid=not args.no_grid,
        progress=args.progress,
    )
    print(
        f"{len(result.records)} image(s) in {result.output_dir} ({result.generated} generated now, "
        f"{len(result.records) - result.generated} already there); manifest {result.manifest}"
    )
    for name, path in result.grids.items():
        print(f"  contact sheet {name}: {path}")
    return 0


def _add_generate_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate images with learned concepts (diffusers pipeline)",
        description="Load a diffusers SD/SDXL/SANA/Wan pipeline, load the learned concepts (SD/SDXL with "
        "load_textual_inversion, both SDXL encoders; SANA/Wan with dti_fast's own embedding; Wan makes "
        "one frame per prompt), and generate prompts x seeds; writes PNGs, "
        "images.json and a contact sheet per concept. Images already on disk are kept.",
    )
    p.add_argument(
        "--concept",
        action="append",
        default=[],
        type=Path,
        required=True,
        help="a concept folder written by dti-fast train (or its rescaled/ folder, or an interpolation "
        "folder), or an embedding file; repeatable",
    )
    p.add_argument(
        "--model",
        help="diffusers model folder or hub id (default: the model in the first concept's "
        "concept.json); must be the family the concepts were trained on",
    )
    p.add_argument(
        "--prompt",
        action="append",
        default=[],
        help="prompt; {} stands for the concept (run once per concept), a prompt without {} runs once "
        "as written (it may name placeholders); repeatable (default: 'a photo of {}')",
    )
    p.add_argument("--prompt-file", type=Path, help="text file with one prompt per line (# starts a comment)")
    p.add_argument(
        "--output",
        type=_output_path,
        required=True,
        help="output folder (new, empty, or one dti-fast generate wrote: images already there are kept when "
        "they come from the same model, concepts and settings)",
    )
    p.add_argument(
        "--seeds",
        type=_seeds,
        default=[0],
        help=f"seeds, e.g. 0,1,2,3 or 0-3 (default 0; distinct, 0 to 2**63 - 1, at most {S.MAX_SEEDS}); one image "
        "per prompt and seed, reproducible whatever the batch",
    )
    p.add_argument("--steps", type=_positive_int, default=30, help="denoising steps (default 30)")
    p.add_argument("--guidance", type=_guidance, default=7.5, help="classifier-free guidance scale, >= 0 (default 7.5)")
    p.add_argument("--negative-prompt", help="negative prompt for every image")
    p.add_argument(
        "--height", type=_image_side, help=f"image height in pixels, at most {MAX_SIDE} (default: the model's)"
    )
    p.add_argument(
        "--width", type=_image_side, help=f"image width in pixels, at most {MAX_SIDE} (default: the model's)"
    )
    p.add_argument("--batch-size", type=_positive_int, default=4, help="images per pipeline call (default 4)")
    p.add_argument(
        "--scheduler",
        choices=["auto", "model", "ddim", "euler", "dpm", "pndm"],
        default="auto",
        help="sampler: auto (default) = the model's, DDIM instead of a training DDPM scheduler; model; "
        "ddim; euler; dpm (DPM-Solver++); pndm",
    )
    p.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    p.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="weights dtype: auto (default) = bf16 on a GPU, fp32 on a CPU",
    )
    p.add_argument("--overwrite", action="store_true", help="regenerate images that already exist")
    p.add_argument("--no-grid", action="store_true", help="do not write the contact sheets")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no denoising progress bar")
    p.set_defaults(func=_cmd_generate)


def _cmd_interpolate(args: argparse.Namespace) -> int:
    from .interpolate import interpolate_concepts

    out = args.output or Path(f"interp-{Path(args.a).name}-{Path(args.b).name}")
    result = interpolate_concepts(
        args.a,
        args.b,
        out,
        steps=args.steps,
        mode=args.mode,
        images=not args.no_images,
        model=args.model,
        prompt=args.prompt,
        seed=args.seed,
        inference_steps=args.inference_steps,
        guidance=args.guidance,
        resolution=args.resolution,
        device=args.device,
        dtype=args.dtype,
    )
    print(
        f"interpolated {args.a} -> {args.b} at t = {', '.join(f'{t:g}' for t in result.times)} "
        f"({', '.join(result.modes)}) into {result.output_dir}"
    )
    for mode, folders in result.folders.items():
        print(f"  {mode}: {len(folders)} concept folders under {result.output_dir / mode}")
    for mode, path in result.strips.items():
        print(f"  strip ({mode}): {path}")
    return 0


def _add_interpolate_parser(sub) -> None:
    p = sub.add_parser(
        "interpolate",
        help="slerp between two learned concepts: an embedding per t and an image strip",
        description="Interpolate two concepts vector by vector (SDXL: both encoders with the same t). "
        "DTI: slerp of the directions at the fixed norm m*. TI: lerp and/or slerp of the directions "
        "with linearly interpolated norms. Writes one concept folder per t (diffusers format, "
        "placeholder <a-b-t0.25>) and an image strip.",
    )
    p.add_argument("a", type=Path, help="first concept (folder written by dti-fast train, or an embedding file)")
    p.add_argument("b", type=Path, help="second concept (same model and the same number of vectors as A)")
    p.add_argument(
        "--steps",
        type=_interpolation_steps,
        default=5,
        help=f"number of t values in [0, 1], ends included: 2 to {MAX_INTERPOLATION_STEPS} (default 5)",
    )
    p.add_argument(
        "--mode",
        choices=["auto", "slerp", "lerp", "both"],
        default="auto",
        help="auto (default): slerp for two DTI concepts, both lerp and slerp otherwise",
    )
    p.add_argument(
        "--output",
        type=_output_path,
        help="output folder (default ./interp-A-B; an earlier interpolation there is replaced)",
    )
    p.add_argument("--model", help="model for the strip (default: the model in A's concept.json)")
    p.add_argument(
        "--prompt",
        default="a photo of {}",
        help="strip prompt, {} = the interpolated concept (default 'a photo of {}')",
    )
    p.add_argument("--seed", type=_seed, default=0, help="the strip's seed, the same at every t (default 0)")
    p.add_argument("--inference-steps", type=_positive_int, default=30, help="denoising steps (default 30)")
    p.add_argument("--guidance", type=_guidance, default=7.5, help="classifier-free guidance scale, >= 0 (default 7.5)")
    p.add_argument(
        "--resolution",
        type=_image_side,
        help=f"strip image size in pixels, a multiple of 8, at most {MAX_SIDE} (default: the model's)",
    )
    p.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    p.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="weights dtype: auto (default) = bf16 on a GPU, fp32 on a CPU",
    )
    p.add_argument("--no-images", action="store_true", help="only write the embeddings, no image strip")
    p.set_defaults(func=_cmd_interpolate)


def _cmd_suite(args: argparse.Namespace) -> int:
    if args.world:  # the toy world (dti_fast.world)
        from .world.cli import run_toy_suite

        return run_toy_suite(args)
    from .suite import SuiteConfig, run_suite

    cfg = SuiteConfig(**S.flag_values(args, SuiteConfig))
    result = run_suite(cfg)
    print(
        f"\nsuite finished in {result.seconds:.1f} s (ran: {', '.join(result.ran) or 'nothing'}; "
        f"skipped as done: {', '.join(result.skipped) or 'nothing'})"
    )
    keys = [k for k in ("image", "text", "clip_i", "clip_t") if k in cfg.metrics]
    print(f"  {'method':<12}" + "".join(f"{k:>10}" for k in keys))
    for method, row in result.table.items():
        print(f"  {method:<12}" + "".join(f"{row.get(k, float('nan')):>10.4f}" for k in keys))
    if result.style_table:
        style_keys = [
            k for k in ("image", "text", "content", "clip_i", "clip_t") if k in next(iter(result.style_table.values()))
        ]
        print("  style concepts (image, clip_i: similarity to the style's images; content: the subject alone)")
        print(f"  {'method':<12}" + "".join(f"{k:>10}" for k in style_keys))
        for method, row in result.style_table.items():
            print(f"  {method:<12}" + "".join(f"{row.get(k, float('nan')):>10.4f}" for k in style_keys))
    print(f"report: {result.report_md} (and {result.report_json.name})")
    return 0


def _add_suite_parser(sub) -> None:
    from .suite import SuiteConfig

    p = sub.add_parser(
        "suite",
        help="the TI-vs-DTI benchmark in one command: train, generate, score, report",
        description="Run the paper's protocol on a DreamBooth-layout folder: train every subject with "
        "each method (all subjects of a method in one job), generate the evaluation prompts x seeds, "
        "score (DINOv2 Image, SigLIP Text, CLIP-I, CLIP-T; per subject, then mean over subjects), and "
        "write report.json and report.md with plots. Resumable: a rerun skips finished stages. "
        "--quick: the tiny model, the shipped photos and tiny random-weight metric models "
        "(a smoke test, minutes on a CPU).",
    )
    S.add_arguments(p, SuiteConfig)
    from .world.cli import add_toy_suite_flags

    add_toy_suite_flags(p)
    p.set_defaults(func=_cmd_suite)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line refusal: the error, and where the flags are listed.

    argparse's own ``error`` prints the whole usage block (20 lines for ``train``) above the
    one line that says what is wrong; the help is one flag away for whoever wants it.
    Subcommand parsers are made of this class too (``add_subparsers`` takes the parent's).
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dti-fast",
        description="Directional Textual Inversion (arXiv 2512.13672) for diffusers models: learn token "
        "embeddings of fixed norm whose direction is trained on the sphere.",
        epilog="--debug (anywhere on the command line) prints the full traceback of an error.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train",
        help="train concepts (many at once) on a diffusers model",
        description="Train one or more concepts concurrently on one frozen model. Flags override the job file.",
    )
    _add_train_flags(train)
    train.set_defaults(func=_cmd_train)

    demo = sub.add_parser(
        "demo",
        help="build the tiny model and train shipped concepts concurrently (about a minute on a CPU)",
        description="Build the built-in tiny random-weight SD model, train DTI on the shipped "
        "DreamBooth images (several concepts in one job), and the TI baseline on the same "
        "concepts; write the outputs and print where they are and the learned norms.",
    )
    demo.add_argument(
        "--output", type=Path, default=Path("dti-demo-output"), help="output folder (default ./dti-demo-output)"
    )
    demo.add_argument("--steps", type=_positive_int, default=400, help="steps per concept (default 400, the paper's)")
    demo.add_argument("--seed", type=_seed, default=0, help="random seed (default 0)")
    demo.set_defaults(func=_cmd_demo)

    tiny = sub.add_parser(
        "make-tiny-model",
        help="write a tiny random-weight SD, SDXL, SANA or Wan model in diffusers' layout",
        description="Write a tiny random-weight model (real architecture family; CLIP's real "
        "tokenizer for sd/sdxl, Gemma-2 / T5 kind tokenizers built by dti_fast for sana/wan) "
        "that diffusers' from_pretrained loads: for tests and demos.",
    )
    tiny.add_argument(
        "dir", type=_output_path, help="folder to write (new, empty, or a tiny model of the same family to replace)"
    )
    tiny.add_argument(
        "--family", choices=["sd", "sdxl", "sana", "wan"], default="sd", help="architecture family (default sd)"
    )
    tiny.add_argument("--seed", type=_seed, default=0, help="weight seed (default 0)")
    tiny.set_defaults(func=_cmd_make_tiny_model)

    toy = sub.add_parser(
        "optim-demo",
        help="SphericalSGD alone on a toy problem on the sphere",
        description="Train toy concepts on the unit sphere with SphericalSGD next to unconstrained "
        "AdamW on the same loss; print the cosine reached and the norms.",
    )
    toy.add_argument("--concepts", type=_positive_int, default=64, help="number of toy concepts (default 64)")
    toy.add_argument("--vectors", type=_positive_int, default=4, help="vectors per concept (default 4)")
    toy.add_argument("--dim", type=_positive_int, default=768, help="vector size (default 768, CLIP-L)")
    toy.add_argument("--steps", type=_positive_int, default=200, help="optimizer steps (default 200)")
    toy.add_argument("--seed", type=_seed, default=0, help="random seed (default 0)")
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
    # Not imported yet (the usual case: the CLI imports them only for a command that needs them): the
    # libraries read these as they configure their loggers, so a command that fails on bad input does
    # not first wait ~2 s for diffusers' imports. A value the user set is kept.
    if "diffusers" not in sys.modules:
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    if "transformers" not in sys.modules:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' weight-loading bars
    try:
        if "diffusers" in sys.modules:
            import diffusers.utils.logging as dlog

            dlog.set_verbosity_error()
        if "transformers" in sys.modules:
            import transformers.utils.logging as tlog

            tlog.set_verbosity_error()
            tlog.disable_progress_bar()
    except ImportError:
        pass


def _log_crash(command: str) -> Path | None:
    """Write the current exception's traceback to a log file; returns its path (None if nothing can be written)."""
    text = f"dti-fast {command} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n{traceback.format_exc()}"
    for folder in (Path.cwd(), Path(tempfile.gettempdir())):
        try:
            fd, name = tempfile.mkstemp(prefix="dti-fast-error-", suffix=".log", dir=folder)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            return Path(name)
        except OSError:
            continue
    return None


# What a command that stopped part way keeps, and how to go on (after a signal or a full disk).
_AGAIN = {
    "generate": "; the images made so far are kept: the same command makes the rest",
    "suite": "; finished stages are kept: the same command continues",
    "interpolate": "; the same command starts the interpolation afresh",
}


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is, as Ctrl-C is (commands without their own handler)."""

    signum = signal.SIGTERM


def _command_signals_and_warnings(command: str):
    """SIGTERM stops the command with its one-line message (not silently), and warnings print as one
    line (``dti-fast generate: warning: ...``, not Python's file/line/source form); returns the undo."""
    import warnings

    def terminated(signum, frame) -> None:
        raise _Terminated

    def one_line(message, category, filename, lineno, file=None, line=None) -> None:
        try:
            print(f"dti-fast {command}: warning: {message}", file=file or sys.stderr)
        except (OSError, ValueError):
            pass

    previous_show = warnings.showwarning
    warnings.showwarning = one_line
    previous_term = None
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        previous_term = signal.signal(signal.SIGTERM, terminated)

    def restore() -> None:
        warnings.showwarning = previous_show
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)

    return restore


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("DTI_FAST_DEBUG"))
    argv = [a for a in argv if a != "--debug"]
    args = build_parser().parse_args(argv)
    if not os.environ.get("DTI_FAST_VERBOSE"):
        _quiet_libraries()
    from .train import JobError, TrainingInterrupted

    restore = _command_signals_and_warnings(args.command)
    try:
        return args.func(args)
    except TrainingInterrupted as err:
        print(f"dti-fast {args.command}: {err}", file=sys.stderr)
        return 128 + err.signum
    except KeyboardInterrupt as err:
        from .train.run import StopSignals

        StopSignals.ignore_on_the_way_out()  # a further Ctrl-C must not cut the message
        hint = _AGAIN.get(args.command, "")
        if args.command == "train":
            hint = (
                "; rerun the same command with --resume to continue from the last checkpoint "
                "(without one it starts afresh)"
            )
        elif getattr(args, "world_command", None) == "build-base":
            hint = "; run the same command again to continue from the last checkpoint of the build"
        signum = getattr(err, "signum", signal.SIGINT)
        what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        print(f"dti-fast {args.command}: {what}{hint}", file=sys.stderr)
        return 128 + signum
    except (ValueError, OSError, JobError) as err:
        if debug:
            raise
        # OSError(errno, message) of our own (no file name) reads better without its "[Errno N]".
        own = isinstance(err, OSError) and err.errno and err.strerror and err.filename is None
        text = err.strerror if own else str(err)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC and args.command != "train":
            text = text.replace(" and rerun with --resume", " and run the same command again") + _AGAIN.get(
                args.command, ""
            )
        print(f"dti-fast {args.command}: error: {text}", file=sys.stderr)
        return 2
    except Exception as err:  # a bug, or a failure nobody foresaw: one line and the traceback in a file
        if debug:
            raise
        log = _log_crash(args.command)
        where = f"; the traceback is in {log}" if log else ""
        print(
            f"dti-fast {args.command}: unexpected error: {type(err).__name__}: {err}{where} (rerun with --debug "
            "to print it; please report it)",
            file=sys.stderr,
        )
        return 1
    finally:
        restore()


def entry() -> None:
    """The ``dti-fast`` console script (and ``python -m dti_fast.cli``): :func:`main`, then exit.

    This process ends when the command returns, so a signal that stopped the
    command makes the rest of its way out ignore further signals
    (:attr:`StopSignals.process_exits_on_stop`); :func:`main` called from
    Python leaves the caller's handlers as they were.
    """
    from .train.run import StopSignals

    StopSignals.process_exits_on_stop = True
    exit_without_teardown(main())


def exit_without_teardown(code: int) -> NoReturn:
    """End this process with ``code`` once its exit handlers ran, skipping the interpreter's teardown.

    After torch, diffusers and transformers are loaded, tearing the interpreter
    down (a garbage collection over every module's objects, then the C++ static
    destructors) takes 1.2-2 s on a 2-core CPU: longer than a 100-step
    one-concept job's training loop there. Nothing in it matters to a finished
    command, whose files are closed and fsynced: so the exit handlers run
    (``atexit``: logging's flush, ``weakref.finalize`` cleanups such as
    temporary folders, multiprocessing's children), stdout and stderr are
    flushed (Python's buffers and the C library's), and the process ends
    with ``os._exit``. The usual exit is kept
    where the teardown may matter: a thread other than daemons still running
    (the usual exit joins it), or a profiler or tracer attached
    (``python -m cProfile``, ``trace``, coverage write their results at exit).
    """
    import atexit
    import threading

    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if others or sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)
    atexit._run_exitfuncs()  # what CPython's own exit calls; a handler that raises has its error printed
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (dti-fast ... | head) or a closed stream: nothing to flush to
            pass
    try:  # what C code printed (extension modules' printf): the C library flushes it only in a normal exit
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):  # no C library to open by that name (Windows)
        pass
    os._exit(code)


if __name__ == "__main__":
    entry()

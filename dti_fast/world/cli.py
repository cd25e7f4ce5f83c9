"""CLI of the toy world: ``dti-fast world build-base`` and ``dti-fast suite --world toy``."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from .. import settings as S


def build_config(args: argparse.Namespace):
    """The :class:`BuildConfig` of parsed ``world build-base`` flags: its defaults, then every field given."""
    from .base import BuildConfig

    return BuildConfig(**S.flag_values(args, BuildConfig))


def _cmd_build_base(args: argparse.Namespace) -> int:
    import errno
    import sys

    from ..models import cache_root, resolve_device
    from ..train.run import OutputLock, StopSignals
    from .base import (
        CHECKPOINTS,
        RUN_ONLY,
        WORLD_VERSION,
        BuildInterrupted,
        build_fingerprint,
        build_world,
        changed_settings,
    )

    cfg = build_config(args)
    cfg.check()  # the settings together (the flags were checked one by one as they were parsed)
    cfg.device = str(resolve_device(cfg.device))  # a device this machine lacks: one line, before any work
    final = Path(args.output) if args.output else cache_root() / f"world-base-v{WORLD_VERSION}"
    if (final / "model_index.json").is_file() and not args.force:
        print(f"{final} exists; --force rebuilds it")
        return 0
    if final.is_dir() and any(final.iterdir()) and not (final / "model_index.json").is_file():
        raise ValueError(  # a finished build replaces a model folder, never other files
            f"{final} holds files but no model (no model_index.json); give a new or empty folder as --output"
        )
    if final.exists() and not final.is_dir():
        raise ValueError(f"{final} is a file; give a new or empty folder as --output")
    # The build happens in a folder beside the output, moved into place when it is complete; a build
    # that stopped keeps its checkpoints there, and the same command continues it.
    work = final.parent / f".{final.name}.partial"
    if args.force and work.exists():
        shutil.rmtree(work)
    with OutputLock(work), StopSignals() as stop:
        finished = not (work / CHECKPOINTS).exists() and all(
            (work / f).is_file() for f in ("model_index.json", "world_build.json", "world_scorer/scorer.json")
        )
        if finished:  # a build that ended just before it was moved into place
            summary = json.loads((work / "world_build.json").read_text(encoding="utf-8"))
            then = {k: v for k, v in (summary.get("config") or {}).items() if k not in RUN_ONLY}
            changed = ", ".join(changed_settings(then, build_fingerprint(cfg)))
            if changed:
                raise ValueError(
                    f"{work} holds a finished build made with other settings ({changed}); run the command "
                    "with its settings to move it into place, or add --force to discard it"
                )
            print(f"the build in {work} had finished; moving it into place")
        elif (work / CHECKPOINTS).is_dir():
            print(f"continuing the unfinished build in {work}")
        try:
            if not finished:
                summary = build_world(
                    work,
                    cfg,
                    scorer_steps=args.scorer_steps,
                    scorer_minutes=args.scorer_minutes,
                    parallel=not args.serial_scorer,
                    stop=stop,
                )
        except BuildInterrupted as err:
            print(f"dti-fast world build-base: {err}", file=sys.stderr)
            return 128 + err.signum
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise OSError(
                    errno.ENOSPC,
                    f"disk full while building into {work}: free space on that disk and run the same "
                    "command again; the build continues from its last checkpoint",
                ) from err
            raise
        (work / ".dti_fast.lock").unlink(missing_ok=True)  # the lock itself holds until this block ends
        old = final.parent / f".{final.name}.replaced"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)  # the previous model stays whole until the new one is in place
        work.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    keys = (
        "render_s",
        "vae_s",
        "vae_steps_done",
        "vae_heldout_mae_0_255",
        "encode_s",
        "unet_s",
        "steps_done",
        "unet_loss",
        "scorer_s",
        "total_s",
    )
    print(json.dumps({k: summary.get(k) for k in keys}, indent=1))
    print(f"world base model: {final}")
    if not args.output:  # the suite's cache folder: a build there replaces the shipped model for the suite
        print(
            "the toy suite now uses this model instead of the shipped one: `dti-fast world gate` checks it; "
            f"remove {final} to go back to the shipped model"
        )
    return 0


def _cmd_gate(args: argparse.Namespace) -> int:
    import torch

    from ..generate import load_pipeline
    from . import scoring as S
    from .base import world_model_path
    from .suite import GATE_SEED, base_model_gate

    model = Path(args.model) if args.model else world_model_path()
    if not (model / "world_scorer" / "scorer.safetensors").is_file():
        raise FileNotFoundError(
            f"{model} has no world_scorer/scorer.safetensors: give a folder made by dti-fast world build-base"
        )
    from ..io import check_output_folder, first_line

    if args.output is not None:
        check_output_folder(args.output, owner="dti-fast world gate", may_hold_others=True)
    torch.set_num_threads(args.threads)
    try:
        scorer = S.load_scorer(model / "world_scorer")
    except Exception as err:  # safetensors and torch raise several types for a damaged file
        raise ValueError(
            f"{model / 'world_scorer'} is damaged ({type(err).__name__}: {first_line(err)}); "
            "build the model again (dti-fast world build-base --force with its settings)"
        ) from err
    pipe = load_pipeline(str(model), device="cpu", dtype="fp32")
    seed = GATE_SEED if args.prompt_seed is None else args.prompt_seed
    g = base_model_gate(pipe, scorer, args.prompts, seed, args.inference_steps, args.guidance, args.output)
    print(
        json.dumps(
            {
                "model": str(model),
                "prompts": args.prompts,
                "prompt_seed": seed,
                "text_fidelity": round(g["text_fidelity"], 4),
                "pass": g["pass"],
                "per_attribute": {k: round(v, 3) for k, v in g["per_attribute"].items()},
                # The same scenes rendered and passed through the model's VAE: the most the gate can read.
                "vae_ceiling": round(g["vae_ceiling"]["text_fidelity"], 4),
                "vae_ceiling_per_attribute": {k: round(v, 3) for k, v in g["vae_ceiling"]["per_attribute"].items()},
            },
            indent=1,
        )
    )
    return 0


#: The most captions one gate samples (an image each, about 0.1 s on a CPU core).
MAX_GATE_PROMPTS = 10_000


def _gate_count(text: str) -> int:
    value = S.argparse_type(S.POSITIVE_INT)(text)
    if value > MAX_GATE_PROMPTS:
        raise argparse.ArgumentTypeError(f"at most {MAX_GATE_PROMPTS} captions, got {value}")
    return value


def add_world_parser(sub) -> None:
    """``dti-fast world build-base`` and ``dti-fast world gate``."""
    from .base import BuildConfig

    world = sub.add_parser("world", help="the toy world: a base model trained from scratch on procedural scenes")
    wsub = world.add_subparsers(dest="world_command", required=True)
    p = wsub.add_parser(
        "build-base",
        help="train the toy world's base model (VAE, text encoder, UNet) and its scorer",
        description="Render the world, train a small AutoencoderKL, then a CLIP text encoder and a "
        "UNet jointly from scratch (zero terminal SNR with the v target by default; --no-zero-snr: SD's "
        "schedule and the epsilon target), and the pixel scorer beside the VAE; seeded. The defaults are "
        "sized to 30 minutes on a 2-core AMD EPYC (53 on a 2-core Intel Xeon). --resume-from trains a "
        "further stage on a built model. Writes "
        "a diffusers SD folder (default: the cache folder the suite uses), built beside it in .<name>.partial "
        "and moved into place when complete; an unfinished build continues when the same command runs "
        "again. README: what the default recipe reaches and the stages that made the shipped model.",
    )
    p.add_argument("--output", type=Path, help="model folder (default <cache>/world-base-v<version>)")
    S.add_arguments(p, BuildConfig)
    p.add_argument(
        "--scorer-steps",
        type=S.argparse_type(S.POSITIVE_INT),
        default=2000,
        help="scorer CNN steps (default 2000)",
    )
    p.add_argument("--scorer-minutes", type=S.argparse_type(S.POSITIVE_FLOAT), help="wall budget of the scorer stage")
    p.add_argument(
        "--serial-scorer",
        action="store_true",
        help="train the scorer after the base model instead of beside it in a second process (one core)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="rebuild even if the output folder has a model; an unfinished build of it is discarded",
    )
    p.set_defaults(func=_cmd_build_base)

    g = wsub.add_parser(
        "gate",
        help="the base-model sanity gate alone: text fidelity on held-out combinations",
        description="Sample the base model alone on full captions of held-out (shape, colour, background) "
        "combinations and read the images with the folder's scorer; prints the text fidelity (pass: >= 0.8) "
        "and its attributes as JSON. The suite runs the same gate (its default draw, 96 prompts).",
    )
    g.add_argument("--model", help="a world base model folder (default: the shipped one, from the cache)")
    count, seed, scale = (S.argparse_type(k) for k in (S.POSITIVE_INT, S.NONNEG_INT, S.NONNEG_FLOAT))
    g.add_argument(
        "--prompts", type=_gate_count, default=96, help=f"held-out captions, at most {MAX_GATE_PROMPTS} (default 96)"
    )
    g.add_argument("--prompt-seed", type=seed, help="seed of the caption draw (default: the suite's)")
    g.add_argument("--inference-steps", type=count, default=20, help="DDIM steps (default 20)")
    g.add_argument("--guidance", type=scale, default=4.0, help="classifier-free guidance (default 4)")
    g.add_argument("--threads", type=count, default=1, help="torch threads (default 1)")
    g.add_argument("--output", type=S.argparse_type(S.PATH), help="write gate.png (the images) into this folder")
    g.set_defaults(func=_cmd_gate)


def add_toy_suite_flags(p) -> None:
    """``--world toy`` (and its knobs) for ``dti-fast suite``."""
    p.add_argument(
        "--world",
        choices=["toy"],
        help="run the suite in the procedural toy world (no pretrained "
        "weights: the shipped world base model, pixel scorers); --quick then is its smoke test",
    )
    p.add_argument(
        "--world-draws",
        type=S.argparse_type(S.POSITIVE_INT),
        help="toy world: prompts per complexity level and concept (default 2)",
    )


def run_toy_suite(args: argparse.Namespace) -> int:
    from .suite import ToySuiteConfig
    from .suite import run_toy_suite as run

    out = args.output_dir or Path("dti-suite-toy")
    cfg = (
        ToySuiteConfig.quick_config(out, args.model) if args.quick else ToySuiteConfig(output_dir=out, model=args.model)
    )
    for key, attr in (
        ("steps", "steps"),
        ("batch_size", "batch_size"),
        ("inference_steps", "inference_steps"),
        ("guidance", "guidance"),
        ("seed", "seed"),
        ("slerp_steps", "slerp_steps"),
        ("world_draws", "draws"),
    ):
        value = getattr(args, key, None)
        if value is not None:
            setattr(cfg, attr, value)
    if getattr(args, "seeds", None):
        cfg.seeds = tuple(args.seeds)
    if getattr(args, "methods", None):
        cfg.methods = tuple(args.methods)
    if getattr(args, "slerp_pair", None):
        cfg.slerp_pair = tuple(args.slerp_pair)
    cfg.progress = getattr(args, "progress", None) is not False
    report = run(cfg)
    print(
        f"\ntoy-world suite finished in {report['total_seconds']:.0f} s; base-model gate "
        f"{report['gate']['text_fidelity']:.3f} ({'pass' if report['gate']['pass'] else 'FAIL'})"
    )
    print(f"  {'method':<12}{'subject':>10}{'text':>10}")
    for m, row in report["table"].items():
        print(f"  {m:<12}{row['subject'] or float('nan'):>10.4f}{row['text'] or float('nan'):>10.4f}")
    print(f"report: {Path(cfg.output_dir) / 'report.md'}")
    return 0

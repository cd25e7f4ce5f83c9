"""CLI of the toy world: ``dti-fast world build-base`` and ``dti-fast suite --world toy``."""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import fields
from pathlib import Path


def _cmd_build_base(args: argparse.Namespace) -> int:
    import tempfile

    from ..models import cache_root
    from .base import WORLD_VERSION, BuildConfig, build_world

    cfg = BuildConfig()
    for f in fields(BuildConfig):  # every BuildConfig field that has a flag and was given
        if getattr(args, f.name, None) is not None:
            setattr(cfg, f.name, getattr(args, f.name))
    final = Path(args.output) if args.output else cache_root() / f"world-base-v{WORLD_VERSION}"
    if (final / "model_index.json").is_file() and not args.force:
        print(f"{final} exists; --force rebuilds it")
        return 0
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".world-build-", dir=final.parent))
    try:
        summary = build_world(
            tmp,
            cfg,
            scorer_steps=args.scorer_steps,
            scorer_minutes=args.scorer_minutes,
            parallel=not args.serial_scorer,
        )
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
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
    return 0


def add_world_parser(sub) -> None:
    """``dti-fast world build-base``."""
    from .base import BuildConfig

    world = sub.add_parser("world", help="the toy world: a base model trained from scratch on procedural scenes")
    wsub = world.add_subparsers(dest="world_command", required=True)
    p = wsub.add_parser(
        "build-base",
        help="train the toy world's base model (VAE, text encoder, UNet) and its scorer",
        description="Render the world, train a small AutoencoderKL, then a CLIP text encoder and a "
        "UNet jointly from scratch (DDPM epsilon MSE), then the pixel scorer; seeded. Writes a "
        "diffusers SD folder (default: the cache folder the suite uses).",
    )
    p.add_argument("--output", type=Path, help="model folder (default <cache>/world-base-v<version>)")
    p.add_argument("--seed", type=int, default=0)
    d = BuildConfig()
    p.add_argument("--images", type=int, help=f"renders in the training set (default {d.images})")
    p.add_argument("--vae-steps", type=int, help=f"VAE steps (default {d.vae_steps})")
    p.add_argument("--steps", type=int, help=f"text encoder + UNet steps (default {d.steps})")
    p.add_argument("--batch", type=int, help=f"text encoder + UNet batch (default {d.batch})")
    p.add_argument(
        "--offset-noise",
        type=float,
        help="std of a per-image, per-channel constant added to the training noise, e.g. 0.3 (default: white "
        "noise, the shipped model's recipe)",
    )
    p.add_argument(
        "--pyramid",
        type=float,
        help="instead of offset noise: noise at every coarser octave, this weight ratio per octave (default off)",
    )
    p.add_argument(
        "--zero-snr",
        action="store_true",
        default=None,
        help="zero terminal SNR with v-prediction (trailing sampling steps), saved in the scheduler config",
    )
    p.add_argument("--ema", type=float, help="save a weight average with this decay, e.g. 0.999 (default: raw weights)")
    p.add_argument("--minutes", type=float, help="wall budget of the UNet stage: fewer steps if needed (logged)")
    p.add_argument("--vae-minutes", type=float, help="wall budget of the VAE stage")
    p.add_argument("--lr", type=float, help=f"text encoder + UNet peak learning rate (default {d.lr:g})")
    p.add_argument(
        "--resume-from",
        help="continue this built model: keep its VAE, train its text encoder + UNet "
        "--steps more (a second stage; the shipped model has one)",
    )
    p.add_argument("--scorer-steps", type=int, default=2000, help="scorer CNN steps (default 2000)")
    p.add_argument("--scorer-minutes", type=float, help="wall budget of the scorer stage")
    p.add_argument(
        "--serial-scorer",
        action="store_true",
        help="train the scorer after the base model instead of beside it in a second process (one core)",
    )
    p.add_argument("--force", action="store_true", help="rebuild even if the output folder has a model")
    p.set_defaults(func=_cmd_build_base)


def add_toy_suite_flags(p) -> None:
    """``--world toy`` (and its knobs) for ``dti-fast suite``."""
    p.add_argument(
        "--world",
        choices=["toy"],
        help="run the suite in the procedural toy world (no pretrained "
        "weights: the shipped world base model, pixel scorers); --quick then is its smoke test",
    )
    p.add_argument("--world-draws", type=int, help="toy world: prompts per complexity level and concept (default 2)")


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

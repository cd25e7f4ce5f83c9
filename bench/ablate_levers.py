"""Per-lever step times of the trainer on the CPU tiny models (or a GPU with --device cuda).

Each variant adds one lever to the previous one; all are timed in the same
process, interleaved over rounds, and reported as the median ms per job step
and the ratio to the first variant. Run: python bench/ablate_levers.py [--family sd|sdxl]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dti_fast.data import Concept, load_concept_images
from dti_fast.demo import demo_images_dir
from dti_fast.distributed import DistContext
from dti_fast.testing import tiny_model_path
from dti_fast.train import TrainConfig, TrainingJob

SUBJECTS = {"dog": "dog", "clock": "clock", "backpack": "red backpack"}
VARIANTS = [
    ("VAE encode every step", dict(latent_cache=False, text_cache=False)),
    ("+ latent cache", dict(text_cache=False)),
    ("+ channels-last", dict(channels_last=True, text_cache=False)),
    ("+ text cache", dict(channels_last=True, text_cache=True)),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="sd", choices=["sd", "sdxl"])
    ap.add_argument("--concepts", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = list(SUBJECTS)
    concepts = [
        Concept(f"c{i}", demo_images_dir() / names[i % 3], SUBJECTS[names[i % 3]]) for i in range(args.concepts)
    ]
    images = [load_concept_images(c, 64) for c in concepts]
    jobs = []
    for label, kw in VARIANTS:
        out = Path(tempfile.mkdtemp())
        cfg = TrainConfig(
            model=str(tiny_model_path(args.family)),
            output_dir=out,
            concepts=concepts,
            steps=10**6,
            batch_size=args.batch_size,
            resolution=64,
            progress=False,
            device=args.device,
            **kw,
        )
        job = TrainingJob(cfg, images, DistContext(), out / "checkpoints")
        job.step()  # warm-up
        jobs.append((label, job))
    times = {label: [] for label, _ in VARIANTS}
    for _ in range(args.rounds):
        for label, job in jobs:
            start = time.perf_counter()
            for _ in range(args.steps):
                job.step()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[label].append((time.perf_counter() - start) / args.steps)
    base = statistics.median(times[VARIANTS[0][0]])
    images_per_step = args.concepts * args.batch_size
    print(
        f"tiny-{args.family}, {args.concepts} concepts x batch {args.batch_size} = {images_per_step} images/step, "
        f"{args.device}, {args.threads} thread(s), median of {args.rounds} rounds x {args.steps} steps"
    )
    for label, _ in VARIANTS:
        t = statistics.median(times[label])
        print(f"  {label:24s} {t * 1e3:7.1f} ms/step  {images_per_step / t:7.1f} img/s  {base / t:5.2f}x")


if __name__ == "__main__":
    main()

"""Training throughput and memory: dti_fast with all levers against a stand-in for the diffusers example's loop.

Run: ``python -m pytest bench/bench_trainer.py --benchmark-only``
(``DTI_BENCH_OUT=ratios.json`` also writes the ratio summary; see bench/README.md).

Cases (the ``case`` part of a test id):

- ``tiny-sd-64``, ``tiny-sdxl-64``: the tiny random-weight models
  (:func:`dti_fast.testing.tiny_model_path`) at 64 px. CPU only.
- ``sd15-512``, ``sdxl-1024``: SD 1.5 and SDXL architectures at their real
  sizes with random weights (:mod:`dti_fast.testing.archs`; built on the GPU and
  written as a bf16 diffusers folder once per session, no downloads) at 512
  and 1024 px. CUDA only.

Runs (the last part of a test id), in this order within a case:

- ``mfu``: the FLOPs of one UNet forward+backward (gradient to the text
  conditioning, frozen weights, as in textual inversion) counted with
  ``torch.utils.flop_counter.FlopCounterMode``, timed, and divided by a
  matmul peak measured in the same process (bf16 8192^3 on a GPU; fp32
  1024^3 on the CPU).
- ``baseline``: one concept trained the way diffusers' textual-inversion
  example does, by an in-process stand-in (``bench/_baseline.py``, not the
  script; its differences are listed in the summary and bench/README.md):
  VAE encode every step, AdamW over the full embedding table with frozen-row
  restore, bf16 + SDPA on a GPU. ``test_vs_diffusers_script`` (given
  ``DTI_DIFFUSERS_CHECKOUT``) runs the script itself.
- ``dti-1``: the same concept, steps and batch with ``dti_fast.train.train``
  and all levers.
- ``dti-32``: a 32-concept job (the four shipped subjects under 32 names).
- ``recipe`` (the SDXL cases): concepts per hour with the paper's recipe
  (400 steps of batch 4 at 768 px; the tiny case at 64 px), all levers, a
  16-concept job (4 on the CPU) of a few steps extrapolated to 400 (see
  :func:`run_recipe`).
- ``resume`` (the SD cases): a job stopped halfway and resumed against one
  run straight through, with and without ``deterministic``: the largest
  difference of the learned vectors.
- ``max-concurrent`` (``sdxl-1024`` only): the most SDXL concepts (one image
  each) whose training step fits at once, as found by the trainer's
  ``max_batch="auto"`` with gradient checkpointing.

``DTI_BENCH_RUNS`` (run names, space-separated) runs only those runs;
``bench/gpu_check.sh`` runs ``recipe`` and ``resume`` in its own opt-in stage.

Every figure is measured in this process and recorded with the device's name;
``bench/conftest.py`` turns them into ratios and checks them against the goals
(reported, never asserted). Each run happens once (``benchmark.pedantic``,
one round): pytest-benchmark's own time is the whole call, model load included;
the figures use the training-loop times the runs measure themselves.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from _machine import cpu_model

from dti_fast.data import Concept
from dti_fast.demo import demo_images_dir

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
# The tiny model gains nothing from a second thread, and on shared cores a
# preempted second thread stalls every op; DTI_BENCH_THREADS overrides.
CPU_THREADS = int(os.environ.get("DTI_BENCH_THREADS", "1"))
# Largest SDXL job the max-concurrent run offers the trainer (the figure is capped there).
MAX_CONCEPTS = int(os.environ.get("DTI_BENCH_MAX_CONCEPTS", "128"))

# The shipped subjects and single-token initializers (the example needs one token).
SUBJECTS = (("dog", "dog"), ("cat2", "cat"), ("clock", "clock"), ("backpack", "backpack"))


@dataclass(frozen=True)
class Case:
    id: str
    family: str
    tiny: bool  # the tiny model (CPU) or the full-size architecture (CUDA)
    resolution: int
    one_steps: int  # steps of the one-concept runs (baseline, dti-1)
    batch: int  # images per concept per step
    job_concepts: int
    job_steps: int  # steps per concept of the 32-concept job
    mfu_batch: int
    max_concurrent: bool = False
    # The paper's recipe run (``recipe``): this many concepts at recipe_resolution, the paper's batch, all
    # levers, recipe_steps steps measured (the figure extrapolates to PAPER_STEPS); 0 concepts: no run.
    recipe_concepts: int = 0
    recipe_steps: int = 0
    recipe_resolution: int = 0
    # The resume run (``resume``): resume_steps steps straight and stopped halfway then resumed, with and
    # without --deterministic; 0: no run.
    resume_steps: int = 0


#: The paper's recipe for the concepts-per-hour figure: 400 steps of batch 4 at 768 px (SDXL).
PAPER_STEPS, PAPER_BATCH, PAPER_RESOLUTION = 400, 4, 768

CASES = [
    Case(
        "tiny-sd-64", "sd", True, 64, one_steps=50, batch=4, job_concepts=32, job_steps=10, mfu_batch=16, resume_steps=4
    ),
    Case(
        "tiny-sdxl-64",
        "sdxl",
        True,
        64,
        one_steps=50,
        batch=4,
        job_concepts=32,
        job_steps=10,
        mfu_batch=16,
        recipe_concepts=4,
        recipe_steps=3,
        recipe_resolution=64,
    ),
    Case(
        "sd15-512", "sd", False, 512, one_steps=30, batch=4, job_concepts=32, job_steps=8, mfu_batch=16, resume_steps=6
    ),
    Case(
        "sdxl-1024",
        "sdxl",
        False,
        1024,
        one_steps=12,
        batch=4,
        job_concepts=32,
        job_steps=3,
        mfu_batch=8,
        max_concurrent=True,
        recipe_concepts=16,
        recipe_steps=6,
        recipe_resolution=PAPER_RESOLUTION,
    ),
]
#: The runs, each where its case has it; DTI_BENCH_RUNS (names, space-separated) picks some.
RUNS = ("mfu", "baseline", "dti-1", "dti-32", "recipe", "resume", "max-concurrent")


def _wanted_runs() -> tuple[str, ...]:
    names = os.environ.get("DTI_BENCH_RUNS", "").split()
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        raise pytest.UsageError(f"DTI_BENCH_RUNS names unknown runs {unknown}; runs: {' '.join(RUNS)}")
    return tuple(names) or RUNS


def levers(memory: bool = False) -> dict:
    """dti_fast's levers for the speed runs (``memory``: the max-concurrent run, checkpointing on)."""
    return dict(
        latent_cache=True,
        text_cache="auto",  # on for SDXL; no gain measured for SD
        attention="sdpa",
        channels_last=True,
        gradient_checkpointing=memory,  # a memory lever: it costs speed, so only where memory is the figure
        optim_bits=32,  # DTI's SphericalSGD keeps one fp32 scalar per row; 8-bit applies to TI's AdamW
    )


def device_name() -> str:
    return torch.cuda.get_device_name(DEVICE) if CUDA else cpu_model()


def _params():
    out = []
    wanted = _wanted_runs()
    for case in CASES:
        for run in RUNS:
            if run not in wanted:
                continue
            if run == "max-concurrent" and not case.max_concurrent:
                continue
            if (run == "recipe" and not case.recipe_concepts) or (run == "resume" and not case.resume_steps):
                continue
            marks = []
            if not case.tiny and not CUDA:
                marks.append(pytest.mark.skip(reason="full-size SD 1.5 / SDXL architectures: CUDA only"))
            elif case.tiny and CUDA:
                marks.append(
                    pytest.mark.skip(reason="the tiny model is the CPU case; a GPU runs the real architectures")
                )
            out.append(pytest.param(case, run, id=f"{case.id}-{run}", marks=marks))
    return out


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize(DEVICE)


def _free() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


# -- inputs: models and images, made once per session --------------------------------------


class _Inputs:
    """Model folders and image folders, built on first use and deleted at the end of the session."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.models: dict[str, Path] = {}
        self.model_seconds: dict[str, float] = {}
        self.image_roots: dict[int, Path] = {}

    def model(self, case: Case) -> Path:
        if case.id not in self.models:
            t0 = time.perf_counter()
            if case.tiny:
                from dti_fast.testing import tiny_model_path

                self.models[case.id] = tiny_model_path(case.family)
            else:
                from dti_fast.testing.archs import make_full_size_model

                # Random weights straight on the GPU, saved in bf16 (2.1 GB / 6.9 GB).
                self.models[case.id] = make_full_size_model(
                    self.root / f"model-{case.id}", case.family, dtype=torch.bfloat16, device=DEVICE
                )
                _free()
            self.model_seconds[case.id] = time.perf_counter() - t0
        return self.models[case.id]

    def images(self, resolution: int) -> Path:
        """Subject folders with images at least ``resolution`` px (the shipped ones are 384 px, upscaled here)."""
        if resolution <= 384:
            return demo_images_dir()
        if resolution not in self.image_roots:
            from PIL import Image

            root = self.root / f"images-{resolution}"
            for subject, _ in SUBJECTS:
                (root / subject).mkdir(parents=True, exist_ok=True)
                for src in sorted((demo_images_dir() / subject).glob("*.jpg")):
                    with Image.open(src) as im:
                        im.convert("RGB").resize((resolution, resolution), Image.Resampling.BICUBIC).save(
                            root / subject / src.name, quality=95
                        )
            self.image_roots[resolution] = root
        return self.image_roots[resolution]

    def single_image_folders(self, resolution: int, n: int) -> list[tuple[Path, str]]:
        """``n`` folders of one image each (cycling through the subjects' images), with initializers."""
        src_root = self.images(resolution)
        files = [(p, init) for subject, init in SUBJECTS for p in sorted((src_root / subject).glob("*.jpg"))]
        out = []
        for i in range(n):
            path, init = files[i % len(files)]
            folder = self.root / f"single-{resolution}" / f"{i:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            link = folder / path.name
            if not link.exists():
                link.symlink_to(path)
            out.append((folder, init))
        return out

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    store = _Inputs(tmp_path_factory.mktemp("bench-trainer"))
    yield store
    store.close()


@pytest.fixture(scope="module", autouse=True)
def _threads():
    before = torch.get_num_threads()
    if not CUDA:
        torch.set_num_threads(CPU_THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _release_memory():
    yield
    _free()


def job_concepts(images_root: Path, n: int, prefix: str = "c") -> list[Concept]:
    """``n`` concepts cycling through the shipped subjects (each name its own concept)."""
    return [
        Concept(
            name=f"{prefix}{i:03d}-{SUBJECTS[i % len(SUBJECTS)][0]}",
            images=images_root / SUBJECTS[i % len(SUBJECTS)][0],
            init=SUBJECTS[i % len(SUBJECTS)][1],
        )
        for i in range(n)
    ]


# -- measurements ------------------------------------------------------------------------------

_PEAK: dict[str, float] = {}


def matmul_peak_flops() -> dict:
    """The best FLOP/s of a large square matmul in the training dtype, measured once per process."""
    if "flops" not in _PEAK:
        n, reps, inner = (8192, 5, 10) if CUDA else (1024, 5, 3)
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        a = torch.randn(n, n, device=DEVICE, dtype=DTYPE, generator=gen)
        b = torch.randn(n, n, device=DEVICE, dtype=DTYPE, generator=gen)
        c = torch.empty(n, n, device=DEVICE, dtype=DTYPE)
        for _ in range(3):
            torch.mm(a, b, out=c)
        _sync()
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(inner):
                torch.mm(a, b, out=c)
            _sync()
            best = min(best, (time.perf_counter() - t0) / inner)
        _PEAK.update(flops=2 * n**3 / best, n=n)
        del a, b, c
        _free()
    return {
        "matmul_peak_flops": _PEAK["flops"],
        "matmul_n": _PEAK["n"],
        "matmul_dtype": str(DTYPE).replace("torch.", ""),
    }


def run_mfu(case: Case, model: Path) -> dict:
    """FLOPs and time of one UNet forward+backward at ``case.mfu_batch`` (halved on CUDA out-of-memory)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from dti_fast.models import load_model_parts

    peak = matmul_peak_flops()
    parts = load_model_parts(str(model), dtype=DTYPE, device=str(DEVICE))
    unet = parts.unet
    del parts  # only the UNet is measured
    _free()
    unet.set_attn_processor(AttnProcessor2_0())
    unet.to(memory_format=torch.channels_last)
    batch = case.mfu_batch
    while True:
        try:
            figures = _unet_fwd_bwd(unet, batch, case.resolution)
            break
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
        _free()
        batch //= 2
    achieved = figures["flops"] / figures["seconds"]
    return {
        "batch": batch,
        "resolution": case.resolution,
        "unet_params": sum(p.numel() for p in unet.parameters()),
        **figures,
        "achieved_flops": achieved,
        **peak,
        "mfu": achieved / peak["matmul_peak_flops"],
    }


def _unet_fwd_bwd(unet, b: int, resolution: int) -> dict:
    """Count and time one forward+backward of ``unet`` (sdpa, channels_last, the training dtype) at batch ``b``.

    The gradient flows to the text conditioning (hidden states; SDXL also the pooled
    embedding), the UNet's weights frozen: textual inversion's backward.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = unet.config
    lat = resolution // 8
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    sample = torch.randn(b, cfg.in_channels, lat, lat, device=DEVICE, dtype=DTYPE, generator=gen)
    sample = sample.contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (b,), device=DEVICE, generator=gen)
    hidden = torch.randn(b, 77, cfg.cross_attention_dim, device=DEVICE, dtype=DTYPE, generator=gen, requires_grad=True)
    kwargs = {}
    leaves = [hidden]
    if cfg.addition_embed_type == "text_time":
        pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        pooled = torch.randn(b, pooled_dim, device=DEVICE, dtype=DTYPE, generator=gen, requires_grad=True)
        time_ids = torch.tensor([[resolution] * 2 + [0, 0] + [resolution] * 2] * b, device=DEVICE, dtype=DTYPE)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        leaves.append(pooled)

    def step() -> None:
        pred = unet(sample, t, encoder_hidden_states=hidden, **kwargs).sample
        pred.float().square().mean().backward()
        for leaf in leaves:
            leaf.grad = None

    # The CPU's fused SDPA kernel is not in the FLOP counter's table: count with the math
    # backend there (same matmuls); CUDA's flash / efficient / cuDNN kernels are counted.
    count_ctx = sdpa_kernel([SDPBackend.MATH]) if not CUDA else contextlib.nullcontext()
    with count_ctx, FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    for _ in range(2):
        step()
    _sync()
    times = []
    for _ in range(5 if CUDA else 3):
        t0 = time.perf_counter()
        step()
        _sync()
        times.append(time.perf_counter() - t0)
    return {"flops": flops, "seconds": statistics.median(times), "seconds_all": times}


def run_baseline_case(case: Case, model: Path, inputs: _Inputs) -> dict:
    from _baseline import run_baseline

    subject, init = SUBJECTS[0]

    def run(checkpointing: bool) -> dict:
        r = run_baseline(
            model,
            inputs.images(case.resolution) / subject,
            init,
            steps=case.one_steps,
            batch_size=case.batch,
            resolution=case.resolution,
            gradient_checkpointing=checkpointing,
        )
        return {
            "concepts": 1,
            "steps": r.steps,
            "batch": r.batch_size,
            "samples": r.samples,
            "seconds": r.seconds,
            "load_seconds": r.load_seconds,
            "setup_seconds": r.setup_seconds,
            "peak_memory": r.peak_memory,
            "samples_per_second": r.samples_per_second,
            "seconds_per_step": r.seconds_per_step,
            "final_loss": r.final_loss,
            "train_device": r.device,
            "gradient_checkpointing": checkpointing,
        }

    return _checkpointing_if_oom(run)


def _checkpointing_if_oom(run) -> dict:
    """``run(False)``; on CUDA out-of-memory, ``run(True)`` (gradient checkpointing), recorded as such."""
    try:
        return run(False)
    except torch.cuda.OutOfMemoryError:
        pass  # leaving the except block drops the traceback and the tensors it holds
    _free()
    figures = run(True)
    figures["out_of_memory_without_checkpointing"] = True
    return figures


def run_dti(
    case: Case,
    model: Path,
    concepts: list[Concept],
    out: Path,
    *,
    steps: int,
    batch: int,
    max_batch,
    memory: bool = False,
    resolution: int | None = None,
) -> dict:
    from dti_fast.train import TrainConfig, train

    lv = levers(memory)
    cfg = TrainConfig(
        model=str(model),
        output_dir=out,
        concepts=concepts,
        steps=steps,
        batch_size=batch,
        max_batch=max_batch,
        resolution=resolution or case.resolution,
        progress=False,
        checkpoint_every=10**9,
        **lv,
    )
    t0 = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return {
        "concepts": len(concepts),
        "steps": steps,
        "batch": batch,
        "max_batch": max_batch,
        "samples": result.samples,
        "seconds": result.seconds,
        "wall_seconds": wall,
        "setup_seconds": wall - result.seconds,
        "job_steps": result.job_steps,
        "batch_per_step": getattr(result, "batch_per_step", None),
        "peak_memory": getattr(result, "peak_memory", None),
        "samples_per_second": result.samples / result.seconds if result.seconds > 0 else None,
        "concepts_per_hour": len(concepts) * 3600 / result.seconds if result.seconds > 0 else None,
        "skipped_steps": result.skipped_steps,
        "train_device": getattr(result, "device", None),
        "gradient_checkpointing": lv["gradient_checkpointing"],
        "levers": lv,
    }


def run_recipe(case: Case, model: Path, inputs: _Inputs, out: Path) -> dict:
    """Concepts per hour with the paper's recipe (PAPER_STEPS steps of batch PAPER_BATCH), all levers.

    A job of ``case.recipe_concepts`` concepts trains ``case.recipe_steps`` steps (the trainer fills the
    device: ``max_batch="auto"``); the loop's seconds per concept-step, first steps included, extrapolate
    to PAPER_STEPS steps per concept, and the job's setup (model load, latent and text caches, planning,
    export) is counted once: concepts * 3600 / (setup + PAPER_STEPS * concepts * seconds per concept-step).
    """
    images = inputs.images(case.recipe_resolution)
    concepts = job_concepts(images, case.recipe_concepts, prefix="r")
    r = run_dti(
        case,
        model,
        concepts,
        out,
        steps=case.recipe_steps,
        batch=PAPER_BATCH,
        max_batch="auto",
        resolution=case.recipe_resolution,
    )
    n = len(concepts)
    per_concept_step = r["seconds"] / (n * case.recipe_steps)
    loop = PAPER_STEPS * n * per_concept_step
    r.update(
        recipe={"steps": PAPER_STEPS, "batch": PAPER_BATCH, "resolution": case.recipe_resolution},
        measured_steps=case.recipe_steps,
        seconds_per_concept_step=per_concept_step,
        recipe_job_seconds=r["setup_seconds"] + loop,
        recipe_concepts_per_hour=n * 3600 / (r["setup_seconds"] + loop),
        recipe_concepts_per_hour_loop_only=n * 3600 / loop,
        extrapolated=f"{case.recipe_steps} steps measured, {PAPER_STEPS} extrapolated from their seconds "
        "per concept-step; the job's setup counted once",
    )
    return r


def run_resume(case: Case, model: Path, inputs: _Inputs, out: Path) -> dict:
    """How far a stopped and resumed job ends from an uninterrupted one, with and without --deterministic.

    One concept, ``case.resume_steps`` steps of batch ``case.batch``, all levers: straight through, and
    stopped after half the steps (a checkpoint) then resumed to the end. On the CPU both differences are
    0 (bit-identical); on CUDA, SDPA's backward and ``index_add`` may differ from run to run unless
    ``deterministic`` is set. The largest absolute difference of the learned vectors is reported.
    """
    from dti_fast.train import TrainConfig, train

    n = case.resume_steps
    half = n // 2
    concepts = job_concepts(inputs.images(case.resolution), 1, prefix="z")

    def job(folder: Path, steps: int, resume: bool, deterministic: bool):
        cfg = TrainConfig(
            model=str(model),
            output_dir=folder,
            concepts=concepts,
            steps=steps,
            batch_size=case.batch,
            resolution=case.resolution,
            progress=False,
            checkpoint_every=half,
            resume=resume,
            deterministic=deterministic,
            **levers(),
        )
        return train(cfg)

    def largest_difference(a, b) -> float:
        return max(float((x - y).abs().max()) for name in a.vectors for x, y in zip(a.vectors[name], b.vectors[name]))

    figures: dict = {"steps": n, "stopped_at": half, "batch": case.batch, "concepts": 1}
    straight = {}
    for deterministic in (False, True):
        tag = "deterministic" if deterministic else "default"
        t0 = time.perf_counter()
        straight[tag] = job(out / f"straight-{tag}", n, False, deterministic)
        figures[f"{tag}_straight_seconds"] = time.perf_counter() - t0
        job(out / f"stopped-{tag}", half, False, deterministic)
        resumed = job(out / f"stopped-{tag}", n, True, deterministic)
        figures[f"resume_max_abs_diff_{tag}"] = largest_difference(straight[tag], resumed)
        figures[f"{tag}_loop_seconds"] = straight[tag].seconds
    figures["max_abs_diff_default_vs_deterministic"] = largest_difference(
        straight["default"], straight["deterministic"]
    )
    figures["vector_norm"] = max(float(v.norm(dim=-1).max()) for vs in straight["default"].vectors.values() for v in vs)
    shutil.rmtree(out, ignore_errors=True)
    return figures


def run_max_concurrent(case: Case, model: Path, inputs: _Inputs, out: Path) -> dict:
    folders = inputs.single_image_folders(case.resolution, MAX_CONCEPTS)
    concepts = [Concept(name=f"m{i:04d}", images=folder, init=init) for i, (folder, init) in enumerate(folders)]
    r = run_dti(case, model, concepts, out, steps=1, batch=1, max_batch="auto", memory=True)
    found = r["batch_per_step"]
    r.update(max_concurrent_concepts=found, offered=MAX_CONCEPTS, capped=found is not None and found >= MAX_CONCEPTS)
    return r


# -- the benchmark -----------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "run"), _params())
def test_trainer(benchmark, bench_results, inputs, tmp_path, case: Case, run: str) -> None:
    benchmark.group = case.id
    model = inputs.model(case)
    images = inputs.images(case.resolution)

    def call() -> dict:
        if run == "mfu":
            return run_mfu(case, model)
        if run == "baseline":
            return run_baseline_case(case, model, inputs)
        if run == "dti-1":
            return _checkpointing_if_oom(
                lambda memory: run_dti(
                    case,
                    model,
                    job_concepts(images, 1),
                    tmp_path / "out",
                    steps=case.one_steps,
                    batch=case.batch,
                    max_batch=None,
                    memory=memory,
                )
            )
        if run == "dti-32":
            return run_dti(
                case,
                model,
                job_concepts(images, case.job_concepts),
                tmp_path / "out",
                steps=case.job_steps,
                batch=case.batch,
                max_batch="auto",
            )
        if run == "recipe":
            return run_recipe(case, model, inputs, tmp_path / "out")
        if run == "resume":
            return run_resume(case, model, inputs, tmp_path / "out")
        return run_max_concurrent(case, model, inputs, tmp_path / "out")

    figures = benchmark.pedantic(call, rounds=1, iterations=1, warmup_rounds=0)
    info = {
        "suite": "trainer",
        "case": case.id,
        "run": run,
        "family": case.family,
        "tiny": case.tiny,
        "resolution": case.resolution,
        "device": device_name(),
        "cuda": CUDA,
        "device_memory": torch.cuda.get_device_properties(DEVICE).total_memory if CUDA else None,
        "threads": None if CUDA else torch.get_num_threads(),
        "dtype": str(DTYPE).replace("torch.", ""),
        "model_build_seconds": inputs.model_seconds.get(case.id),
        **figures,
    }
    benchmark.extra_info.update({k: v for k, v in info.items() if k != "levers"})
    bench_results.append(info)


# -- against diffusers' own script (a checkout given) --------------------------------------------------


@pytest.mark.skipif(
    CUDA or not os.environ.get("DTI_DIFFUSERS_CHECKOUT"),
    reason="set DTI_DIFFUSERS_CHECKOUT to a diffusers checkout to run its textual_inversion.py (CPU, tiny model)",
)
def test_vs_diffusers_script(benchmark, tmp_path, capsys) -> None:
    """dti-fast's CLI against the example script as subprocesses (bench/compare_diffusers.py); asserts nothing.

    ``DTI_BENCH_SCRIPT_ROUNDS`` (default 3) one-concept rounds and
    ``DTI_BENCH_SCRIPT_JOB_ROUNDS`` (default 1) eight-concept rounds;
    ``DTI_BENCH_SCRIPT_OUT`` writes the JSON. The in-process ``baseline`` runs
    above are the stand-in; these figures are the script's.
    """
    import json

    import compare_diffusers as cmp

    from dti_fast.testing import tiny_model_path

    script = cmp.find_script(None)
    setup = cmp.Setup(script, tiny_model_path("sd"), sys.executable, tmp_path, 100, 64, CPU_THREADS)
    rounds = int(os.environ.get("DTI_BENCH_SCRIPT_ROUNDS", "3"))
    job_rounds = int(os.environ.get("DTI_BENCH_SCRIPT_JOB_ROUNDS", "1"))
    benchmark.group = "vs-diffusers-script"
    with capsys.disabled():
        out = benchmark.pedantic(
            lambda: cmp.compare(setup, rounds, job_rounds, progress=lambda s: print(s, flush=True)),
            rounds=1,
            iterations=1,
            warmup_rounds=0,
        )
        print("\n" + cmp.format_result(out))
    benchmark.extra_info.update({k: v for k, v in out.items() if k in ("device", "threads", "goals", "note")})
    path = os.environ.get("DTI_BENCH_SCRIPT_OUT")
    if path:
        Path(path).write_text(json.dumps(out, indent=1))

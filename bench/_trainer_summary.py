"""Ratio summary of the trainer bench (bench/bench_trainer.py), built by bench/conftest.py.

Every ratio compares figures measured in the same process on the same device;
goals are reported, never asserted.
"""

from __future__ import annotations

import datetime
import os
import platform

GiB = 2**30

# (description, metric key, target, cases it applies to: None = every case); met when value >= target,
# except the metrics in AT_MOST (met when value <= target).
GOALS = [
    ("one concept >= 1.5x the baseline's samples/s", "speedup_one_concept", 1.5, None),
    ("32-concept job >= 4x the baseline's concepts/hour", "speedup_job_concepts_per_hour", 4.0, None),
    ("UNet forward+backward >= 45% of the measured matmul peak", "mfu", 0.45, None),
    (">= 64 SDXL concepts at once on one 80 GB GPU", "max_concurrent_concepts", 64, ("sdxl-1024",)),
    (
        "SDXL concepts per hour with the paper's recipe (400 steps, batch 4, 768 px, all levers) >= 100",
        "recipe_concepts_per_hour",
        100,
        ("sdxl-1024", "tiny-sdxl-64"),
    ),
    (
        "a job stopped and resumed with --deterministic ends bit-identical to one run straight through",
        "resume_max_abs_diff_deterministic",
        0.0,
        ("sd15-512", "tiny-sd-64"),
    ),
]
AT_MOST = {"resume_max_abs_diff_deterministic"}

#: What "baseline" is in this bench, and how it differs from running diffusers' script.
BASELINE = (
    "bench/_baseline.py: an in-process stand-in for the procedure of diffusers' "
    "examples/textual_inversion/textual_inversion.py (textual_inversion_sdxl.py for SDXL), not the script itself; "
    "against the real script run as a subprocess: bench/compare_diffusers.py (on a GPU, gpu_check.sh's peer stage)"
)
BASELINE_DIFFERENCES = [
    "runs inside the bench's process: no interpreter start, no import of the script's modules (accelerate, "
    "the script), none of the script's start-up (Accelerator, tokenizer and model loading through its calls); "
    "its load is timed apart (load_seconds)",
    "images are decoded and resized once before the loop; the script's DataLoader (no workers) opens, "
    "decodes, resizes and flips every sample in the loop",
    "no accelerate wrapping (accelerator.prepare, accelerator.accumulate, accelerator.backward, "
    "unwrap_model every step), no learning-rate scheduler, no tqdm bar or set_postfix per step",
    "the model loads directly in the weight dtype (the script loads fp32 and casts)",
    "batch 4 in the bench's one-concept runs (the script's default is 16; compare_diffusers.py uses 1)",
]

DEFINITIONS = {
    "samples_per_second": "images trained per second of training loop (model load, caches and planning excluded)",
    "speedup_one_concept": "dti_fast samples/s / baseline samples/s, one concept, same steps and batch",
    "concepts_per_hour": "dti_fast: concepts * 3600 / loop seconds of the 32-concept job; baseline: "
    "3600 / (job steps * baseline seconds per step), one concept per run",
    "speedup_job_concepts_per_hour": "dti_fast concepts/hour / baseline concepts/hour (loop time only)",
    "*_with_setup": "the same with everything else counted: dti_fast the whole train() call (load, latent "
    "and text caches, batch planning, export), the baseline each run's model load and setup",
    "peak_memory": "bytes during the training loop: CUDA max allocated, or the CPU process's peak RSS (VmHWM)",
    "mfu": "FLOPs of one UNet forward+backward (FlopCounterMode) / its median time / matmul peak FLOP/s "
    "measured in the same run (bf16 8192^3 on a GPU, fp32 1024^3 on the CPU)",
    "job_loop_mfu": "the 32-concept job's loop images/s x the UNet forward+backward FLOPs per image / matmul peak",
    "max_concurrent_concepts": "most concepts (one image each) in one training step, found by the trainer's "
    "max_batch='auto' with gradient checkpointing; 'capped' when every concept offered fit",
    "recipe_concepts_per_hour": "the paper's recipe (400 steps, batch 4, 768 px; the tiny case 64 px), all levers: "
    "a job of a few steps, its loop seconds per concept-step (first steps included) extrapolated to 400 steps, "
    "its setup counted once: concepts * 3600 / (setup + 400 * concepts * s per concept-step)",
    "resume_max_abs_diff_*": "largest |difference| of the learned vectors between a job run straight through "
    "and the same job stopped halfway (checkpoint) and resumed, without (default) and with --deterministic",
}


def _ratio(num, den) -> float | None:
    return num / den if num and den else None


def summarize(records: list, load_start: list, load_end: list) -> dict:
    cases: dict[str, dict] = {}
    for r in records:
        c = cases.setdefault(
            r["case"],
            {
                "case": r["case"],
                "device": r["device"],
                "family": r["family"],
                "resolution": r["resolution"],
                "dtype": r["dtype"],
                "cuda": r["cuda"],
                "device_memory_gib": (r["device_memory"] / GiB if r.get("device_memory") else None),
                "threads": r.get("threads"),
                "model_build_seconds": r.get("model_build_seconds"),
                "runs": {},
            },
        )
        c["runs"][r["run"]] = {
            k: v
            for k, v in r.items()
            if k
            not in (
                "suite",
                "case",
                "run",
                "device",
                "family",
                "resolution",
                "dtype",
                "cuda",
                "device_memory",
                "threads",
                "model_build_seconds",
                "tiny",
            )
        }
    for c in cases.values():
        runs = c["runs"]
        base, one, job = runs.get("baseline"), runs.get("dti-1"), runs.get("dti-32")
        mfu, maxc = runs.get("mfu"), runs.get("max-concurrent")
        recipe, resume = runs.get("recipe"), runs.get("resume")
        if recipe:
            c["recipe_concepts_per_hour"] = recipe["recipe_concepts_per_hour"]
            c["recipe_concepts_per_hour_loop_only"] = recipe["recipe_concepts_per_hour_loop_only"]
            c["recipe_seconds_per_concept_step"] = recipe["seconds_per_concept_step"]
            c["recipe_batch_per_step"] = recipe.get("batch_per_step")
        if resume:
            for key in ("resume_max_abs_diff_default", "resume_max_abs_diff_deterministic"):
                c[key] = resume[key]
            loop, det_loop = resume["default_loop_seconds"], resume["deterministic_loop_seconds"]
            c["deterministic_loop_slowdown"] = _ratio(det_loop, loop)
        if base:
            c["baseline_samples_per_second"] = base["samples_per_second"]
            c["baseline_peak_memory_gib"] = base["peak_memory"] / GiB if base.get("peak_memory") else None
            c["baseline_load_seconds"] = base["load_seconds"]
        if one:
            c["dti_samples_per_second"] = one["samples_per_second"]
            c["dti_peak_memory_gib"] = one["peak_memory"] / GiB if one.get("peak_memory") else None
        if base and one:
            c["speedup_one_concept"] = _ratio(one["samples_per_second"], base["samples_per_second"])
        if job:
            c["job_concepts"] = job["concepts"]
            c["job_steps"] = job["steps"]
            c["job_batch_per_step"] = job.get("batch_per_step")
            c["job_peak_memory_gib"] = job["peak_memory"] / GiB if job.get("peak_memory") else None
            c["job_samples_per_second"] = job["samples_per_second"]
            c["dti_concepts_per_hour"] = job["concepts_per_hour"]
            c["dti_concepts_per_hour_with_setup"] = job["concepts"] * 3600 / job["wall_seconds"]
        if base and job:
            per_run = job["steps"] * base["seconds_per_step"]
            c["baseline_concepts_per_hour"] = 3600 / per_run
            c["baseline_concepts_per_hour_with_setup"] = 3600 / (per_run + base["load_seconds"] + base["setup_seconds"])
            c["speedup_job_concepts_per_hour"] = _ratio(c["dti_concepts_per_hour"], c["baseline_concepts_per_hour"])
            c["speedup_job_concepts_per_hour_with_setup"] = _ratio(
                c["dti_concepts_per_hour_with_setup"], c["baseline_concepts_per_hour_with_setup"]
            )
        if mfu:
            c["mfu"] = mfu["mfu"]
            c["unet_tflops"] = mfu["achieved_flops"] / 1e12
            c["matmul_peak_tflops"] = mfu["matmul_peak_flops"] / 1e12
            c["unet_fwd_bwd_tflop_per_image"] = mfu["flops"] / mfu["batch"] / 1e12
        if mfu and job and job.get("samples_per_second"):
            # The whole job loop's images/s at the UNet's FLOPs per image (text encoders, optimizer and
            # host work add time, not FLOPs here): how far the loop is from the UNet alone.
            c["job_loop_mfu"] = (job["samples_per_second"] * mfu["flops"] / mfu["batch"]) / mfu["matmul_peak_flops"]
        if maxc:
            c["max_concurrent_concepts"] = maxc.get("max_concurrent_concepts")
            c["max_concurrent_capped"] = maxc.get("capped")
            c["max_concurrent_peak_memory_gib"] = maxc["peak_memory"] / GiB if maxc.get("peak_memory") else None
    goals = []
    for desc, key, target, only in GOALS:
        for c in cases.values():
            if only is not None and c["case"] not in only:
                continue
            value = c.get(key)
            goal = {
                "goal": desc,
                "case": c["case"],
                "device": c["device"],
                "metric": key,
                "target": target,
                "value": value,
                "met": None if value is None else (value <= target if key in AT_MOST else value >= target),
                "applies": c["cuda"],
            }  # the goals are the GPU's; CPU figures are for reference
            if key == "resume_max_abs_diff_deterministic":
                goal["without_deterministic"] = c.get("resume_max_abs_diff_default")
                goal["deterministic_loop_slowdown"] = c.get("deterministic_loop_slowdown")
            if key == "recipe_concepts_per_hour":
                goal["loop_only"] = c.get("recipe_concepts_per_hour_loop_only")
                goal["extrapolated"] = True
            if key == "max_concurrent_concepts":
                goal["capped"] = c.get("max_concurrent_capped")
                goal["device_memory_gib"] = c.get("device_memory_gib")
            goals.append(goal)
    try:
        import torch

        versions = {"torch": torch.__version__}
    except Exception:  # pragma: no cover
        versions = {}
    for name in ("diffusers", "transformers"):
        try:
            import importlib.metadata as md

            versions[name] = md.version(name)
        except Exception:
            versions[name] = None
    from _machine import cpu_model

    return {
        "suite": "dti_fast training throughput (bench/bench_trainer.py)",
        "date": datetime.date.today().isoformat(),
        "devices": sorted({c["device"] for c in cases.values()}),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        **versions,
        "note": os.environ.get("DTI_BENCH_NOTE") or None,
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "baseline": BASELINE,
        "baseline_differences": BASELINE_DIFFERENCES,
        "definitions": DEFINITIONS,
        "cases": list(cases.values()),
        "goals": goals,
    }


def _fmt(x, spec: str, width: int) -> str:
    return ("-" if x is None else format(x, spec)).rjust(width)


def print_table(tr, summary: dict) -> None:
    tr.write_sep(
        "=", "training throughput: dti_fast vs the stand-in of the diffusers example's loop (reported, not asserted)"
    )
    tr.write_line(f"baseline: {BASELINE}")
    for d in BASELINE_DIFFERENCES:
        tr.write_line(f"  stand-in differs from the script: {d}")
    tr.write_line(
        f"load {summary['loadavg_start']} -> {summary['loadavg_end']}; torch {summary.get('torch')}, "
        f"diffusers {summary.get('diffusers')}"
    )
    head = (
        f"{'case':<14}{'base img/s':>11}{'dti img/s':>11}{'x':>7}{'base c/h':>10}{'dti c/h':>10}{'x':>7}"
        f"{'x setup':>8}{'base GiB':>9}{'dti GiB':>9}{'job GiB':>9}{'MFU':>7}{'max c':>7}"
    )
    for c in summary["cases"]:
        tr.write_line(
            f"{c['case']}: {c['device']} ({c['dtype']}"
            + (f", {c['device_memory_gib']:.0f} GiB" if c.get("device_memory_gib") else "")
            + (f", {c['threads']} thread(s)" if c.get("threads") else "")
            + ")"
        )
    tr.write_line(head)
    for c in summary["cases"]:
        maxc = c.get("max_concurrent_concepts")
        maxc_s = "-" if maxc is None else f"{maxc}{'+' if c.get('max_concurrent_capped') else ''}"
        tr.write_line(
            f"{c['case']:<14}{_fmt(c.get('baseline_samples_per_second'), '.2f', 11)}"
            f"{_fmt(c.get('dti_samples_per_second'), '.2f', 11)}{_fmt(c.get('speedup_one_concept'), '.2f', 7)}"
            f"{_fmt(c.get('baseline_concepts_per_hour'), '.0f', 10)}{_fmt(c.get('dti_concepts_per_hour'), '.0f', 10)}"
            f"{_fmt(c.get('speedup_job_concepts_per_hour'), '.2f', 7)}"
            f"{_fmt(c.get('speedup_job_concepts_per_hour_with_setup'), '.2f', 8)}"
            f"{_fmt(c.get('baseline_peak_memory_gib'), '.2f', 9)}{_fmt(c.get('dti_peak_memory_gib'), '.2f', 9)}"
            f"{_fmt(c.get('job_peak_memory_gib'), '.2f', 9)}{_fmt(c.get('mfu'), '.1%', 7)}{maxc_s:>7}"
        )
    tr.write_line(
        "img/s: samples per second of training loop, one concept; c/h: concepts per hour of a "
        "32-concept job (baseline: one concept per run); x setup: the same counting load and setup"
    )
    for g in summary["goals"]:
        status = {True: "met", False: "MISSED", None: "not measured"}[g["met"]]
        value = "-" if g["value"] is None else format(g["value"], ".3g")
        where = "" if g["applies"] else " (CPU reference, the goal is the GPU's)"
        tr.write_line(
            f"goal: {g['goal']} [{g['case']} on {g['device']}]: {value} (target {g['target']}) -> {status}{where}"
        )

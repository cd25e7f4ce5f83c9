"""The GPU check's closing summary: every goal of the check, the measured figure, pass/fail, the device.

    python bench/gpu_summary.py OUTDIR

Reads the ratio files the check's stages wrote (``optimizer_ratios.json``, ``trainer_ratios.json``, each
rewritten after every case, so a stage cut short still counts what it measured; ``recipe_ratios.json``,
``peer_ratios.json`` and ``world_ratios.json`` of the opt-in ``recipe``, ``peer`` and ``world`` stages) and
writes
``OUTDIR/summary.json``. A goal no file measured is listed as ``"measured": false`` with what measures
it, so a summary never hides a figure it lacks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# The check's goals (issue 11), in the order the summary lists them; "metric" is the key the bench's own
# goal entries carry; goals without one are measured by no bench yet.
GOALS = [
    {
        "goal": "kernel >= 90% of the measured copy bandwidth at 1M rows x 768 (fp32, bf16)",
        "metric": "kernel_fraction_of_copy_gbps",
        "source": "optimizer_ratios.json",
    },
    {
        "goal": "kernel >= 20x the per-param loop at 1000 concepts",
        "metric": "speedup_kernel_vs_loop",
        "source": "optimizer_ratios.json",
    },
    {
        "goal": "one concept >= 1.5x the baseline's samples/s",
        "metric": "speedup_one_concept",
        "source": "trainer_ratios.json",
    },
    {
        "goal": "32-concept job >= 4x the baseline's concepts/hour",
        "metric": "speedup_job_concepts_per_hour",
        "source": "trainer_ratios.json",
    },
    {
        "goal": "one concept, wall clock per concept >= 1.5x diffusers' textual_inversion.py run as a script",
        "metric": "script_speedup_wall",
        "source": "peer_ratios.json",
    },
    {
        "goal": "one concept, training-loop steps/s >= 1.5x diffusers' textual_inversion.py run as a script",
        "metric": "script_speedup_loop",
        "source": "peer_ratios.json",
    },
    {
        "goal": "a 32-concept job >= 4x the concepts per hour of 32 sequential runs of diffusers' script",
        "metric": "script_speedup_concepts_per_hour",
        "source": "peer_ratios.json",
    },
    {
        "goal": "SDXL concepts at 1024 px in one step per 80 GB >= 64",
        "metric": "max_concurrent_concepts",
        "source": "trainer_ratios.json",
    },
    {
        "goal": "UNet forward+backward >= 45% of the measured bf16 matmul peak",
        "metric": "mfu",
        "source": "trainer_ratios.json",
    },
    {
        "goal": "SDXL concepts per hour with the paper's recipe (400 steps, batch 4, 768 px, all levers) >= 100",
        "metric": "recipe_concepts_per_hour",
        "source": "recipe_ratios.json",
    },
    {
        "goal": "resume with --deterministic bit-identical to an uninterrupted run (the difference without "
        "it reported beside)",
        "metric": "resume_max_abs_diff_deterministic",
        "source": "recipe_ratios.json",
    },
    {
        "goal": "toy world base model from scratch on the GPU: gate >= 0.8 within 3 minutes (issue 16)",
        "metric": "world_build_gate_within_3_min",
        "source": "world_ratios.json",
    },
]


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def summarize(outdir: Path) -> dict:
    """The summary of the ratio files in ``outdir`` (see the module docstring)."""
    names = sorted({goal["source"] for goal in GOALS})
    files = {name: _read(outdir / name) for name in names}
    devices = sorted({str(d.get("device") or d.get("devices") or "") for d in files.values() if d} - {""})
    entries = []
    for goal in GOALS:
        found = [g for g in files.get(goal["source"], {}).get("goals", []) if g.get("metric") == goal["metric"]]
        if not found:
            entries.append({**goal, "measured": False, "met": None})
            continue
        for g in found:
            entries.append(
                {
                    **goal,
                    "measured": g.get("value") is not None,
                    "case": g.get("case"),
                    "device": g.get("device"),
                    "target": g.get("target"),
                    "value": g.get("value"),
                    "met": g.get("met"),
                    "applies": g.get("applies", True),
                    **{k: g[k] for k in ("without_deterministic", "loop_only", "extrapolated") if k in g},
                }
            )
    counted = [e for e in entries if e["measured"] and e.get("applies", True)]
    return {
        "devices": devices,
        "goals": entries,
        "met": sum(1 for e in counted if e["met"]),
        "missed": sum(1 for e in counted if e["met"] is False),
        "not_measured": sum(1 for e in entries if not e["measured"]),
    }


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python bench/gpu_summary.py OUTDIR", file=sys.stderr)
        return 2
    outdir = Path(argv[0])
    summary = summarize(outdir)
    (outdir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    for e in summary["goals"]:
        status = "not measured" if not e["measured"] else ("met" if e["met"] else "MISSED")
        where = f" [{e.get('case')} on {e.get('device')}]" if e["measured"] else f" ({e['source']})"
        value = f" = {e['value']} (target {e['target']})" if e["measured"] else ""
        print(f"{status:>12}: {e['goal']}{value}{where}")
    print(f"summary.json: {summary['met']} met, {summary['missed']} missed, {summary['not_measured']} not measured")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

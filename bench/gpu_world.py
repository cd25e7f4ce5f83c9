"""Issue 16's GPU figure: the toy world's base model built from scratch on the GPU, then its gate.

    python bench/gpu_world.py OUTDIR [dti-fast world build-base flags ...]

Runs ``dti-fast world build-base --output <tmp> --device auto FLAGS`` and ``dti-fast world gate`` on the
result (the suite's 96 held-out captions), as a user would, and writes ``OUTDIR/world_ratios.json``:
the build's wall times per stage, the gate per attribute, and the goal entry the GPU summary reads
(gate >= 0.8 within 180 s of wall time, both from this one build). ``bench/gpu_check.sh`` runs it as its
opt-in ``world`` stage (``DTI_CHECK_STAGES=world``); on a CPU it measures the CPU build (the goal's
``applies`` is false there).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_GATE = 0.8
GOAL_SECONDS = 180.0
STAGE_KEYS = ("render_s", "vae_s", "encode_s", "unet_s", "steps_done", "unet_threads", "scorer_s", "total_s")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dti_fast.cli", *args], capture_output=True, text=True)


def measure(outdir: Path, flags: list[str]) -> dict:
    """Build, gate, and write ``outdir/world_ratios.json`` (also after a failed step, saying which)."""
    import torch

    outdir.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    report: dict = {"device": device, "flags": flags, "goals": []}
    target = outdir / "world_ratios.json"

    def write() -> None:
        target.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")

    with tempfile.TemporaryDirectory(prefix="gpu-world-") as work:
        model = Path(work) / "world"
        t = time.perf_counter()
        built = _cli("world", "build-base", "--output", str(model), *flags)
        report["build_wall_s"] = time.perf_counter() - t
        if built.returncode != 0:
            report["error"] = f"build-base exited {built.returncode}: {built.stderr.strip()[-1500:]}"
            write()
            return report
        log = json.loads((model / "world_build.json").read_text(encoding="utf-8"))
        report["build"] = {k: log.get(k) for k in STAGE_KEYS} | {"device": log.get("device"), "config": log["config"]}
        write()
        gated = _cli("world", "gate", "--model", str(model))
        if gated.returncode != 0:
            report["error"] = f"world gate exited {gated.returncode}: {gated.stderr.strip()[-1500:]}"
            write()
            return report
        gate = json.loads(gated.stdout[gated.stdout.index("{") :])
    report["gate"] = gate
    seconds = float(log["total_s"])
    report["goals"].append(
        {
            "metric": "world_build_gate_within_3_min",
            "case": f"{log['steps_done']} steps, {seconds:.0f} s, gate {gate['text_fidelity']:.3f}",
            "device": device,
            "target": f"gate >= {GOAL_GATE} within {GOAL_SECONDS:.0f} s",
            "value": round(float(gate["text_fidelity"]), 4),
            "seconds": round(seconds, 1),
            "met": bool(gate["text_fidelity"] >= GOAL_GATE and seconds <= GOAL_SECONDS),
            "applies": device != "cpu",
        }
    )
    write()
    return report


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python bench/gpu_world.py OUTDIR [dti-fast world build-base flags ...]", file=sys.stderr)
        return 2
    report = measure(Path(argv[0]), argv[1:])
    if "error" in report:
        print(report["error"], file=sys.stderr)
        return 1
    goal = report["goals"][0]
    print(f"world base model on {report['device']}: {goal['case']} ({'met' if goal['met'] else 'missed'})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

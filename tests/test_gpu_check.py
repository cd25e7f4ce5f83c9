"""bench/gpu_check.sh and its summary on the CPU, so the one-call GPU check cannot rot between GPU sessions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import gpu_summary  # noqa: E402


def test_summary_lists_every_goal_measured_or_not(tmp_path):
    (tmp_path / "optimizer_ratios.json").write_text(
        json.dumps(
            {
                "device": "NVIDIA H200",
                "goals": [
                    {
                        "goal": "kernel",
                        "case": "1000000x1x768-packed",
                        "metric": "kernel_fraction_of_copy_gbps",
                        "target": 0.9,
                        "value": 0.93,
                        "met": True,
                    }
                ],
            }
        )
    )
    (tmp_path / "trainer_ratios.json").write_text(
        json.dumps(
            {
                "devices": ["NVIDIA H200"],
                "goals": [
                    {
                        "goal": "one",
                        "case": "sd15-512",
                        "device": "NVIDIA H200",
                        "metric": "speedup_one_concept",
                        "target": 1.5,
                        "value": 1.2,
                        "met": False,
                        "applies": True,
                    }
                ],
            }
        )
    )
    assert gpu_summary.main([str(tmp_path)]) == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["met"] == 1 and s["missed"] == 1
    by_metric = {e["metric"]: e for e in s["goals"]}
    assert by_metric["kernel_fraction_of_copy_gbps"]["value"] == 0.93
    assert by_metric["speedup_one_concept"]["met"] is False
    assert by_metric["mfu"]["measured"] is False  # nothing measured it: listed, not hidden
    assert s["not_measured"] == len([g for g in gpu_summary.GOALS]) - 2


def test_summary_of_nothing_lists_every_goal_as_not_measured(tmp_path):
    s = gpu_summary.summarize(tmp_path)
    assert len(s["goals"]) == len(gpu_summary.GOALS) and s["not_measured"] == len(gpu_summary.GOALS)


@pytest.mark.slow
def test_the_check_runs_on_a_cpu_machine_and_writes_its_summary(tmp_path):
    """The script itself, setup + env + summary stages, on this CPU (no GPU: it warns and goes on)."""
    env = dict(os.environ, PYTHON=sys.executable, DTI_CHECK_STAGES="env summary", DTI_WHEELS=str(tmp_path / "none"))
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    out = tmp_path / "out"
    summary = (out / "summary.txt").read_text()
    assert "PASS" in summary and "summary" in summary and "env" in summary
    assert "no CUDA GPU here" in (out / "gpu_check.log").read_text()
    goals = json.loads((out / "summary.json").read_text())["goals"]
    assert {g["goal"] for g in goals} == {g["goal"] for g in gpu_summary.GOALS}

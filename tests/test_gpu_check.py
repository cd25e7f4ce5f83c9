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


def _check(tmp_path, timeout: float = 900, **env_vars) -> subprocess.CompletedProcess:
    """``bench/gpu_check.sh`` into ``tmp_path/out`` with this python, no wheels, ``env_vars`` set."""
    env = dict(os.environ, PYTHON=sys.executable, DTI_WHEELS=str(tmp_path / "none"), **env_vars)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


@pytest.mark.slow
def test_the_check_runs_on_a_cpu_machine_and_writes_its_summary(tmp_path):
    """The script itself, setup + env + summary stages, on this CPU (no GPU: it warns and goes on)."""
    done = _check(tmp_path, timeout=600, DTI_CHECK_STAGES="env summary")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    out = tmp_path / "out"
    summary = (out / "summary.txt").read_text()
    assert "PASS" in summary and "summary" in summary and "env" in summary
    assert "no CUDA GPU here" in (out / "gpu_check.log").read_text()
    goals = json.loads((out / "summary.json").read_text())["goals"]
    assert {g["goal"] for g in goals} == {g["goal"] for g in gpu_summary.GOALS}


def test_the_default_check_leaves_out_the_opt_in_world_stage(tmp_path):
    done = _check(tmp_path, DTI_CHECK_BUDGET_S="0")  # nothing runs but the summary: the stage list alone
    listed = [line.split()[0] for line in (tmp_path / "out" / "summary.txt").read_text().splitlines()[1:]]
    assert listed == ["setup", "env", "tests", "bench_optimizer", "bench_trainer", "summary"], done.stdout[-2000:]


@pytest.mark.slow
def test_the_world_stage_builds_gates_and_reports_on_a_cpu_machine(tmp_path):
    """The opt-in world stage, tiny, on this CPU: the build, its gate and the summary's goal entry."""
    tiny = "--images 64 --vae-steps 2 --steps 2 --batch 4 --scorer-steps 2 --unet-threads 1"
    done = _check(tmp_path, DTI_CHECK_STAGES="world summary", DTI_WORLD_ARGS=tiny)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    out = tmp_path / "out"
    report = json.loads((out / "world_ratios.json").read_text())
    assert report["device"] == "cpu" and report["build"]["steps_done"] == 2 and report["build"]["device"] == "cpu"
    assert report["gate"]["prompts"] == 96 and 0.0 <= report["gate"]["text_fidelity"] <= 1.0
    (goal,) = report["goals"]
    assert goal["applies"] is False and goal["seconds"] == pytest.approx(report["build"]["total_s"], abs=0.1)
    entry = next(
        g for g in json.loads((out / "summary.json").read_text())["goals"] if g["source"] == "world_ratios.json"
    )
    assert entry["measured"] and entry["value"] == goal["value"] and entry["applies"] is False


@pytest.mark.slow
def test_the_recipe_stage_measures_the_recipe_and_the_resume_difference_on_a_cpu_machine(tmp_path):
    """The opt-in recipe stage on this CPU (the tiny SD and SDXL cases): both goals reach the summary."""
    done = _check(tmp_path, DTI_CHECK_STAGES="recipe summary")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    out = tmp_path / "out"
    ratios = json.loads((out / "recipe_ratios.json").read_text())
    cases = {c["case"]: c for c in ratios["cases"]}
    assert set(cases) == {"tiny-sd-64", "tiny-sdxl-64"}
    assert set(cases["tiny-sd-64"]["runs"]) == {"resume"} and set(cases["tiny-sdxl-64"]["runs"]) == {"recipe"}
    resume = cases["tiny-sd-64"]["runs"]["resume"]
    # Seeded CPU runs repeat exactly: stopped and resumed equals straight through, with and without
    # --deterministic. The two modes differ by rounding only (--deterministic takes SDPA's math
    # backend: the same products summed in another order; observed 4e-9).
    assert resume["resume_max_abs_diff_default"] == 0.0 and resume["resume_max_abs_diff_deterministic"] == 0.0
    assert resume["max_abs_diff_default_vs_deterministic"] < 1e-6 and resume["vector_norm"] > 0
    recipe = cases["tiny-sdxl-64"]["runs"]["recipe"]
    assert recipe["concepts"] == 4 and recipe["measured_steps"] == 3 and recipe["batch"] == 4
    expected = 4 * 3600 / (recipe["setup_seconds"] + 400 * recipe["seconds"] / 3)
    assert recipe["recipe_concepts_per_hour"] == pytest.approx(expected, rel=2e-3)  # the JSON keeps 4 digits
    summary = {g["metric"]: g for g in json.loads((out / "summary.json").read_text())["goals"]}
    entry = summary["recipe_concepts_per_hour"]
    assert entry["measured"] and entry["applies"] is False and entry["extrapolated"] is True
    assert entry["value"] == pytest.approx(recipe["recipe_concepts_per_hour"])
    entry = summary["resume_max_abs_diff_deterministic"]
    assert entry["measured"] and entry["met"] is True and entry["without_deterministic"] == 0.0


@pytest.mark.slow
def test_the_peer_stage_compares_against_the_script_it_is_given(tmp_path):
    """The opt-in peer stage on this CPU, with a stand-in for diffusers' script (the real one is not in
    this repository): the comparison runs, its goals reach the summary; without a script it says where
    to put one."""
    from test_compare_diffusers import _FAKE_EXAMPLE

    missing = _check(tmp_path / "none", DTI_CHECK_STAGES="peer", DTI_DIFFUSERS_CHECKOUT=str(tmp_path / "nowhere"))
    assert missing.returncode != 0
    assert (
        "no examples/textual_inversion/textual_inversion.py under"
        in (tmp_path / "none" / "out" / "gpu_check.log").read_text()
    )
    script = tmp_path / "checkout" / "examples" / "textual_inversion" / "textual_inversion.py"
    script.parent.mkdir(parents=True)
    script.write_text(_FAKE_EXAMPLE)
    small = "--steps 3 --rounds 1 --job-rounds 1 --job-concepts 2 --job-script-runs 1 --threads 1"
    done = _check(
        tmp_path, DTI_CHECK_STAGES="peer summary", DTI_DIFFUSERS_CHECKOUT=str(script.parents[2]), DTI_PEER_ARGS=small
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    out = tmp_path / "out"
    peer = json.loads((out / "peer_ratios.json").read_text())
    assert peer["job"]["concepts"] == 2 and peer["job"]["script_runs_measured"] == 1 and peer["steps"] == 3
    summary = {g["metric"]: g for g in json.loads((out / "summary.json").read_text())["goals"]}
    for metric in ("script_speedup_wall", "script_speedup_loop", "script_speedup_concepts_per_hour"):
        assert summary[metric]["measured"] and summary[metric]["source"] == "peer_ratios.json"
    assert summary["script_speedup_concepts_per_hour"]["value"] == peer["job"]["speedup_concepts_per_hour"]

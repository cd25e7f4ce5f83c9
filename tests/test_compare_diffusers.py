"""bench/compare_diffusers.py's machinery, without a diffusers checkout: progress stamping, the
torchvision stand-in, the launcher. The comparison itself needs the script (bench/README.md)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import compare_diffusers as cmp  # noqa: E402


def _child(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(body))
    return [sys.executable, str(script)]


def test_stamps_tqdm_bars_and_dti_fast_lines(tmp_path):
    # tqdm redraws with carriage returns; dti-fast prints lines. Each step is stamped once,
    # when its first line arrives, and the loop runs from the first step to the last.
    tqdm_like = _child(
        tmp_path,
        """
        import sys, time
        for n in range(4):
            sys.stderr.write(f"\\rSteps:  {25 * n}%|##   | {n}/3 [00:00<00:00, 9.9it/s, loss=1]")
            sys.stderr.write(f"\\rSteps:  {25 * n}%|##   | {n}/3 [00:00<00:00, 9.9it/s, loss=2]")
            sys.stderr.flush()
            time.sleep(0.05)
        sys.stderr.write("\\n")
        """,
    )
    res = cmp.run_stamped("script", tqdm_like, None, tmp_path, cmp._TQDM_STEP, tmp_path / "s.log")
    assert sorted(res.steps) == [0, 1, 2, 3]
    units, seconds = res.loop()
    assert units == 2 and 0.05 <= seconds < 5
    dti_like = _child(
        tmp_path,
        """
        import sys, time
        for n in (1, 2, 3):
            print(f"dti-fast: training {n}/3 concept-steps ({33 * n}%), 1.0 samples/s, loss 1.0", file=sys.stderr)
            time.sleep(0.05)
        """,
    )
    res = cmp.run_stamped("dti-fast", dti_like, None, tmp_path, cmp._DTI_STEP, tmp_path / "d.log")
    assert sorted(res.steps) == [1, 2, 3] and res.loop()[0] == 2


def test_a_failed_run_is_an_error_with_its_output(tmp_path):
    failing = _child(tmp_path, "import sys; print('no model here', file=sys.stderr); sys.exit(3)")
    with pytest.raises(RuntimeError, match=r"(?s)exit 3.*no model here"):
        cmp.run_stamped("script", failing, None, tmp_path, cmp._TQDM_STEP, tmp_path / "f.log")


def test_find_script_needs_the_example_in_the_checkout(tmp_path, monkeypatch):
    monkeypatch.delenv("DTI_DIFFUSERS_CHECKOUT", raising=False)
    assert cmp.find_script(None) is None
    with pytest.raises(SystemExit, match="textual_inversion.py"):
        cmp.find_script(tmp_path)
    script = tmp_path / cmp.SCRIPT_REL
    script.parent.mkdir(parents=True)
    script.write_text("")
    monkeypatch.setenv("DTI_DIFFUSERS_CHECKOUT", str(tmp_path))
    assert cmp.find_script(None) == script


def _shim_transforms():
    path = ROOT / "bench" / "_torchvision_shim" / "torchvision" / "transforms.py"
    spec = importlib.util.spec_from_file_location("_shim_transforms", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_torchvision_stand_in_flips_on_one_draw_per_call():
    flip = _shim_transforms().RandomHorizontalFlip
    img = Image.new("RGB", (4, 2))
    img.putpixel((0, 0), (255, 0, 0))
    assert flip(p=1.0)(img).getpixel((3, 0)) == (255, 0, 0)
    assert flip(p=0.0)(img).getpixel((0, 0)) == (255, 0, 0)
    torch.manual_seed(5)
    draws = [float(torch.rand(1)) < 0.5 for _ in range(8)]
    torch.manual_seed(5)
    t = flip(p=0.5)
    flipped = [t(img).getpixel((3, 0)) == (255, 0, 0) for _ in range(8)]
    assert flipped == draws
    with pytest.raises(TypeError, match="PIL"):
        t(torch.zeros(3, 2, 4))


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="a real torchvision is installed")
def test_launcher_runs_a_script_unchanged_with_the_stand_in(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            from torchvision import transforms
            print("args", sys.argv[1:], type(transforms.RandomHorizontalFlip(p=0.5)).__name__, __name__)
            """
        )
    )
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "_run_example.py"), str(script), "--a", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "args ['--a', '1'] RandomHorizontalFlip __main__" in out.stdout


_FAKE_EXAMPLE = """
import argparse, json, os, sys, time
p = argparse.ArgumentParser()
for name in ("pretrained_model_name_or_path", "train_data_dir", "learnable_property", "placeholder_token",
             "initializer_token", "resolution", "train_batch_size", "mixed_precision", "max_train_steps",
             "seed", "output_dir"):
    p.add_argument("--" + name)
a = p.parse_args()
os.makedirs(a.output_dir, exist_ok=True)
with open(os.path.join(a.output_dir, "args.json"), "w") as f:
    json.dump(vars(a), f)
n = int(a.max_train_steps)
for i in range(n + 1):
    sys.stderr.write(f"\\rSteps: {100 * i // n}%|#| {i}/{n} [00:00<00:00, 9.9it/s]")
    sys.stderr.flush()
    time.sleep(0.01)
sys.stderr.write("\\n")
"""


@pytest.mark.slow
def test_compare_runs_both_sides_as_asked_and_extrapolates_the_unmeasured_job_runs(tmp_path):
    # A stand-in for the example script (its argument names; tqdm-like progress) against the real
    # dti-fast CLI on the tiny model: batch and precision reach both command lines, the JSON is
    # rewritten after every run, and a job of 3 concepts with 1 script run measured counts the
    # other 2 at that run's wall clock.
    from dti_fast.testing import tiny_model_path

    script = tmp_path / "checkout" / cmp.SCRIPT_REL
    script.parent.mkdir(parents=True)
    script.write_text(_FAKE_EXAMPLE)
    work = tmp_path / "work"
    work.mkdir()
    setup = cmp.Setup(script, tiny_model_path("sd"), sys.executable, work, 4, 64, 1, batch=2, precision="fp32")
    updates = []
    out = cmp.compare(setup, 1, 1, progress=lambda s: None, job_size=3, job_script_runs=1, on_update=updates.append)
    assert len(updates) == 4  # after each of the two one-concept runs and each side of the job
    assert "job" not in updates[2] and "job" in updates[3]
    args = json.loads((work / "script-one-0" / "args.json").read_text())
    assert args["train_batch_size"] == "2" and args["mixed_precision"] == "no" and args["max_train_steps"] == "4"
    assert out["one_concept"]["runs"]["dti-fast"][0]["wall_seconds"] > 0
    job = out["job"]
    (script_runs,) = job["runs"]["script"]
    assert job["concepts"] == 3 and job["script_runs_measured"] == 1 and len(script_runs) == 1
    assert job["script_wall_seconds"] == pytest.approx(3 * script_runs[0]["wall_seconds"])
    assert job["dti_concepts_per_hour"] == pytest.approx(3 * 3600 / job["dti_wall_seconds"])
    by_metric = {g["metric"]: g for g in out["goals"]}
    assert set(by_metric) == {"script_speedup_loop", "script_speedup_wall", "script_speedup_concepts_per_hour"}
    assert by_metric["script_speedup_concepts_per_hour"]["value"] == job["speedup_concepts_per_hour"]
    assert by_metric["script_speedup_wall"]["case"] == "sd-64px-batch2-fp32"
    assert "3 concepts: wall s" in cmp.format_result(out)

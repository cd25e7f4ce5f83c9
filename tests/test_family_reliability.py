"""Failures met for real on every model family: a full disk mid-job, SIGTERM, then --resume.

The SD cases of the same kind live in test_reliability.py (signals, kill -9) and test_io.py (the
writers on a full disk); these run the whole ``dti-fast train`` command on each family's tiny
model, with the output on a real, small tmpfs that fills up.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
from _shared import small_tmpfs, train_cmd, wait_for_checkpoint

from dti_fast.io import load_safetensors

FAMILIES = ("sd", "sana", "wan")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from dti_fast.testing import make_tiny_model

    root = tmp_path_factory.mktemp("tiny-reliability")
    return {f: make_tiny_model(root / f, family=f) for f in FAMILIES}


def _fill(disk: Path, leave: int) -> None:
    """Fill ``disk`` up to ``leave`` free bytes with one file."""
    import os

    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    (disk / "ballast").write_bytes(b"\0" * max(0, free - leave))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_disk_that_fills_mid_job_is_one_line_and_resume_finishes(tiny, tmp_path, family):
    with small_tmpfs(tmp_path, "4m") as disk:
        out = disk / "out"
        first = subprocess.run(train_cmd(tiny[family], out, 3), capture_output=True, text=True, timeout=600)
        assert first.returncode == 0, first.stderr[-2000:]
        # The disk fills up: the next checkpoint cannot be written.
        _fill(disk, leave=2048)
        full = subprocess.run(train_cmd(tiny[family], out, 8, resume=True), capture_output=True, text=True, timeout=600)
        assert full.returncode == 2, full.stderr[-2000:]
        assert "Traceback" not in full.stderr
        last = full.stderr.strip().splitlines()[-1]
        assert last.startswith("dti-fast train: error: disk full while writing") and "--resume" in last, last
        # No half-written file: every checkpoint left loads.
        for ckpt in (out / "checkpoints").glob("step-*.safetensors"):
            load_safetensors(ckpt)
        # Space is freed; --resume finishes the job from what was saved.
        (disk / "ballast").unlink()
        done = subprocess.run(train_cmd(tiny[family], out, 8, resume=True), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        for name in ("dog", "bag"):
            assert (out / name / "learned_embeds.safetensors").is_file()


@pytest.mark.parametrize("family", ("sana", "wan"))
def test_sigterm_checkpoints_and_resume_finishes(tiny, tmp_path, family):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        train_cmd(tiny[family], out, 2000), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    wait_for_checkpoint(out, proc, timeout=300)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err and "--resume" in err and "Traceback" not in err
    assert list((out / "checkpoints").glob("step-*.safetensors"))
    done = subprocess.run(train_cmd(tiny[family], out, 3, resume=True), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "dog" / "learned_embeds.safetensors").is_file()

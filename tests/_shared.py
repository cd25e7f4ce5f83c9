"""Helpers several test modules use: a real small filesystem, the train command, waiting for a checkpoint."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from dti_fast.demo import demo_images_dir


@contextlib.contextmanager
def small_tmpfs(parent: Path, size: str = "64k"):
    """A real filesystem of ``size`` bytes (a tmpfs mount); skips where this machine does not allow mounting."""
    folder = parent / f"tmpfs-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True
        )
    except FileNotFoundError:
        pytest.skip("no mount command here: a full disk cannot be made")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root / CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def train_args(model: Path, out: Path, steps: int) -> list[str]:
    """``dti-fast train``'s arguments for two demo concepts (dog, bag) at 64 px, batch 1, no progress bar."""
    return [
        "train",
        "--model",
        str(model),
        "--output",
        str(out),
        "--concept",
        f"dog:{demo_images_dir() / 'dog'}:dog",
        "--concept",
        f"bag:{demo_images_dir() / 'backpack'}:red backpack",
        "--steps",
        str(steps),
        "--batch-size",
        "1",
        "--resolution",
        "64",
        "--no-progress",
    ]


def train_cmd(model: Path, out: Path, steps: int, resume: bool = False) -> list[str]:
    """The command line of :func:`train_args` in a new process, with a checkpoint every step (two kept)."""
    cmd = [sys.executable, "-m", "dti_fast.cli", *train_args(model, out, steps)]
    cmd += ["--checkpoint-every", "1", "--keep-checkpoints", "2"]
    return cmd + (["--resume"] if resume else [])


def wait_for_checkpoint(out: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until ``out`` has a checkpoint, ``proc`` ends, or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if list((out / "checkpoints").glob("step-*.safetensors")):
            return
        time.sleep(0.05)

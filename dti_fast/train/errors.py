"""Errors a training job raises on purpose: each message says what happened and what to do."""

from __future__ import annotations

import signal
from pathlib import Path

__all__ = ["JobError", "OutputBusyError", "TrainingInterrupted"]


class JobError(RuntimeError):
    """A job could not start or was stopped; the message says why and what to do."""


class OutputBusyError(JobError):
    """Another job holds the output folder."""


class TrainingInterrupted(JobError):
    """SIGINT/SIGTERM stopped the job after writing a checkpoint."""

    def __init__(self, signum: int, checkpoint: Path) -> None:
        self.signum = signum
        self.checkpoint = checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name}; checkpoint written to {checkpoint}; rerun with --resume to continue")

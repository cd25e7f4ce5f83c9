"""Training: many concepts, one frozen model, one loop.

- :mod:`.config`: :class:`TrainConfig`, the job as plain data, declared once
  (flags, job-file keys, checks and the fingerprint derive from it).
- :mod:`.job`: :class:`TrainingJob`, the model, the learned rows, the loss and the step.
- :mod:`.batching`: which concepts share a step, and filling the device.
- :mod:`.checkpoint`: saving and restoring per-concept state.
- :mod:`.run`: :func:`train`, the process around the loop (lock, signals, ranks, exports).
"""

from .config import DEFAULT_LR, METHODS, TrainConfig, load_job_file, read_job_file, validate_config
from .errors import JobError, OutputBusyError, TrainingInterrupted
from .job import TrainingJob
from .run import TrainResult, train

__all__ = [
    "DEFAULT_LR",
    "METHODS",
    "JobError",
    "OutputBusyError",
    "TrainConfig",
    "TrainResult",
    "TrainingInterrupted",
    "TrainingJob",
    "load_job_file",
    "read_job_file",
    "train",
    "validate_config",
]

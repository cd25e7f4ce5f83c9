"""How many concepts share a step: turns under ``max_batch``, and filling the device for ``max_batch="auto"``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .. import memory
from .errors import JobError

if TYPE_CHECKING:  # pragma: no cover
    from .job import TrainingJob

__all__ = ["pick_concepts", "plan_batch", "probe"]


def pick_concepts(job: TrainingJob, done: dict[str, int] | None = None, job_step: int | None = None) -> list[int]:
    """The concepts of the next step: every active one, or a rotating window of them when they do not fit.

    ``done`` and ``job_step`` replace the job's own (the trainer predicts the step after this one with them).
    """
    cfg = job.cfg
    active = job.active_concepts(done)
    step = job.job_step if job_step is None else job_step
    if not active:
        return []
    if job.concepts_per_step is not None:
        per_step = job.concepts_per_step
    else:
        per_step = len(active) if cfg.max_batch is None else max(1, cfg.max_batch // cfg.batch_size)
    if per_step >= len(active):
        return active
    start = (step * per_step) % len(active)
    return [active[(start + k) % len(active)] for k in range(per_step)]


def probe(job: TrainingJob, concepts: Sequence[int], measure_saved: bool = False) -> int:
    """One forward+backward on ``concepts`` that changes no training state; returns saved-activation bytes."""
    states = {i: job.generators[job.cfg.concepts[i].name].get_state() for i in concepts}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if measure_saved and t.device == job.device:
            try:
                key = t.untyped_storage().data_ptr()
                saved[key] = max(saved.get(key, 0), t.untyped_storage().nbytes())
            except (RuntimeError, NotImplementedError):
                pass
        return t

    try:
        batch = job.make_batch(list(concepts))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            total, _ = job.loss(batch)
        total.backward()
    finally:
        for i, state in states.items():
            job.generators[job.cfg.concepts[i].name].set_state(state)
        for p in (p for emb in job.embeddings for p in emb.rows):
            p.grad = None
    return sum(saved.values())


def plan_batch(job: TrainingJob) -> int:
    """Pick how many concepts share a step so the step fills the device's memory; returns that number.

    CUDA: the peak of probe steps with 1 and 2 concepts gives a fixed and a
    per-concept cost; the largest count that fits in free memory (less 10%
    headroom) is then tried, and lowered on out-of-memory. CPU: the
    per-concept cost is the activation memory saved for backward
    (measured with saved-tensor hooks) against available RAM. Probe steps
    leave rows, optimizer state and random generators untouched.
    """
    active = job.active_concepts()
    n = len(active)
    fit = n
    usable = memory.usable_bytes(job.device)
    if n > 1 and usable is not None:
        if job.device.type == "cuda":
            peaks = []
            for k in (1, 2):
                torch.cuda.empty_cache()
                memory.reset_peak(job.device)
                try:
                    probe(job, active[:k])
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    if k == 1:
                        raise JobError(
                            f"one concept's step (batch_size {job.cfg.batch_size} at {job.cfg.resolution} px) "
                            f"does not fit in {job.device}'s memory; lower --batch-size or add "
                            "--gradient-checkpointing"
                        ) from None
                    break
                peaks.append(memory.peak_bytes(job.device))
            if len(peaks) < 2:
                fit = 1
            else:
                per_concept = max(peaks[1] - peaks[0], 1)
                fit = int((usable - (peaks[0] - per_concept)) // per_concept)
        else:
            per_concept = max(probe(job, active[:1], measure_saved=True), 1)
            rss = memory.peak_bytes(job.device) or 0
            # Activations plus as much again for their gradients and temporaries during backward.
            fit = int((usable - rss) // (2 * per_concept))
        fit = max(1, min(n, fit))
        if job.device.type == "cuda":
            while fit > 1:
                try:
                    torch.cuda.empty_cache()
                    probe(job, active[:fit])
                    break
                except torch.cuda.OutOfMemoryError:
                    fit = max(1, int(fit * 0.85))
            torch.cuda.empty_cache()
    if job.data_world > 1:
        agreed = torch.tensor([fit], device=job.device if job.device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
        fit = int(agreed.item())
    job.concepts_per_step = fit
    return fit

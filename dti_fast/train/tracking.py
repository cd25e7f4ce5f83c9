"""What a running job reports: progress, training curves, experiment trackers.

- :class:`Progress`: a tqdm bar on a terminal; where stderr is not a terminal
  (a log file, a batch system), one plain line every ``interval`` seconds with
  the concept steps done, samples/s, the loss and the time left.
- :class:`Curves`: every ``log_every`` job steps, each concept's mean loss since
  the last point, its learned vectors' norm and the angle its directions moved
  from where they started, and the learning rate. Sent to the trackers chosen
  with ``report_to`` (accelerate's TensorBoard / Weights & Biases trackers) and,
  at the end, drawn as ``curves.png`` in the output folder.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .job import TrainingJob

__all__ = ["REPORT_TO", "Curves", "Progress", "check_report_to"]

REPORT_TO = ("none", "tensorboard", "wandb")
_NEEDS = {"tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"), "wandb": (("wandb",), "wandb")}


def check_report_to(report_to: str) -> None:
    """Refuse a tracker whose packages are not installed, naming the pip command (before any model work)."""
    if report_to == "none":
        return
    modules, pip_name = _NEEDS[report_to]
    missing = [] if importlib.util.find_spec("accelerate") else ["accelerate"]
    if not any(importlib.util.find_spec(m) for m in modules):
        missing.append(pip_name)
    if missing:
        raise ValueError(
            f"--report-to {report_to} needs {' and '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed: pip install {' '.join(missing)} "
            "(or pip install 'dti-fast[tracking]'), or leave --report-to at none (curves.png is "
            "written either way)"
        )


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """Progress of the concept steps: a bar on a terminal, plain lines every ``interval`` s elsewhere."""

    def __init__(
        self, total: int, initial: int, enabled: bool, interval: float = 30.0, stream: TextIO | None = None
    ) -> None:
        self.total, self.done, self.start_done = total, initial, initial
        self.stream = stream or sys.stderr
        self.interval = interval
        self.enabled = enabled
        self.started = self.last_line = time.perf_counter()
        self.bar = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, initial=initial, unit="concept-step", dynamic_ncols=True, desc="training", file=self.stream
            )

    def update(self, done: int, loss: float | None, samples_per_s: float) -> None:
        step = done - self.done
        self.done = done
        if not self.enabled:
            return
        loss_text = f"{loss:.4f}" if loss is not None and math.isfinite(loss) else "nan"
        if self.bar is not None:
            self.bar.update(step)
            self.bar.set_postfix(loss=loss_text, samples_s=f"{samples_per_s:.1f}")
            return
        now = time.perf_counter()
        if now - self.last_line >= self.interval or done >= self.total:
            self.last_line = now
            elapsed = now - self.started
            rate = (done - self.start_done) / elapsed if elapsed > 0 else 0.0
            eta = (self.total - done) / rate if rate > 0 else float("nan")
            print(
                f"dti-fast: training {done}/{self.total} concept-steps ({100 * done / max(self.total, 1):.0f}%), "
                f"{samples_per_s:.1f} samples/s, loss {loss_text}, elapsed {_clock(elapsed)}, "
                f"left {_clock(eta) if math.isfinite(eta) else '?'}",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Curves:
    """Loss, norm, angle and learning rate per concept, sampled every ``log_every`` job steps."""

    def __init__(self, job: TrainingJob, log_every: int, report_to: str = "none", run_name: str = "dti-fast") -> None:
        self.log_every = log_every
        self.names = [c.name for c in job.cfg.concepts]
        # Where each concept's directions started (before any resume): the angle is measured from there.
        self.start = [[emb.rows[i].detach().float().clone() for emb in job.embeddings] for i in range(len(self.names))]
        self.points: dict[str, dict[str, list[tuple[float, float]]]] = {
            key: {n: [] for n in self.names} for key in ("loss", "norm", "angle")
        }
        self.lr: list[tuple[float, float]] = []
        self._sum = dict.fromkeys(self.names, 0.0)
        self._count = dict.fromkeys(self.names, 0)
        self.trackers = self._trackers(report_to, Path(job.cfg.output_dir), run_name) if job.writes else []

    @staticmethod
    def _trackers(report_to: str, output_dir: Path, run_name: str) -> list[Any]:
        if report_to == "none":
            return []
        check_report_to(report_to)
        from accelerate.tracking import TensorBoardTracker, WandBTracker

        tracker = (
            TensorBoardTracker(run_name, output_dir / "logs") if report_to == "tensorboard" else WandBTracker(run_name)
        )
        if hasattr(tracker, "start"):  # accelerate >= 1.6 starts trackers explicitly
            tracker.start()
        return [tracker]

    def after_step(self, job: TrainingJob) -> None:
        """Add the step's per-concept losses; every ``log_every`` job steps, record and send a point."""
        for i, value in job.last_losses.items():
            if math.isfinite(value):
                self._sum[self.names[i]] += value
                self._count[self.names[i]] += 1
        if job.job_step % self.log_every == 0:
            self.record(job)

    @torch.no_grad()
    def record(self, job: TrainingJob) -> None:
        step = float(job.job_step)
        values: dict[str, float] = {}
        stats = []
        for i, name in enumerate(self.names):
            now = [emb.vectors(i).float() for emb in job.embeddings]
            norm = torch.stack([v.norm(dim=-1).mean() for v in now]).mean()
            cos = torch.stack(
                [
                    torch.nn.functional.cosine_similarity(v.to(s.device), s, dim=-1).clamp(-1, 1).acos().mean()
                    for v, s in zip([emb.rows[i].detach().float() for emb in job.embeddings], self.start[i])
                ]
            ).mean()
            stats.append(torch.stack([norm, cos]))
        norms_angles = torch.stack(stats).cpu().tolist() if stats else []  # one host copy
        for name, (norm, angle) in zip(self.names, norms_angles):
            self.points["norm"][name].append((step, norm))
            self.points["angle"][name].append((step, math.degrees(angle)))
            values[f"norm/{name}"] = norm
            values[f"angle_deg/{name}"] = math.degrees(angle)
            if self._count[name]:
                loss = self._sum[name] / self._count[name]
                self.points["loss"][name].append((step, loss))
                values[f"loss/{name}"] = loss
            self._sum[name], self._count[name] = 0.0, 0
        lr = float(job.optimizer.param_groups[0]["lr"])
        self.lr.append((step, lr))
        values["lr"] = lr
        for tracker in self.trackers:
            tracker.log(values, step=job.job_step)

    def finish(self, output_dir: Path) -> Path | None:
        """Close the trackers and write ``curves.png`` (loss and angle per concept); returns its path."""
        for tracker in self.trackers:
            tracker.finish()
        if not any(self.points["angle"].values()):
            return None
        from ..io import atomic_write
        from ..plots import image_grid, line_plot

        panels = [
            line_plot(
                self.points["loss"], title="loss per concept (mean between points)", xlabel="job step", ylabel="loss"
            ),
            line_plot(self.points["angle"], title="angle moved from the start", xlabel="job step", ylabel="degrees"),
        ]
        sheet = image_grid(panels, columns=2)
        path = Path(output_dir) / "curves.png"
        atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
        return path

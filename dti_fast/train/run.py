"""Running a job: validate, lock the output, handle signals and ranks, loop, checkpoint, export.

:func:`train` is the entry point. Bad input raises before the model loads;
the output folder is locked for the job's lifetime; SIGINT/SIGTERM write a
checkpoint and raise :class:`~.errors.TrainingInterrupted`. Under a
distributed launcher the concepts are sharded over the ranks or trained data
parallel (:mod:`dti_fast.distributed`).
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..data import ConceptImages, load_concept_images
from ..distributed import DistContext, failure_report, shard_concepts
from ..distributed import setup as setup_distributed
from ..export import export_concepts, validation_grids
from ..memory import peak_bytes, reset_peak
from ..models import ModelPreview
from .batching import pick_concepts, plan_batch
from .checkpoint import finished_concepts, restore_checkpoint, save_checkpoint
from .config import TrainConfig, validate_config
from .errors import JobError, OutputBusyError, TrainingInterrupted
from .job import TrainingJob, preflight
from .tracking import Curves, Progress

__all__ = ["OutputLock", "StopSignals", "TrainResult", "train"]


class OutputLock:
    """An exclusive lock on the output folder, so two jobs never write into one folder.

    ``flock`` is released by the kernel when the process dies, kill -9 included.
    """

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / ".dti_fast.lock"
        self.fh = None

    def __enter__(self) -> OutputLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(self.path, "a+", encoding="utf-8")
        except OSError as err:
            raise PermissionError(
                f"output folder {self.path.parent} is not writable ({err.strerror}); choose another --output"
            ) from err
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            fh.close()
            raise OutputBusyError(
                f"output folder {self.path.parent} is in use by another dti-fast job (pid {holder}); "
                "wait for it to finish or choose another --output"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self.fh = fh
        return self

    def __exit__(self, *exc) -> None:
        if self.fh is not None:
            fcntl.flock(self.fh, fcntl.LOCK_UN)
            self.fh.close()


class StopSignals:
    """Turn SIGINT/SIGTERM into a flag the loop checks between steps (main thread only).

    A second signal does not wait for the step: it raises KeyboardInterrupt at
    once. :meth:`release` hands the signals back (after the final checkpoint,
    exports and sample grids answer Ctrl-C directly).

    In the ``dti-fast`` process itself (:attr:`process_exits_on_stop`, set by
    the console script) a command that a signal stopped is on its way out: its
    release ignores further signals instead, so a second Ctrl-C between the
    one-line message and the exit cannot end the process by signal instead of
    with its exit status (130/143). In-process callers (a notebook, a test)
    get their handlers back in every case.
    """

    process_exits_on_stop: bool = False

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            self.release()
            raise KeyboardInterrupt
        self.signum = signum

    @staticmethod
    def ignore_on_the_way_out() -> None:
        """In the dti-fast process (:attr:`process_exits_on_stop`): ignore SIGINT/SIGTERM from here to the exit."""
        if StopSignals.process_exits_on_stop:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)

    def release(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._previous and self.signum is not None:
            self.ignore_on_the_way_out()
        self._previous = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@dataclass
class TrainResult:
    """What a finished job produced and measured."""

    output_dir: Path
    concept_dirs: dict[str, Path]
    vectors: dict[str, list[torch.Tensor]]  # per concept, per encoder: (n_vectors, dim) fp32 as exported
    scales: list[float]  # m* per encoder (1.0 for TI)
    job_steps: int
    samples: int
    seconds: float
    skipped_steps: int
    stopped: dict[str, str] = field(default_factory=dict)  # concept -> why it was stopped early
    peak_memory: int | None = None  # bytes during the loop: CUDA max allocated, or the CPU process's peak RSS
    batch_per_step: int = 0  # most images in one forward pass
    device: str = ""

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else float("nan")


def train(cfg: TrainConfig) -> TrainResult:
    """Run a training job and write every concept's outputs; returns what it made.

    Bad input raises before the model loads. The output folder is locked for
    the job's lifetime. SIGINT/SIGTERM write a checkpoint and raise
    :class:`TrainingInterrupted`; ``resume=True`` continues from the newest
    checkpoints and ends with the same vectors as an uninterrupted run. Under
    a distributed launcher (``WORLD_SIZE > 1``) the concepts are sharded over
    the ranks (``parallel="shard"``) or trained data-parallel
    (``parallel="data"``); see :mod:`dti_fast.distributed`. The result holds
    this rank's concepts.
    """
    validate_config(cfg)
    ctx = setup_distributed()
    data_world = ctx.world_size if cfg.parallel == "data" else 1
    subset = list(range(len(cfg.concepts)))
    finished = finished_concepts(cfg, data_world) if cfg.resume else set()
    subset = [i for i in subset if cfg.concepts[i].name not in finished]
    checkpoint_dir = Path(cfg.output_dir) / "checkpoints"
    if ctx.enabled and cfg.parallel == "shard":
        shards = shard_concepts([cfg.concept_steps(cfg.concepts[i]) for i in subset], ctx.world_size)
        subset = [subset[k] for k in shards[ctx.rank]]
        checkpoint_dir = checkpoint_dir / f"rank{ctx.rank}-of-{ctx.world_size}"
    mine = [cfg.concepts[i] for i in subset]
    if cfg.resume and ctx.is_main and ctx.enabled:
        previous = failure_report(Path(cfg.output_dir), ctx.world_size)
        if previous:
            print(f"dti-fast: the previous run did not finish: {previous.split('. ')[0]}", file=sys.stderr)
        print(
            f"dti-fast: resuming; {len(finished)} concept(s) finished, {len(cfg.concepts) - len(finished)} to train",
            file=sys.stderr,
        )
    images = [load_concept_images(c, cfg.resolution) for c in mine]
    preview = preflight(cfg)  # placeholders, initializers, resolution against the tokenizers and configs: no weights
    sub_cfg = replace(cfg, concepts=mine, progress=cfg.progress and ctx.is_main)
    lock = OutputLock(Path(cfg.output_dir)) if ctx.is_main else contextlib.nullcontext()
    with _agreed(lock, ctx), StopSignals() as stop, _numerics(cfg):
        names = [c.name for c in mine]
        ctx.write_status(Path(cfg.output_dir), "running", names)
        try:
            result = _run(sub_cfg, images, stop, ctx, checkpoint_dir, preview) if mine else _empty_result(cfg)
        except TrainingInterrupted as err:
            ctx.write_status(Path(cfg.output_dir), f"interrupted by {signal.Signals(err.signum).name}", names)
            if ctx.enabled and ctx.is_main:
                # A launcher stops every rank when one dies: say which one held what.
                report = failure_report(Path(cfg.output_dir), ctx.world_size)
                if report:
                    print(f"dti-fast: {report}", file=sys.stderr)
            raise
        except BaseException as err:
            ctx.write_status(Path(cfg.output_dir), f"failed ({type(err).__name__}: {err})", names)
            raise
        ctx.write_status(Path(cfg.output_dir), "done", names)
    if ctx.enabled and cfg.parallel == "shard":
        # Outside the signal handlers: a launcher tearing the job down may stop a rank that waits here.
        _report_rank_failures(cfg, ctx)
    return result


@contextlib.contextmanager
def _numerics(cfg: TrainConfig):
    """TF32 and deterministic algorithms for the job's lifetime; the process-wide settings are restored after."""
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
    torch.backends.cudnn.allow_tf32 = cfg.tf32
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's deterministic workspace
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        (
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
            deterministic,
            torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark,
        ) = saved
        torch.use_deterministic_algorithms(deterministic)


@contextlib.contextmanager
def _agreed(lock, ctx: DistContext):
    """Enter ``lock`` on the main rank; every rank fails together if it could not be taken."""
    error = None
    try:
        lock.__enter__()
    except (JobError, OSError) as err:
        error = err
    if not ctx.agree(error is None):
        if error is not None:
            raise error
        raise OutputBusyError("the main rank could not lock the output folder; see its error")
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def _report_rank_failures(cfg: TrainConfig, ctx: DistContext) -> None:
    """Wait for the other ranks; on the main rank, name ranks that failed and the concepts they held."""
    try:
        ctx.wait_for_all()
        problem = None
    except Exception as err:  # a dead peer breaks the collective
        problem = f"({type(err).__name__} while waiting for the other ranks)"
    if ctx.is_main:
        report = failure_report(Path(cfg.output_dir), ctx.world_size)
        if report or problem:
            raise JobError(report or problem)


def _stopping(stop: StopSignals, job: TrainingJob) -> bool:
    """Whether to stop before the next step. Data parallel: when any rank got a signal, every rank stops
    (one tiny all-reduce), so no rank is left waiting in the next step's collective.

    Under data parallelism the answer is the agreed one, never a second look at the flag: a signal that
    lands while the all-reduce runs sets the flag after this rank voted "go on", and stopping on it
    alone would leave the other ranks in the next step's all-reduce (seen as a gloo "Connection closed
    by peer" on the others). It is acted on at the next agreement instead.
    """
    if job.data_world <= 1:
        return stop.signum is not None
    if job.ctx.agree(stop.signum is None):
        return False
    stop.signum = stop.signum or signal.SIGTERM
    return True


def _step(job: TrainingJob) -> float | None:
    """``job.step()``; out of memory saves a checkpoint and becomes a JobError that names the fixes."""
    try:
        return job.step()
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not _out_of_memory(err):
            raise
        # The step failed before its update, so the rows are as the last step left them: save them.
        job.optimizer.zero_grad(set_to_none=True)
        saved = save_checkpoint(job)
        cfg = job.cfg
        raise JobError(
            f"out of memory on {job.device} in a step of {len(pick_concepts(job))} concept(s) x "
            f"{cfg.batch_size} image(s) at {cfg.resolution} px; lower --batch-size, cap the concepts per "
            "step with --max-batch (or --max-batch auto), or add --gradient-checkpointing"
            + (f"; progress is saved in {saved}: rerun with --resume" if saved else "")
        ) from None


def _out_of_memory(err: BaseException) -> bool:
    text = str(err)
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def _empty_result(cfg: TrainConfig) -> TrainResult:
    return TrainResult(
        output_dir=Path(cfg.output_dir),
        concept_dirs={},
        vectors={},
        scales=[],
        job_steps=0,
        samples=0,
        seconds=0.0,
        skipped_steps=0,
    )


def _run(
    cfg: TrainConfig,
    images: list[ConceptImages],
    stop: StopSignals,
    ctx: DistContext,
    checkpoint_dir: Path,
    preview: ModelPreview,
) -> TrainResult:
    """The loop: steps until every concept is done or a signal arrives, checkpoints, then the exports."""
    job = TrainingJob(cfg, images, ctx, checkpoint_dir, preview)
    if cfg.resume:
        restore_checkpoint(job)
    if cfg.max_batch == "auto":
        fit = plan_batch(job)
        if cfg.progress:
            print(
                f"dti-fast: max_batch auto: {fit} concept(s) x {cfg.batch_size} image(s) per step on {job.device}",
                file=sys.stderr,
            )
    reset_peak(job.device)
    total = sum(cfg.concept_steps(c) for c in cfg.concepts)
    progress = Progress(total, sum(job.done.values()), cfg.progress, interval=cfg.progress_interval)
    curves = Curves(job, cfg.log_every, cfg.report_to, run_name=Path(cfg.output_dir).name or "dti-fast")
    started = time.perf_counter()
    samples_before = job.samples
    ema = None
    try:
        while not _stopping(stop, job):
            loss = _step(job)
            if loss is None:
                break
            if math.isfinite(loss):
                ema = loss if ema is None else 0.9 * ema + 0.1 * loss
            rate = (job.samples - samples_before) / max(time.perf_counter() - started, 1e-9)
            progress.update(sum(job.done.values()), ema, rate)
            curves.after_step(job)
            if job.job_step % cfg.checkpoint_every == 0:
                save_checkpoint(job)
            if cfg.validation_every and job.writes and job.job_step % cfg.validation_every == 0:
                validation_grids(
                    job.parts,
                    job.concept_records(),
                    cfg.output_dir,
                    cfg.validation_prompts,
                    steps=cfg.validation_inference_steps,
                    seed=cfg.seed,
                    resolution=cfg.resolution,
                    filename=f"samples/step-{job.job_step:06d}.png",
                )
    finally:
        progress.close()
    if stop.signum is not None:
        raise TrainingInterrupted(stop.signum, save_checkpoint(job) or checkpoint_dir)
    seconds = time.perf_counter() - started
    peak = peak_bytes(job.device)
    save_checkpoint(job)
    stop.release()  # everything learned is on disk: from here on a signal stops the job at once
    records = job.concept_records()
    concept_dirs = {r.name: Path(cfg.output_dir) / r.name for r in records}
    vectors = {r.name: [e.vectors for e in r.encoders] for r in records}
    if job.job_step % cfg.log_every:
        curves.record(job)  # the last point
    if job.writes:
        export_concepts(Path(cfg.output_dir), records, ti_rescaled=cfg.export_ti_rescaled)
        curves.finish(Path(cfg.output_dir))
        if cfg.validation_prompts:
            validation_grids(
                job.parts,
                records,
                cfg.output_dir,
                cfg.validation_prompts,
                steps=cfg.validation_inference_steps,
                seed=cfg.seed,
                resolution=cfg.resolution,
            )
    return TrainResult(
        output_dir=Path(cfg.output_dir),
        concept_dirs=concept_dirs,
        vectors=vectors,
        scales=[emb.scale for emb in job.embeddings],
        job_steps=job.job_step,
        samples=job.samples - samples_before,
        seconds=seconds,
        skipped_steps=job.skipped,
        stopped=dict(job.stopped),
        peak_memory=peak,
        batch_per_step=job.max_images_per_step,
        device=str(job.device),
    )

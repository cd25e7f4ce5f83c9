"""Many GPUs or machines through torch.distributed (as started by torchrun or accelerate launch).

dti_fast brings no launcher of its own. When the process was started with
``WORLD_SIZE > 1`` (``torchrun``, ``accelerate launch``, or any launcher that
sets the standard ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``
variables), the job joins the process group (NCCL on GPUs, gloo on CPUs) and
either

- shards concepts over the ranks (``parallel="shard"``): each rank trains its
  share concurrently, balanced by step counts; no communication while
  training; or
- runs data parallel (``parallel="data"``): every rank trains all concepts on
  different samples and the gradients of the direction rows are summed with
  one small all-reduce per step, so W ranks equal one rank with W times the
  batch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .io import write_json

__all__ = ["DistContext", "setup", "shard_concepts", "all_reduce_grads"]


@dataclass
class DistContext:
    """Where this process stands in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    wait_group: Any = None  # a gloo group with a long timeout, for waiting on the slowest rank

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def status_path(self, output_dir: Path) -> Path:
        return Path(output_dir) / ".ranks" / f"rank-{self.rank}.json"

    def write_status(self, output_dir: Path, status: str, concepts: Sequence[str]) -> None:
        """Record this rank's state for failure reports (atomic JSON under <output>/.ranks/)."""
        if self.enabled:
            write_json(
                {
                    "rank": self.rank,
                    "world_size": self.world_size,
                    "pid": os.getpid(),
                    "status": status,
                    "concepts": list(concepts),
                },
                self.status_path(output_dir),
            )

    def agree(self, ok: bool) -> bool:
        """True on every rank only if ``ok`` on every rank (one tiny all-reduce)."""
        if not self.enabled:
            return ok
        flag = torch.tensor([0.0 if ok else 1.0], device=_comm_device())
        dist.all_reduce(flag)
        return float(flag) == 0.0

    def wait_for_all(self) -> None:
        """Block until every rank gets here, however long the slowest takes (the long-timeout gloo group)."""
        if self.enabled:
            dist.barrier(group=self.wait_group)


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


WAIT_TIMEOUT_S = 7 * 24 * 3600
"""How long a rank waits for the slowest shard at the end (``DTI_FAST_WAIT_TIMEOUT_S``): a week."""


def _seconds(name: str, default: float | None) -> timedelta | None:
    text = os.environ.get(name)
    if not text:
        return timedelta(seconds=default) if default is not None else None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a number of seconds") from None
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {text}")
    return timedelta(seconds=value)


def setup() -> DistContext:
    """Join the process group the launcher described in the environment (a no-op for one process).

    The default group (NCCL on GPUs, gloo on CPUs) keeps torch's timeout unless
    ``DTI_FAST_PG_TIMEOUT_S`` sets one. Shards finish far apart, so the final
    wait for the slowest one runs on a separate gloo group whose timeout is
    ``DTI_FAST_WAIT_TIMEOUT_S`` (default a week): a rank that finished early
    is never aborted by the default group's watchdog.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = _seconds("DTI_FAST_PG_TIMEOUT_S", None)
        dist.init_process_group(backend=backend, **({"timeout": timeout} if timeout else {}))
    wait_group = dist.new_group(backend="gloo", timeout=_seconds("DTI_FAST_WAIT_TIMEOUT_S", WAIT_TIMEOUT_S))
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        wait_group=wait_group,
    )


def shard_concepts(steps: Sequence[int], world_size: int) -> list[list[int]]:
    """Split concepts (given by their step counts) over ranks, balanced by total steps.

    Longest job first onto the least loaded rank; ties by index, so every rank
    computes the same split. Returns each rank's concept indices in job order.
    """
    load = [0] * world_size
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(steps)), key=lambda k: (-steps[k], k)):
        r = min(range(world_size), key=lambda k: (load[k], k))
        shards[r].append(i)
        load[r] += steps[i]
    return [sorted(s) for s in shards]


def all_reduce_grads(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over ranks with one flat all-reduce."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def read_rank_statuses(output_dir: Path) -> list[dict]:
    """Every rank's last recorded status (for failure reports)."""
    out = []
    for path in sorted((Path(output_dir) / ".ranks").glob("rank-*.json")):
        try:
            out.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    return out


def failure_report(output_dir: Path, world_size: int) -> str | None:
    """A message naming ranks that did not finish and the concepts they held, or None."""
    statuses = {s["rank"]: s for s in read_rank_statuses(output_dir) if s.get("world_size") == world_size}
    lines = []
    for rank in range(world_size):
        s = statuses.get(rank)
        if s is None:
            lines.append(f"rank {rank}: never reported")
        elif s["status"] != "done":
            lines.append(
                f"rank {rank} (pid {s['pid']}) {s['status']}, holding concepts {', '.join(s['concepts']) or '-'}"
            )
    if not lines:
        return None
    return (
        "; ".join(lines) + ". Results of the other ranks are kept; rerun the same command with --resume to "
        "train only the unfinished concepts"
    )

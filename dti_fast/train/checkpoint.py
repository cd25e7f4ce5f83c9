"""Checkpoints: every tensor keyed by concept, so any later job or shard with the same fingerprint picks it up.

A checkpoint is one safetensors file ``<output>/checkpoints[/rankR-of-W]/step-N.safetensors``
holding, per concept, its rows per encoder, its optimizer state and its
generator, with the job's counters as metadata. :func:`restore_checkpoint` takes
each concept's newest state from any checkpoint whose fingerprint matches.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from ..io import load_safetensors, save_safetensors
from .config import TrainConfig

if TYPE_CHECKING:  # pragma: no cover
    from .job import TrainingJob

__all__ = ["CHECKPOINT_FORMAT", "finished_concepts", "restore_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT = "dti_fast-checkpoint-3"  # 3: a checksum in the metadata
OLDER_FORMATS = ("dti_fast-checkpoint-2",)  # still restored (without the checksum check)


def save_checkpoint(job: TrainingJob) -> Path | None:
    """Write every concept's rows, optimizer state and generator to ``<checkpoints>/step-N.safetensors``."""
    if not job.writes:
        return None
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, object] = {}
    for e, emb in enumerate(job.embeddings):
        for i, c in enumerate(job.cfg.concepts):
            p = emb.rows[i]
            tensors[f"rows/{e}/{c.name}"] = p.detach()
            for key, value in job.optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):
                    # A copy: some optimizers share a tensor between params (bitsandbytes' quantization maps).
                    tensors[f"optim/{e}/{c.name}/{key}"] = value.detach().clone()
                elif isinstance(value, (bool, int, float)):  # e.g. bitsandbytes' integer step
                    scalars[f"optim/{e}/{c.name}/{key}"] = value
    for name, state in job.generator_states().items():  # as if the next step's batch were not drawn yet
        tensors[f"rng/{name}"] = state
    meta = {
        "format": CHECKPOINT_FORMAT,
        "fingerprints": json.dumps(job.fingerprints()),
        "job_step": str(job.job_step),
        "samples": str(job.samples),
        "skipped": str(job.skipped),
        "done": json.dumps(job.done),
        "bad": json.dumps(job.bad),
        "stopped": json.dumps(job.stopped),
        "optim_scalars": json.dumps(scalars),
        "checksum": _checksum(tensors),
    }
    path = job.checkpoint_dir / f"step-{job.job_step:08d}.safetensors"
    save_safetensors(tensors, path, metadata=meta)
    for stale in sorted(job.checkpoint_dir.glob("step-*.safetensors"))[: -job.cfg.keep_checkpoints]:
        stale.unlink(missing_ok=True)
    return path


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes (sorted by name)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read_meta(path: Path) -> tuple[dict[str, str] | None, str]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            return fh.metadata() or {}, ""
    except Exception as err:  # safetensors raises several types for damaged or truncated files
        return None, f"unreadable ({str(err).splitlines()[0] if str(err) else type(err).__name__})"


def _damage(job: TrainingJob, name: str, meta: dict[str, str], tensors: dict[str, torch.Tensor] | None) -> str:
    """Why the checkpoint cannot restore concept ``name`` ("" when it can)."""
    if tensors is None:
        return "unreadable"
    if "checksum" in meta and _checksum(tensors) != meta["checksum"]:
        return "its checksum does not match (the file was damaged after it was written)"
    i = [c.name for c in job.cfg.concepts].index(name)
    for e, emb in enumerate(job.embeddings):
        saved = tensors.get(f"rows/{e}/{name}")
        if saved is None or saved.shape != emb.rows[i].shape:
            got = "missing" if saved is None else f"shape {tuple(saved.shape)}"
            return f"the rows of {name!r} have {got}, expected {tuple(emb.rows[i].shape)}"
        if not bool(torch.isfinite(saved).all()):
            return f"the rows of {name!r} are not finite"
        if emb.spherical and not torch.allclose(saved.float().norm(dim=-1), torch.ones(saved.shape[0]), atol=1e-3):
            return f"the DTI rows of {name!r} are not unit vectors"
    state = tensors.get(f"rng/{name}")
    try:
        torch.Generator().set_state(state)
    except (RuntimeError, TypeError, ValueError):
        return f"the random generator state of {name!r} is damaged"
    try:
        for key in ("done", "bad", "stopped", "optim_scalars"):
            json.loads(meta.get(key, "{}"))
        int(meta["job_step"])
    except (ValueError, KeyError):
        return "its metadata is damaged"
    return ""


def restore_checkpoint(job: TrainingJob) -> list[Path]:
    """Load each concept's newest intact state from any checkpoint under <output>/checkpoints.

    A damaged or truncated newest checkpoint (checksum, unit norms of DTI rows,
    generator state) falls back to the previous intact one with a warning.
    Returns the files used.
    """
    job.discard_prefetch()  # a batch drawn ahead belongs to the state being replaced
    root = Path(job.cfg.output_dir) / "checkpoints"
    wanted = job.fingerprints()
    candidates: dict[str, list[tuple[int, Path, dict]]] = {}
    foreign, unreadable = [], []
    for path in sorted(root.glob("**/step-*.safetensors")):
        meta, why = _read_meta(path)
        if meta is None:
            unreadable.append((path, why))
            continue
        if meta.get("format") not in (CHECKPOINT_FORMAT, *OLDER_FORMATS):
            raise ValueError(f"{path} is not a dti_fast checkpoint of this version; move it away or use a new --output")
        try:
            saved = json.loads(meta["fingerprints"])
            done = json.loads(meta["done"])
        except (KeyError, ValueError):
            unreadable.append((path, "its metadata is damaged"))
            continue
        for name, fp in saved.items():
            if name not in wanted:
                continue
            if fp != wanted[name]:
                foreign.append(path)
                continue
            candidates.setdefault(name, []).append((int(done.get(name, -1)), path, meta))
    for path, why in unreadable:
        print(f"dti-fast: warning: checkpoint {path} is {why}; skipping it", file=sys.stderr)
    if not candidates:
        if foreign:
            raise ValueError(
                f"checkpoint {foreign[0]} belongs to a different job (model, concepts or hyper-parameters "
                "changed); resume with the same settings, or use a new --output"
            )
        if unreadable:
            raise ValueError(
                f"no intact checkpoint under {root} ({unreadable[0][0]} is {unreadable[0][1]}); delete "
                "the damaged files to start over, or use a new --output"
            )
        return []
    loaded: dict[Path, dict[str, torch.Tensor] | None] = {}

    def tensors_of(path: Path) -> dict[str, torch.Tensor] | None:
        if path not in loaded:
            try:
                loaded[path] = load_safetensors(path)
            except ValueError:
                loaded[path] = None
        return loaded[path]

    best: dict[str, tuple[Path, dict]] = {}
    for name, options in candidates.items():
        options.sort(key=lambda o: (o[0], str(o[1])), reverse=True)
        for done, path, meta in options:
            why = _damage(job, name, meta, tensors_of(path))
            if not why:
                best[name] = (path, meta)
                break
            print(
                f"dti-fast: warning: checkpoint {path} cannot restore {name!r}: {why}; trying an older one",
                file=sys.stderr,
            )
        else:
            raise ValueError(
                f"no intact checkpoint of concept {name!r} under {root}; delete the damaged files "
                "(the warnings above name them) to start it over, or use a new --output"
            )
    params = [p for emb in job.embeddings for p in emb.rows]
    param_index = {id(p): k for k, p in enumerate(params)}
    current = job.optimizer.state_dict()
    state = dict(current["state"])  # params whose concept is not restored keep what they have
    for name, (path, meta) in best.items():
        tensors = tensors_of(path)
        i = [c.name for c in job.cfg.concepts].index(name)
        scalars = json.loads(meta.get("optim_scalars", "{}"))
        with torch.no_grad():
            for e, emb in enumerate(job.embeddings):
                emb.rows[i].copy_(tensors[f"rows/{e}/{name}"])
                prefix = f"optim/{e}/{name}/"
                entry = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
                entry.update({k[len(prefix) :]: v for k, v in scalars.items() if k.startswith(prefix)})
                if entry:
                    index = param_index[id(emb.rows[i])]
                    state[index] = {**state.get(index, {}), **entry}
        job.generators[name].set_state(tensors[f"rng/{name}"])
        job.done[name] = json.loads(meta["done"])[name]
        job.bad[name] = json.loads(meta["bad"])[name]
        stopped = json.loads(meta["stopped"])
        if name in stopped:
            job.stopped[name] = stopped[name]
    current["state"] = state
    job.optimizer.load_state_dict(current)
    files = sorted({path for path, _ in best.values()})
    if len(files) == 1:
        meta = next(iter(best.values()))[1]
        job.job_step = int(meta["job_step"])
        job.samples = int(meta.get("samples", 0))
        job.skipped = int(meta.get("skipped", 0))
    else:
        job.job_step = max(job.done.values())
    return files


def finished_concepts(cfg: TrainConfig, data_world: int) -> set[str]:
    """Concepts whose exports are complete for these settings (skipped by --resume)."""
    finished = set()
    for c in cfg.concepts:
        info_path = Path(cfg.output_dir) / c.name / "concept.json"
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(info, dict):  # not what train writes (damaged, edited): trained again
            continue
        if (
            info.get("status") == "complete"
            and info.get("fingerprint") == cfg.concept_fingerprint(c, data_world)
            and info.get("steps") == cfg.concept_steps(c)
        ):
            finished.add(c.name)
    return finished

"""The training job: many concepts, one frozen model, one loop.

Read top to bottom: :class:`TrainConfig` is the job as plain data;
:func:`train` validates it (before any model work), loads the model once,
installs one :class:`~dti_fast.embedding.DirectionalEmbedding` per text encoder,
then runs steps whose batches mix concepts. Every concept has its own random
generator (images, crops, prompts, timesteps, noise), so its samples do not
depend on which other concepts share the job, and its own step count.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import signal
import sys
import threading
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from . import export
from .data import Concept, ConceptImages, load_concept_images, random_crop
from .embedding import ConceptTokens, DirectionalEmbedding, add_concept_tokens, initializer_ids, install_embedding, start_rows
from .io import load_safetensors, save_safetensors
from .optim import SphericalSGD

__all__ = ["TrainConfig", "TrainResult", "train", "METHODS", "JobError", "OutputBusyError", "TrainingInterrupted"]

METHODS = ("dti", "ti")
DEFAULT_LR = {"dti": 0.01, "ti": 5e-3}
CHECKPOINT_FORMAT = "dti_fast-checkpoint-1"


@dataclass
class TrainConfig:
    """A training job. Defaults are the paper's (SDXL: resolution 768 is set per model by the caller)."""

    model: str
    output_dir: Path
    concepts: list[Concept]
    method: str = "dti"
    steps: int = 400
    batch_size: int = 4
    max_batch: Optional[int] = None
    resolution: int = 512
    lr: Optional[float] = None
    scale_lr: bool = True
    kappa: float = 1e-4
    beta: float = 0.0
    norm_scale: Union[str, float] = "mean"
    init: str = "token"
    weight_decay: float = 1e-2
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    resume: bool = False
    precision: str = "auto"
    device: str = "auto"
    validation_prompts: list[str] = field(default_factory=list)
    validation_inference_steps: int = 25
    export_ti_rescaled: bool = False
    progress: bool = True
    max_bad_steps: int = 3

    def effective_lr(self) -> float:
        base = self.lr if self.lr is not None else DEFAULT_LR[self.method]
        return base * self.batch_size if self.scale_lr else base

    def concept_steps(self, concept: Concept) -> int:
        return concept.steps if concept.steps is not None else self.steps

    def fingerprint(self) -> str:
        """A hash of everything that shapes the learned vectors (not progress or output options)."""
        keys = ("model", "method", "batch_size", "max_batch", "resolution", "lr", "scale_lr", "kappa", "beta",
                "norm_scale", "init", "weight_decay", "seed")
        data = {k: getattr(self, k) for k in keys}
        data["concepts"] = [
            {"name": c.name, "images": str(c.images), "init": c.init, "placeholder": c.placeholder, "kind": c.kind}
            for c in self.concepts
        ]
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


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


class _OutputLock:
    """An exclusive lock on the output folder, so two jobs never write into one folder.

    ``flock`` is released by the kernel when the process dies, kill -9 included.
    """

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / ".dti_fast.lock"
        self.fh = None

    def __enter__(self) -> "_OutputLock":
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


class _StopSignals:
    """Turn SIGINT/SIGTERM into a flag the loop checks between steps (main thread only)."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


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

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else float("nan")


def validate_config(cfg: TrainConfig) -> None:
    """Refuse a bad job before anything expensive happens."""
    if cfg.method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    for name in ("steps", "batch_size", "resolution", "checkpoint_every", "keep_checkpoints",
                 "validation_inference_steps", "max_bad_steps"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if cfg.max_batch is not None and cfg.max_batch < cfg.batch_size:
        raise ValueError(f"max_batch ({cfg.max_batch}) must be at least batch_size ({cfg.batch_size})")
    if cfg.resolution % 8:
        raise ValueError(f"resolution must be a multiple of 8 (the VAE's factor), got {cfg.resolution}")
    if cfg.lr is not None and not cfg.lr > 0:
        raise ValueError(f"lr must be positive, got {cfg.lr!r}")
    if cfg.kappa < 0 or not 0 <= cfg.beta < 1:
        raise ValueError(f"kappa must be >= 0 and beta in [0, 1), got kappa={cfg.kappa}, beta={cfg.beta}")
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {cfg.precision!r}")
    if cfg.init not in ("token", "random", "mean"):
        raise ValueError(f"init must be token, random or mean, got {cfg.init!r}")
    if not cfg.concepts:
        raise ValueError("the job has no concepts; add at least one (name, image folder, initializer)")
    seen_names, seen_placeholders = set(), set()
    for c in cfg.concepts:
        if c.name in seen_names:
            raise ValueError(f"two concepts are named {c.name!r}; names must be unique (they name output folders)")
        if c.placeholder in seen_placeholders:
            raise ValueError(f"placeholder {c.placeholder!r} is used by two concepts; give each its own")
        seen_names.add(c.name)
        seen_placeholders.add(c.placeholder)
    out = Path(cfg.output_dir)
    probe_dir = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not probe_dir.is_dir():
        raise ValueError(f"output folder {out} cannot be made: {probe_dir} is not a folder; choose another --output")
    if not os.access(probe_dir, os.W_OK):
        raise PermissionError(f"output folder {out} is not writable; choose another --output")


def _concept_generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class _Job:
    """The state of a running job (model, embeddings, optimizer, progress)."""

    def __init__(self, cfg: TrainConfig, images: list[ConceptImages]) -> None:
        from .models import load_model_parts

        self.cfg = cfg
        self.images = images
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
        )
        precision = cfg.precision if cfg.precision != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        self.weight_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.parts = load_model_parts(cfg.model, dtype=self.weight_dtype, device=str(self.device))
        self.sdxl = self.parts.family == "sdxl"
        self._install_tokens()
        self._build_optimizer()
        vae_cfg = self.parts.vae.config
        self.vae_factor = 2 ** (len(vae_cfg.block_out_channels) - 1)
        self.latent_channels = vae_cfg.latent_channels
        self.scaling = vae_cfg.scaling_factor
        self.shift = getattr(vae_cfg, "shift_factor", None) or 0.0
        self.generators = {c.name: _concept_generator(cfg.seed, c.name) for c in cfg.concepts}
        self.done = {c.name: 0 for c in cfg.concepts}
        self.bad = {c.name: 0 for c in cfg.concepts}  # consecutive non-finite steps
        self.stopped: dict[str, str] = {}
        self.job_step = 0
        self.samples = 0
        self.skipped = 0

    # -- tokens and embeddings ----------------------------------------------------

    def _install_tokens(self) -> None:
        cfg = self.cfg
        scale = cfg.norm_scale if cfg.method == "dti" else None
        self.embeddings: list[DirectionalEmbedding] = []
        self.tokens: list[list[ConceptTokens]] = []  # per encoder, per concept
        init_gen = torch.Generator().manual_seed(cfg.seed)
        for enc_index, (tok, enc) in enumerate(zip(self.parts.tokenizers, self.parts.text_encoders)):
            emb = install_embedding(enc, len(tok), scale)
            emb.to(self.device)
            per_concept = []
            for c in cfg.concepts:
                init_ids = initializer_ids(tok, c.init, c.name)
                if enc_index > 0 and len(init_ids) != len(self.tokens[0][len(per_concept)].ids):
                    raise ValueError(
                        f"concept {c.name!r}: initializer {c.init!r} gives a different number of pieces in the "
                        "two tokenizers; choose initializer words both tokenize alike"
                    )
                ct = add_concept_tokens(tok, c.placeholder, len(init_ids), c.name)
                ct.init_ids = init_ids
                start = start_rows(emb.base, init_ids, cfg.init, init_gen)
                prior = emb.base.weight.detach().float()[init_ids]
                emb.add_concept(ct.ids, start, prior)
                per_concept.append(ct)
            self.embeddings.append(emb)
            self.tokens.append(per_concept)

    def concept_params(self, index: int) -> list[torch.nn.Parameter]:
        return [emb.rows[index] for emb in self.embeddings]

    def _build_optimizer(self) -> None:
        cfg = self.cfg
        params = [p for emb in self.embeddings for p in emb.rows]
        lr = cfg.effective_lr()
        if cfg.method == "dti":
            priors = [mu for emb in self.embeddings for mu in emb.priors]
            self.optimizer: torch.optim.Optimizer = SphericalSGD(
                [{"params": params, "prior": priors}], lr=lr, kappa=cfg.kappa, beta=cfg.beta
            )
        else:
            self.optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)

    # -- one step -------------------------------------------------------------------

    def pick_concepts(self) -> list[int]:
        cfg = self.cfg
        active = [
            i for i, c in enumerate(cfg.concepts)
            if self.done[c.name] < cfg.concept_steps(c) and c.name not in self.stopped
        ]
        if not active:
            return []
        per_step = len(active) if cfg.max_batch is None else max(1, cfg.max_batch // cfg.batch_size)
        if per_step >= len(active):
            return active
        start = (self.job_step * per_step) % len(active)
        return [active[(start + k) % len(active)] for k in range(per_step)]

    def make_batch(self, chosen: Sequence[int]) -> dict:
        cfg = self.cfg
        res = cfg.resolution
        lat = res // self.vae_factor
        pixels, prompts, time_ids, timesteps, noises, eps, owners = [], [[] for _ in self.embeddings], [], [], [], [], []
        n_train = self.parts.noise_scheduler.config.num_train_timesteps
        for ci in chosen:
            c = cfg.concepts[ci]
            gen = self.generators[c.name]
            data = self.images[ci]
            for _ in range(cfg.batch_size):
                k = int(torch.randint(0, len(data.arrays), (1,), generator=gen))
                px, (top, left) = random_crop(data.arrays[k], res, gen)
                template = c.templates[int(torch.randint(0, len(c.templates), (1,), generator=gen))]
                pixels.append(px)
                for enc_index in range(len(self.embeddings)):
                    prompts[enc_index].append(template.format(self.tokens[enc_index][ci].prompt_string))
                oh, ow = data.original_sizes[k]
                time_ids.append([oh, ow, top, left, res, res])
                timesteps.append(int(torch.randint(0, n_train, (1,), generator=gen)))
                noises.append(torch.randn(self.latent_channels, lat, lat, generator=gen))
                eps.append(torch.randn(self.latent_channels, lat, lat, generator=gen))
                owners.append(ci)
        return {
            "pixels": torch.stack(pixels),
            "prompts": prompts,
            "time_ids": torch.tensor(time_ids, dtype=torch.float32),
            "timesteps": torch.tensor(timesteps, dtype=torch.long),
            "noise": torch.stack(noises),
            "vae_eps": torch.stack(eps),
            "owners": owners,
        }

    def encode_text(self, prompts: list[list[str]]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        hidden, pooled = [], None
        for enc_index, (tok, enc) in enumerate(zip(self.parts.tokenizers, self.parts.text_encoders)):
            ids = tok(prompts[enc_index], padding="max_length", max_length=tok.model_max_length,
                      truncation=True, return_tensors="pt").input_ids.to(self.device)
            if self.sdxl:
                out = enc(ids, output_hidden_states=True)
                hidden.append(out.hidden_states[-2])
                if enc_index == len(self.parts.text_encoders) - 1:
                    pooled = out[0]
            else:
                hidden.append(enc(ids)[0])
        return torch.cat(hidden, dim=-1), pooled

    def loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's loss (sum of per-concept means) and the per-concept terms."""
        dev = self.device
        parts = self.parts
        with torch.no_grad():
            dist = parts.vae.encode(batch["pixels"].to(dev, self.weight_dtype)).latent_dist
            latents = dist.mean + dist.std * batch["vae_eps"].to(dev, dist.mean.dtype)
            latents = ((latents - self.shift) * self.scaling).float()
        noise = batch["noise"].to(dev)
        t = batch["timesteps"].to(dev)
        sched = parts.noise_scheduler
        noisy = sched.add_noise(latents, noise, t)
        kind = sched.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = sched.get_velocity(latents, noise, t)
        elif kind == "sample":
            target = latents
        else:
            raise ValueError(f"unsupported prediction_type {kind!r} in the model's scheduler config")
        autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if self.weight_dtype == torch.bfloat16 else contextlib.nullcontext()
        with autocast:
            hidden, pooled = self.encode_text(batch["prompts"])
            kwargs = {}
            if self.sdxl:
                kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": batch["time_ids"].to(dev, hidden.dtype)}
            pred = parts.unet(noisy.to(hidden.dtype), t, encoder_hidden_states=hidden, **kwargs).sample
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        # Per-concept means, summed: each concept's gradient is what it would get training alone.
        owners = torch.tensor(batch["owners"], device=per_sample.device)
        per_concept = torch.zeros(len(self.cfg.concepts), device=per_sample.device)
        per_concept = per_concept.index_add(0, owners, per_sample / self.cfg.batch_size)
        return per_concept.sum(), per_concept

    def step(self) -> Optional[float]:
        """One job step; returns the mean loss of the concepts that stepped (None when all are done)."""
        chosen = self.pick_concepts()
        if not chosen:
            return None
        batch = self.make_batch(chosen)
        self.optimizer.zero_grad(set_to_none=True)
        total, per_concept = self.loss(batch)
        total.backward()
        # One host sync: which chosen concepts have a finite loss and finite gradients.
        flags = []
        for i in chosen:
            ok = torch.isfinite(per_concept[i])
            for p in self.concept_params(i):
                if p.grad is not None:
                    ok = ok & torch.isfinite(p.grad).all()
            flags.append(ok)
        good = torch.stack(flags).tolist()
        losses = per_concept[chosen].detach().tolist()
        chosen_set = set(chosen)
        for i in range(len(self.cfg.concepts)):
            if i not in chosen_set:
                for p in self.concept_params(i):
                    p.grad = None  # absent concepts take no step (their own step count)
        stepped = []
        for i, ok, value in zip(chosen, good, losses):
            name = self.cfg.concepts[i].name
            if ok:
                self.bad[name] = 0
                self.done[name] += 1
                stepped.append(value)
                continue
            # Non-finite loss or gradient: this concept skips the step, its rows stay as they are.
            for p in self.concept_params(i):
                p.grad = None
            self.skipped += 1
            self.bad[name] += 1
            if self.bad[name] >= self.cfg.max_bad_steps:
                self.stopped[name] = (
                    f"{self.bad[name]} steps in a row had a non-finite loss or gradient; stopped at step "
                    f"{self.done[name]} (check its images, or lower the learning rate)"
                )
                print(f"dti-fast: concept {name!r} {self.stopped[name]}; the other concepts continue",
                      file=sys.stderr)
        if stepped:
            self.optimizer.step()
        self.job_step += 1
        self.samples += len(batch["owners"])
        return sum(stepped) / len(stepped) if stepped else float("nan")

    # -- checkpoints ---------------------------------------------------------------------

    def checkpoint_dir(self) -> Path:
        return Path(self.cfg.output_dir) / "checkpoints"

    def save_checkpoint(self) -> Path:
        tensors: dict[str, torch.Tensor] = {}
        for e, emb in enumerate(self.embeddings):
            for i, c in enumerate(self.cfg.concepts):
                tensors[f"rows/{e}/{c.name}"] = emb.rows[i].detach()
        params = [p for emb in self.embeddings for p in emb.rows]
        index = {id(p): k for k, p in enumerate(params)}
        for p, st in self.optimizer.state.items():
            for key, value in st.items():
                if torch.is_tensor(value):
                    tensors[f"optim/{index[id(p)]}/{key}"] = value.detach().reshape(value.shape)
        for name, gen in self.generators.items():
            tensors[f"rng/{name}"] = gen.get_state()
        meta = {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": self.cfg.fingerprint(),
            "job_step": str(self.job_step),
            "samples": str(self.samples),
            "skipped": str(self.skipped),
            "done": json.dumps(self.done),
            "bad": json.dumps(self.bad),
            "stopped": json.dumps(self.stopped),
        }
        path = self.checkpoint_dir() / f"step-{self.job_step:08d}.safetensors"
        save_safetensors(tensors, path, metadata=meta)
        old = sorted(self.checkpoint_dir().glob("step-*.safetensors"))[: -self.cfg.keep_checkpoints]
        for stale in old:
            stale.unlink(missing_ok=True)
        return path

    def load_checkpoint(self, path: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a dti_fast checkpoint; remove it or start without --resume")
        if meta.get("fingerprint") != self.cfg.fingerprint():
            raise ValueError(
                f"checkpoint {path} belongs to a different job (model, concepts or hyper-parameters changed); "
                "resume with the same settings, or use a new --output"
            )
        tensors = load_safetensors(path)
        with torch.no_grad():
            for e, emb in enumerate(self.embeddings):
                for i, c in enumerate(self.cfg.concepts):
                    saved = tensors[f"rows/{e}/{c.name}"]
                    if saved.shape != emb.rows[i].shape:
                        raise ValueError(f"checkpoint {path}: rows of {c.name!r} have shape {tuple(saved.shape)}, "
                                         f"expected {tuple(emb.rows[i].shape)}")
                    emb.rows[i].copy_(saved)
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optim/"):
                _, k, name = key.split("/", 2)
                state.setdefault(int(k), {})[name] = value
        current = self.optimizer.state_dict()
        current["state"] = state
        self.optimizer.load_state_dict(current)
        for name, gen in self.generators.items():
            gen.set_state(tensors[f"rng/{name}"])
        self.job_step = int(meta["job_step"])
        self.samples = int(meta["samples"])
        self.skipped = int(meta["skipped"])
        self.done = json.loads(meta["done"])
        self.bad = json.loads(meta["bad"])
        self.stopped = json.loads(meta["stopped"])

    def latest_checkpoint(self) -> Optional[Path]:
        found = sorted(self.checkpoint_dir().glob("step-*.safetensors"))
        return found[-1] if found else None


def train(cfg: TrainConfig) -> TrainResult:
    """Run a training job and write every concept's outputs; returns what it made.

    Bad input raises before the model loads. The output folder is locked for
    the job's lifetime. SIGINT/SIGTERM write a checkpoint and raise
    :class:`TrainingInterrupted`; ``resume=True`` continues from the newest
    checkpoint and ends with the same vectors as an uninterrupted run.
    """
    validate_config(cfg)
    images = [load_concept_images(c, cfg.resolution) for c in cfg.concepts]
    with _OutputLock(Path(cfg.output_dir)), _StopSignals() as stop:
        return _run(cfg, images, stop)


def _run(cfg: TrainConfig, images: list[ConceptImages], stop: _StopSignals) -> TrainResult:
    job = _Job(cfg, images)
    if cfg.resume:
        latest = job.latest_checkpoint()
        if latest is not None:
            job.load_checkpoint(latest)
    total = sum(cfg.concept_steps(c) for c in cfg.concepts)
    already = sum(job.done.values())
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=already, unit="concept-step", dynamic_ncols=True, desc="training")
    started = time.perf_counter()
    samples_before = job.samples
    ema = None
    try:
        while stop.signum is None:
            before = sum(job.done.values())
            loss = job.step()
            if loss is None:
                break
            if math.isfinite(loss):
                ema = loss if ema is None else 0.9 * ema + 0.1 * loss
            if bar is not None:
                elapsed = time.perf_counter() - started
                bar.update(sum(job.done.values()) - before)
                bar.set_postfix(loss=f"{ema if ema is not None else float('nan'):.4f}",
                                samples_s=f"{(job.samples - samples_before) / max(elapsed, 1e-9):.1f}")
            if job.job_step % cfg.checkpoint_every == 0:
                job.save_checkpoint()
    finally:
        if bar is not None:
            bar.close()
    if stop.signum is not None:
        raise TrainingInterrupted(stop.signum, job.save_checkpoint())
    seconds = time.perf_counter() - started
    job.save_checkpoint()
    concept_dirs, vectors = export.export_job(job)
    if cfg.validation_prompts:
        export.validation_grids(job)
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
    )

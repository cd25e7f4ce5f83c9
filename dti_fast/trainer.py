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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from . import export
from .concept_files import validate_export_names, validate_trigger
from .distributed import DistContext, all_reduce_grads, shard_concepts
from .distributed import setup as setup_distributed
from .data import Concept, ConceptImages, load_concept_images, random_crop
from .embedding import ConceptTokens, DirectionalEmbedding, add_concept_tokens, initializer_ids, install_embedding, start_rows
from .io import load_safetensors, save_safetensors
from .latents import LatentCache
from .optim import SphericalSGD

__all__ = ["TrainConfig", "TrainResult", "train", "METHODS", "JobError", "OutputBusyError", "TrainingInterrupted"]

METHODS = ("dti", "ti")
DEFAULT_LR = {"dti": 0.01, "ti": 5e-3}
CHECKPOINT_FORMAT = "dti_fast-checkpoint-2"


@dataclass
class TrainConfig:
    """A training job. Defaults are the paper's (SDXL: resolution 768 is set per model by the caller)."""

    model: str
    output_dir: Path
    concepts: list[Concept]
    method: str = "dti"
    steps: int = 400
    batch_size: int = 4
    max_batch: Union[int, str, None] = None  # None: every active concept each step; "auto": fit the device memory
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
    parallel: str = "shard"
    # Throughput and memory levers. Only the latent cache changes what is sampled (crops on a fixed grid).
    latent_cache: bool = True
    latent_cache_crops: int = 16
    text_cache: Union[bool, str] = "auto"  # "auto": on for SDXL (measured faster), off for SD (no gain)
    attention: str = "sdpa"
    gradient_checkpointing: bool = False
    channels_last: bool = False
    compile: bool = False
    optim_bits: int = 32

    def effective_lr(self, data_world: int = 1) -> float:
        """The learning rate, scaled by the global batch per concept unless ``scale_lr`` is off."""
        base = self.lr if self.lr is not None else DEFAULT_LR[self.method]
        return base * self.batch_size * data_world if self.scale_lr else base

    def concept_steps(self, concept: Concept) -> int:
        return concept.steps if concept.steps is not None else self.steps

    def concept_fingerprint(self, concept: Concept, data_world: int = 1) -> str:
        """A hash of everything that shapes one concept's vectors (not step counts or output options).

        Concepts train independently of their batch-mates, so a checkpoint of a
        concept stays valid whichever job or shard it was trained in.
        """
        keys = ("model", "method", "batch_size", "resolution", "lr", "scale_lr", "kappa", "beta",
                "norm_scale", "init", "weight_decay", "seed", "latent_cache", "optim_bits")
        data = {k: getattr(self, k) for k in keys}
        if self.latent_cache:
            data["latent_cache_crops"] = self.latent_cache_crops
        data["data_world"] = data_world
        data["concept"] = {"name": concept.name, "images": str(concept.images), "init": concept.init,
                           "placeholder": concept.placeholder, "kind": concept.kind}
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
    peak_memory: Optional[int] = None  # bytes during the loop: CUDA max allocated, or the CPU process's peak RSS
    batch_per_step: int = 0  # most images in one forward pass
    device: str = ""

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else float("nan")


def validate_config(cfg: TrainConfig) -> None:
    """Refuse a bad job before anything expensive happens."""
    if cfg.method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    for name in ("steps", "batch_size", "resolution", "checkpoint_every", "keep_checkpoints",
                 "validation_inference_steps", "max_bad_steps", "latent_cache_crops"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if cfg.max_batch == "auto":
        pass
    elif cfg.max_batch is not None and (not isinstance(cfg.max_batch, int) or isinstance(cfg.max_batch, bool)):
        raise ValueError(f"max_batch must be a positive integer, 'auto' or None, got {cfg.max_batch!r}")
    elif cfg.max_batch is not None and cfg.max_batch < cfg.batch_size:
        raise ValueError(f"max_batch ({cfg.max_batch}) must be at least batch_size ({cfg.batch_size})")
    if cfg.text_cache not in (True, False, "auto"):
        raise ValueError(f"text_cache must be true, false or 'auto', got {cfg.text_cache!r}")
    if cfg.attention not in ("sdpa", "xformers"):
        raise ValueError(f"attention must be 'sdpa' or 'xformers', got {cfg.attention!r}")
    if cfg.attention == "xformers":
        import importlib.util

        if importlib.util.find_spec("xformers") is None:
            raise ValueError("--attention xformers needs the xformers package, which is not installed: "
                             "pip install 'dti-fast[xformers]' (a CUDA build matching torch), or use --attention sdpa")
    if cfg.optim_bits not in (32, 8):
        raise ValueError(f"optim_bits must be 32 or 8, got {cfg.optim_bits!r}")
    if cfg.optim_bits == 8 and cfg.method == "ti":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("--optim-bits 8 needs bitsandbytes (pip install bitsandbytes), or use --optim-bits 32")
    if cfg.resolution % 8:
        raise ValueError(f"resolution must be a multiple of 8 (the VAE's factor), got {cfg.resolution}")
    if cfg.lr is not None and not cfg.lr > 0:
        raise ValueError(f"lr must be positive, got {cfg.lr!r}")
    if cfg.kappa < 0 or not 0 <= cfg.beta < 1:
        raise ValueError(f"kappa must be >= 0 and beta in [0, 1), got kappa={cfg.kappa}, beta={cfg.beta}")
    if cfg.parallel not in ("shard", "data"):
        raise ValueError(f"parallel must be 'shard' or 'data', got {cfg.parallel!r}")
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
    validate_export_names(cfg.concepts, cfg.method, rescaled=cfg.export_ti_rescaled and cfg.method == "ti")
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

    def __init__(self, cfg: TrainConfig, images: list[ConceptImages], ctx: DistContext, checkpoint_dir: Path) -> None:
        from .models import load_model_parts

        self.cfg = cfg
        self.images = images
        self.ctx = ctx
        self.data_world = ctx.world_size if cfg.parallel == "data" else 1
        self.checkpoint_dir = checkpoint_dir
        self.writes = ctx.is_main or cfg.parallel == "shard"
        if cfg.device != "auto":
            self.device = torch.device(cfg.device)
        elif torch.cuda.is_available():
            self.device = torch.device("cuda", ctx.local_rank if ctx.enabled else torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        precision = cfg.precision if cfg.precision != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        self.weight_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        if cfg.attention == "xformers" and self.device.type != "cuda":
            raise ValueError(f"--attention xformers needs a CUDA device, not {self.device}; use --attention sdpa")
        self.parts = load_model_parts(cfg.model, dtype=self.weight_dtype, device=str(self.device))
        self.sdxl = self.parts.family == "sdxl"
        self._install_tokens()
        self._build_optimizer()
        vae_cfg = self.parts.vae.config
        self.vae_factor = 2 ** (len(vae_cfg.block_out_channels) - 1)
        self.latent_channels = vae_cfg.latent_channels
        self.scaling = vae_cfg.scaling_factor
        self.shift = getattr(vae_cfg, "shift_factor", None) or 0.0
        self._configure_model()
        self._tokenize_templates()
        self.latent_cache = (
            LatentCache(self.parts.vae, images, cfg.resolution, self.vae_factor, self.device, self.weight_dtype,
                        max_crops=cfg.latent_cache_crops)
            if cfg.latent_cache else None
        )
        use_text_cache = cfg.text_cache if cfg.text_cache != "auto" else self.sdxl
        self.text_caches = self._text_caches() if use_text_cache else None
        self.generators = {c.name: _concept_generator(cfg.seed, c.name) for c in cfg.concepts}
        self.done = {c.name: 0 for c in cfg.concepts}
        self.bad = {c.name: 0 for c in cfg.concepts}  # consecutive non-finite steps
        self.stopped: dict[str, str] = {}
        self.job_step = 0
        self.samples = 0
        self.skipped = 0
        self.concepts_per_step: Optional[int] = None  # set by plan_batch() for max_batch="auto"
        self.max_images_per_step = 0

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
            for c in cfg.concepts:
                validate_trigger(tok, c, cfg.method)
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

    def _configure_model(self) -> None:
        """Attention kernels, gradient checkpointing and memory format (none changes the math)."""
        cfg, unet = self.cfg, self.parts.unet
        if cfg.attention == "xformers":
            for module in (unet, self.parts.vae):
                module.enable_xformers_memory_efficient_attention()
        else:
            from diffusers.models.attention_processor import AttnProcessor2_0

            # PyTorch's fused scaled_dot_product_attention (flash / memory-efficient kernels on CUDA).
            for module in (unet, self.parts.vae):
                module.set_attn_processor(AttnProcessor2_0())
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            for enc in self.parts.text_encoders:
                if hasattr(enc, "activation_checkpointing_enable"):  # transformers >= 5
                    enc.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                else:
                    enc.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                # transformers checkpoints only in training mode; CLIP's dropouts are 0, so the math is unchanged.
                if not any(getattr(enc.config, k, 0.0) for k in ("dropout", "attention_dropout")):
                    enc.train()
        if cfg.channels_last:
            unet.to(memory_format=torch.channels_last)
        # The training step's UNet; parts.unet stays the plain module (exports and sample pipelines use it).
        self.unet = torch.compile(unet) if cfg.compile else unet

    def _tokenize_templates(self) -> None:
        """Token ids of every (concept, template) prompt, per encoder: tokenized once."""
        self.prompt_ids: list[list[torch.Tensor]] = []  # per encoder, per concept: (n_templates, max_length)
        for enc_index, tok in enumerate(self.parts.tokenizers):
            per_concept = []
            for ci, c in enumerate(self.cfg.concepts):
                prompts = [t.format(self.tokens[enc_index][ci].prompt_string) for t in c.templates]
                ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                          return_tensors="pt").input_ids
                per_concept.append(ids)  # on the CPU: the text cache reads them there without a device sync
            self.prompt_ids.append(per_concept)

    def _text_caches(self) -> list:
        from .textcache import PrefixCachedTextEncoder

        caches = []
        for enc_index, (enc, emb) in enumerate(zip(self.parts.text_encoders, self.embeddings)):
            pooled = self.sdxl and enc_index == len(self.parts.text_encoders) - 1
            caches.append(PrefixCachedTextEncoder(enc, mode="penultimate" if self.sdxl else "last",
                                                  pooled=pooled, first_learned_id=emb.first_id))
        return caches

    def concept_params(self, index: int) -> list[torch.nn.Parameter]:
        return [emb.rows[index] for emb in self.embeddings]

    def _build_optimizer(self) -> None:
        cfg = self.cfg
        params = [p for emb in self.embeddings for p in emb.rows]
        lr = cfg.effective_lr(self.data_world)
        if cfg.method == "dti":
            priors = [mu for emb in self.embeddings for mu in emb.priors]
            self.optimizer: torch.optim.Optimizer = SphericalSGD(
                [{"params": params, "prior": priors}], lr=lr, kappa=cfg.kappa, beta=cfg.beta
            )
        elif cfg.optim_bits == 8:
            import bitsandbytes as bnb

            # Both moments blockwise in 8 bits (blocks of 256 values, one fp32 absmax each).
            # min_8bit_size=1: a concept's rows (n x 768) are below bitsandbytes' default threshold.
            self.optimizer = bnb.optim.AdamW8bit(params, lr=lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay,
                                                 min_8bit_size=1)
        else:
            # DTI's SphericalSGD keeps one fp32 scalar per row, so optim_bits does not apply to it.
            self.optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)

    # -- one step -------------------------------------------------------------------

    def active_concepts(self) -> list[int]:
        """Indices of the concepts that still have steps to take and were not stopped."""
        return [i for i, c in enumerate(self.cfg.concepts)
                if self.done[c.name] < self.cfg.concept_steps(c) and c.name not in self.stopped]

    def pick_concepts(self) -> list[int]:
        cfg = self.cfg
        active = self.active_concepts()
        if not active:
            return []
        if self.concepts_per_step is not None:
            per_step = self.concepts_per_step
        else:
            per_step = len(active) if cfg.max_batch is None else max(1, cfg.max_batch // cfg.batch_size)
        if per_step >= len(active):
            return active
        start = (self.job_step * per_step) % len(active)
        return [active[(start + k) % len(active)] for k in range(per_step)]

    def _draw_sample(self, ci: int) -> dict:
        """One training sample of concept ``ci``, every random choice from the concept's own generator."""
        c, data, gen = self.cfg.concepts[ci], self.images[ci], self.generators[self.cfg.concepts[ci].name]
        res = self.cfg.resolution
        lat = res // self.vae_factor
        k = int(torch.randint(0, len(data.arrays), (1,), generator=gen))
        if self.latent_cache is not None:
            pixels = None
            crop, top, left = self.latent_cache.draw(ci, k, gen)
        else:
            crop = None
            pixels, (top, left) = random_crop(data.arrays[k], res, gen)
        template = int(torch.randint(0, len(c.templates), (1,), generator=gen))
        oh, ow = data.original_sizes[k]
        return {
            "pixels": pixels,
            "crop": (ci, k, crop),
            "template": template,
            "time_ids": [oh, ow, top, left, res, res],
            "timestep": int(torch.randint(0, self.parts.noise_scheduler.config.num_train_timesteps, (1,), generator=gen)),
            "noise": torch.randn(self.latent_channels, lat, lat, generator=gen),
            "vae_eps": torch.randn(self.latent_channels, lat, lat, generator=gen),
        }

    def make_batch(self, chosen: Sequence[int]) -> dict:
        """This rank's samples of the chosen concepts (``batch_size`` each)."""
        b = self.cfg.batch_size
        samples, owners = [], []
        for ci in chosen:
            # Data parallel: every rank draws the global batch and keeps its own slice,
            # so W ranks see exactly the samples one rank with W times the batch would.
            drawn = [self._draw_sample(ci) for _ in range(b * self.data_world)]
            mine = drawn[self.ctx.rank * b : (self.ctx.rank + 1) * b] if self.data_world > 1 else drawn
            samples += mine
            owners += [ci] * len(mine)
        batch = {
            "input_ids": [
                torch.stack([self.prompt_ids[e][s["crop"][0]][s["template"]] for s in samples])
                for e in range(len(self.embeddings))
            ],
            "time_ids": torch.tensor([s["time_ids"] for s in samples], dtype=torch.float32),
            "timesteps": torch.tensor([s["timestep"] for s in samples], dtype=torch.long),
            "noise": torch.stack([s["noise"] for s in samples]),
            "vae_eps": torch.stack([s["vae_eps"] for s in samples]),
            "owners": owners,
        }
        if self.latent_cache is not None:
            with torch.no_grad():
                batch["latents"] = self.latent_cache.latents([s["crop"] for s in samples], batch["vae_eps"])
        else:
            batch["pixels"] = torch.stack([s["pixels"] for s in samples])
        return batch

    def encode_text(self, input_ids: list[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The UNet's text conditioning: hidden states (encoders concatenated) and SDXL's pooled embedding."""
        hidden, pooled = [], None
        last = len(self.parts.text_encoders) - 1
        for enc_index, enc in enumerate(self.parts.text_encoders):
            if self.text_caches is not None:
                h, p = self.text_caches[enc_index](input_ids[enc_index])
                hidden.append(h)
                if self.sdxl and enc_index == last:
                    pooled = p
                continue
            ids = input_ids[enc_index].to(self.device)
            if self.sdxl:
                out = enc(ids, output_hidden_states=True)
                hidden.append(out.hidden_states[-2])
                if enc_index == last:
                    pooled = out[0]
            else:
                hidden.append(enc(ids)[0])
        return torch.cat(hidden, dim=-1), pooled

    def loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's loss (sum of per-concept means) and the per-concept terms."""
        dev = self.device
        parts = self.parts
        with torch.no_grad():
            if "latents" in batch:
                latents = batch["latents"]
            else:
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
            hidden, pooled = self.encode_text(batch["input_ids"])
            kwargs = {}
            if self.sdxl:
                kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": batch["time_ids"].to(dev, hidden.dtype)}
            sample = noisy.to(hidden.dtype)
            if self.cfg.channels_last:
                sample = sample.contiguous(memory_format=torch.channels_last)
            pred = self.unet(sample, t, encoder_hidden_states=hidden, **kwargs).sample
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        # Per-concept means, summed: each concept's gradient is what it would get training alone.
        owners = torch.tensor(batch["owners"], device=per_sample.device)
        per_concept = torch.zeros(len(self.cfg.concepts), device=per_sample.device)
        per_concept = per_concept.index_add(0, owners, per_sample / (self.cfg.batch_size * self.data_world))
        return per_concept.sum(), per_concept

    # -- filling the device (max_batch="auto") ------------------------------------------

    def _probe(self, concepts: Sequence[int], measure_saved: bool = False) -> int:
        """One forward+backward on ``concepts`` that changes no training state; returns saved-activation bytes."""
        states = {i: self.generators[self.cfg.concepts[i].name].get_state() for i in concepts}
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor):
            if measure_saved and t.device == self.device:
                try:
                    key = t.untyped_storage().data_ptr()
                    saved[key] = max(saved.get(key, 0), t.untyped_storage().nbytes())
                except (RuntimeError, NotImplementedError):
                    pass
            return t

        try:
            batch = self.make_batch(list(concepts))
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                total, _ = self.loss(batch)
            total.backward()
        finally:
            for i, state in states.items():
                self.generators[self.cfg.concepts[i].name].set_state(state)
            for p in (p for emb in self.embeddings for p in emb.rows):
                p.grad = None
        return sum(saved.values())

    def plan_batch(self) -> int:
        """Pick how many concepts share a step so the step fills the device's memory; returns that number.

        CUDA: the peak of probe steps with 1 and 2 concepts gives a fixed and a
        per-concept cost; the largest count that fits in free memory (less 10%
        headroom) is then tried, and lowered on out-of-memory. CPU: the
        per-concept cost is the activation memory saved for backward
        (measured with saved-tensor hooks) against available RAM. Probe steps
        leave rows, optimizer state and random generators untouched.
        """
        from .memory import peak_bytes, reset_peak, usable_bytes

        active = self.active_concepts()
        n = len(active)
        fit = n
        usable = usable_bytes(self.device)
        if n > 1 and usable is not None:
            if self.device.type == "cuda":
                peaks = []
                for k in (1, 2):
                    torch.cuda.empty_cache()
                    reset_peak(self.device)
                    try:
                        self._probe(active[:k])
                    except torch.cuda.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        if k == 1:
                            raise JobError(
                                f"one concept's step (batch_size {self.cfg.batch_size} at {self.cfg.resolution} px) "
                                f"does not fit in {self.device}'s memory; lower --batch-size or add "
                                "--gradient-checkpointing"
                            ) from None
                        break
                    peaks.append(peak_bytes(self.device))
                if len(peaks) < 2:
                    fit = 1
                else:
                    per_concept = max(peaks[1] - peaks[0], 1)
                    fit = int((usable - (peaks[0] - per_concept)) // per_concept)
            else:
                per_concept = max(self._probe(active[:1], measure_saved=True), 1)
                rss = peak_bytes(self.device) or 0
                # Activations plus as much again for their gradients and temporaries during backward.
                fit = int((usable - rss) // (2 * per_concept))
            fit = max(1, min(n, fit))
            if self.device.type == "cuda":
                while fit > 1:
                    try:
                        torch.cuda.empty_cache()
                        self._probe(active[:fit])
                        break
                    except torch.cuda.OutOfMemoryError:
                        fit = max(1, int(fit * 0.85))
                torch.cuda.empty_cache()
        if self.data_world > 1:
            agreed = torch.tensor([fit], device=self.device if self.device.type == "cuda" else "cpu")
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
            fit = int(agreed.item())
        self.concepts_per_step = fit
        return fit

    def step(self) -> Optional[float]:
        """One job step; returns the mean loss of the concepts that stepped (None when all are done)."""
        chosen = self.pick_concepts()
        if not chosen:
            return None
        batch = self.make_batch(chosen)
        self.max_images_per_step = max(self.max_images_per_step, len(batch["owners"]))
        self.optimizer.zero_grad(set_to_none=True)
        total, per_concept = self.loss(batch)
        total.backward()
        if self.data_world > 1:
            all_reduce_grads([p for emb in self.embeddings for p in emb.rows])
            torch.distributed.all_reduce(per_concept.detach())        # One host sync: which chosen concepts have a finite loss and finite gradients.
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
        self.samples += len(batch["owners"]) * self.data_world
        return sum(stepped) / len(stepped) if stepped else float("nan")

    # -- checkpoints ---------------------------------------------------------------------
    # Every tensor is keyed by concept, so a concept's state can be picked up by
    # any later job or shard with the same concept fingerprint.

    def fingerprints(self) -> dict[str, str]:
        return {c.name: self.cfg.concept_fingerprint(c, self.data_world) for c in self.cfg.concepts}

    def save_checkpoint(self) -> Optional[Path]:
        if not self.writes:
            return None
        tensors: dict[str, torch.Tensor] = {}
        scalars: dict[str, object] = {}
        for e, emb in enumerate(self.embeddings):
            for i, c in enumerate(self.cfg.concepts):
                p = emb.rows[i]
                tensors[f"rows/{e}/{c.name}"] = p.detach()
                for key, value in self.optimizer.state.get(p, {}).items():
                    if torch.is_tensor(value):
                        # A copy: some optimizers share a tensor between params (bitsandbytes' quantization maps).
                        tensors[f"optim/{e}/{c.name}/{key}"] = value.detach().clone()
                    elif isinstance(value, (bool, int, float)):  # e.g. bitsandbytes' integer step
                        scalars[f"optim/{e}/{c.name}/{key}"] = value
        for name, gen in self.generators.items():
            tensors[f"rng/{name}"] = gen.get_state()
        meta = {
            "format": CHECKPOINT_FORMAT,
            "fingerprints": json.dumps(self.fingerprints()),
            "job_step": str(self.job_step),
            "samples": str(self.samples),
            "skipped": str(self.skipped),
            "done": json.dumps(self.done),
            "bad": json.dumps(self.bad),
            "stopped": json.dumps(self.stopped),
            "optim_scalars": json.dumps(scalars),
        }
        path = self.checkpoint_dir / f"step-{self.job_step:08d}.safetensors"
        save_safetensors(tensors, path, metadata=meta)
        for stale in sorted(self.checkpoint_dir.glob("step-*.safetensors"))[: -self.cfg.keep_checkpoints]:
            stale.unlink(missing_ok=True)
        return path

    def restore(self) -> list[Path]:
        """Load each concept's newest state from any checkpoint under <output>/checkpoints; returns the files used."""
        from safetensors import safe_open

        root = Path(self.cfg.output_dir) / "checkpoints"
        wanted = self.fingerprints()
        best: dict[str, tuple[int, Path, dict]] = {}
        foreign = []
        for path in sorted(root.glob("**/step-*.safetensors")):
            try:
                with safe_open(str(path), framework="pt") as fh:
                    meta = fh.metadata() or {}
            except Exception as err:
                raise ValueError(f"{path} is not a readable checkpoint ({err}); delete it and rerun with --resume") from err
            if meta.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"{path} is not a dti_fast checkpoint of this version; move it away or use a new --output")
            saved = json.loads(meta["fingerprints"])
            done = json.loads(meta["done"])
            for name, fp in saved.items():
                if name not in wanted:
                    continue
                if fp != wanted[name]:
                    foreign.append(path)
                    continue
                if name not in best or done[name] > best[name][0]:
                    best[name] = (done[name], path, meta)
        if not best:
            if foreign:
                raise ValueError(
                    f"checkpoint {foreign[0]} belongs to a different job (model, concepts or hyper-parameters "
                    "changed); resume with the same settings, or use a new --output"
                )
            return []
        param_index = {id(p): k for k, p in enumerate(p for emb in self.embeddings for p in emb.rows)}
        state = {}
        used: dict[Path, dict[str, torch.Tensor]] = {}
        for name, (_, path, meta) in best.items():
            if path not in used:
                used[path] = load_safetensors(path)
            tensors = used[path]
            i = [c.name for c in self.cfg.concepts].index(name)
            with torch.no_grad():
                for e, emb in enumerate(self.embeddings):
                    saved = tensors.get(f"rows/{e}/{name}")
                    if saved is None or saved.shape != emb.rows[i].shape:
                        got = "missing" if saved is None else f"shape {tuple(saved.shape)}"
                        raise ValueError(f"checkpoint {path}: rows of {name!r} have {got}, expected "
                                         f"{tuple(emb.rows[i].shape)}; delete it or use a new --output")
                    emb.rows[i].copy_(saved)
                    prefix = f"optim/{e}/{name}/"
                    entry = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                    scalars = json.loads(meta.get("optim_scalars", "{}"))
                    entry.update({k[len(prefix):]: v for k, v in scalars.items() if k.startswith(prefix)})
                    if entry:
                        state[param_index[id(emb.rows[i])]] = entry
            self.generators[name].set_state(tensors[f"rng/{name}"])
            self.done[name] = json.loads(meta["done"])[name]
            self.bad[name] = json.loads(meta["bad"])[name]
            stopped = json.loads(meta["stopped"])
            if name in stopped:
                self.stopped[name] = stopped[name]
        current = self.optimizer.state_dict()
        current["state"] = state
        self.optimizer.load_state_dict(current)
        files = sorted({path for _, path, _ in best.values()})
        if len(files) == 1:
            meta = next(iter(best.values()))[2]
            self.job_step = int(meta["job_step"])
            self.samples = int(meta["samples"])
            self.skipped = int(meta["skipped"])
        else:
            self.job_step = max(self.done.values())
        return files


def _finished_concepts(cfg: TrainConfig, data_world: int) -> set[str]:
    """Concepts whose exports are complete for these settings (skipped by --resume)."""
    finished = set()
    for c in cfg.concepts:
        info_path = Path(cfg.output_dir) / c.name / "concept.json"
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if (info.get("status") == "complete" and info.get("fingerprint") == cfg.concept_fingerprint(c, data_world)
                and info.get("steps") == cfg.concept_steps(c)):
            finished.add(c.name)
    return finished


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
    finished = _finished_concepts(cfg, data_world) if cfg.resume else set()
    subset = [i for i in subset if cfg.concepts[i].name not in finished]
    checkpoint_dir = Path(cfg.output_dir) / "checkpoints"
    if ctx.enabled and cfg.parallel == "shard":
        shards = shard_concepts([cfg.concept_steps(cfg.concepts[i]) for i in subset], ctx.world_size)
        subset = [subset[k] for k in shards[ctx.rank]]
        checkpoint_dir = checkpoint_dir / f"rank{ctx.rank}-of-{ctx.world_size}"
    mine = [cfg.concepts[i] for i in subset]
    if cfg.resume and ctx.is_main and ctx.enabled:
        from .distributed import failure_report

        previous = failure_report(Path(cfg.output_dir), ctx.world_size)
        if previous:
            print(f"dti-fast: the previous run did not finish: {previous.split('. ')[0]}", file=sys.stderr)
        print(f"dti-fast: resuming; {len(finished)} concept(s) finished, {len(cfg.concepts) - len(finished)} to train",
              file=sys.stderr)
    images = [load_concept_images(c, cfg.resolution) for c in mine]
    sub_cfg = replace(cfg, concepts=mine, progress=cfg.progress and ctx.is_main)
    lock = _OutputLock(Path(cfg.output_dir)) if ctx.is_main else contextlib.nullcontext()
    with _agreed(lock, ctx), _StopSignals() as stop:
        names = [c.name for c in mine]
        ctx.write_status(Path(cfg.output_dir), "running", names)
        try:
            result = _run(sub_cfg, images, stop, ctx, checkpoint_dir) if mine else _empty_result(cfg)
        except TrainingInterrupted as err:
            ctx.write_status(Path(cfg.output_dir), f"interrupted by {signal.Signals(err.signum).name}", names)
            if ctx.enabled and ctx.is_main:
                from .distributed import failure_report

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
    from .distributed import failure_report

    try:
        torch.distributed.barrier()
        problem = None
    except Exception as err:  # a dead peer breaks the collective
        problem = f"({type(err).__name__} while waiting for the other ranks)"
    if ctx.is_main:
        report = failure_report(Path(cfg.output_dir), ctx.world_size)
        if report or problem:
            raise JobError(report or problem)


def _empty_result(cfg: TrainConfig) -> TrainResult:
    return TrainResult(output_dir=Path(cfg.output_dir), concept_dirs={}, vectors={}, scales=[], job_steps=0,
                       samples=0, seconds=0.0, skipped_steps=0)


def _run(cfg: TrainConfig, images: list[ConceptImages], stop: _StopSignals, ctx: DistContext,
         checkpoint_dir: Path) -> TrainResult:
    from .memory import peak_bytes, reset_peak

    job = _Job(cfg, images, ctx, checkpoint_dir)
    if cfg.resume:
        job.restore()
    if cfg.max_batch == "auto":
        fit = job.plan_batch()
        if cfg.progress:
            print(f"dti-fast: max_batch auto: {fit} concept(s) x {cfg.batch_size} image(s) per step on {job.device}",
                  file=sys.stderr)
    reset_peak(job.device)
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
        raise TrainingInterrupted(stop.signum, job.save_checkpoint() or checkpoint_dir)
    seconds = time.perf_counter() - started
    peak = peak_bytes(job.device)
    job.save_checkpoint()
    concept_dirs, vectors = export.export_job(job, write=job.writes)
    if cfg.validation_prompts and job.writes:
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
        peak_memory=peak,
        batch_per_step=job.max_images_per_step,
        device=str(job.device),
    )

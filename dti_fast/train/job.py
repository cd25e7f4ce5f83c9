"""One training job's state and step: model and token setup, samples, the loss, the update.

:class:`TrainingJob` reads like the loop it serves: it loads the frozen model
once, installs one :class:`~dti_fast.embedding.DirectionalEmbedding` per text
encoder, draws each concept's samples from the concept's own generator,
computes the per-concept loss and takes the optimizer step. Choosing how many
concepts share a step is :mod:`.batching`; saving and restoring is
:mod:`.checkpoint`; the process around it is :mod:`.run`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import models
from ..concept_files import validate_trigger
from ..data import ConceptImages, normalize_pixels, random_crop_uint8
from ..distributed import DistContext, all_reduce_grads
from ..embedding import (
    ConceptTokens,
    DirectionalEmbedding,
    add_concept_tokens,
    initial_rows,
    initializer_ids,
    install_embedding,
)
from ..export import ConceptRecord, EncoderVectors
from ..families import Conditioning, family_of
from ..latents import LatentCache
from ..models import resolve_device, resolve_dtype
from ..optim import SphericalSGD
from ..sphere import norm_scale
from .batching import pick_concepts
from .config import TrainConfig

__all__ = ["TrainingJob", "check_job_tokens", "check_resolution", "preflight"]


def _concept_generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def check_job_tokens(cfg: TrainConfig, family: str, tokenizers: Sequence) -> None:
    """Refuse (``ValueError``) what the model's family or tokenizers cannot train, touching no weights.

    Options the family cannot honour; per tokenizer, each concept's trigger, placeholder
    (not a word of the vocabulary, one token once added) and initializer (at least one
    ordinary piece; SDXL: as many pieces in both tokenizers).
    """
    fam = family_of(family)
    if cfg.text_cache is True and not fam.prefix_cache:
        raise ValueError(
            f"--text-cache: not available for {fam.name} models (UMT5's encoder is bidirectional, so no prefix "
            "of a prompt is independent of the learned tokens); leave it at auto or off"
        )
    if fam.flow and cfg.attention == "xformers":
        raise ValueError(
            f"--attention xformers: {fam.name} models keep diffusers' own attention processors "
            "(PyTorch SDPA); use --attention sdpa"
        )
    if fam.flow and cfg.channels_last:
        raise ValueError(f"--channels-last applies to UNet models, not {fam.name}'s transformer; leave it off")
    if fam.name == "sana":
        for c in cfg.concepts:
            if c.placeholder != c.placeholder.lower():
                raise ValueError(
                    f"concept {c.name!r}: placeholder {c.placeholder!r} has upper-case letters, but SanaPipeline "
                    f"lower-cases prompts, so it would never be typed; use {c.placeholder.lower()!r}"
                )
    counts: dict[str, int] = {}
    for enc_index, tok in enumerate(tokenizers):
        probe = copy.deepcopy(tok)  # placeholders are added to a copy: the real tokenizer stays untouched
        for c in cfg.concepts:
            validate_trigger(tok, c, cfg.method)
            n = len(initializer_ids(tok, c.init, c.name))
            if enc_index > 0 and n != counts[c.name]:
                raise ValueError(
                    f"concept {c.name!r}: initializer {c.init!r} gives a different number of pieces in the "
                    "two tokenizers; choose initializer words both tokenize alike"
                )
            counts[c.name] = n
            add_concept_tokens(probe, c.placeholder, n, c.name)


def check_resolution(cfg: TrainConfig, family: str, vae) -> int:
    """The VAE's pixels per latent cell; refuses a resolution that is not a multiple of it."""
    factor = family_of(family).vae_factor(vae)
    if cfg.resolution % factor:
        raise ValueError(
            f"resolution {cfg.resolution} is not a multiple of this model's VAE factor {factor}; "
            f"use a multiple of {factor} (e.g. {max(factor, cfg.resolution // factor * factor)})"
        )
    return factor


def preflight(cfg: TrainConfig) -> models.ModelPreview:
    """:func:`check_job_tokens` and :func:`check_resolution` with the model's tokenizers and configs alone,
    before weights load; returns the preview they were checked on (its tokenizers left unchanged), which
    :class:`TrainingJob` takes so as not to load and check them again."""
    from types import SimpleNamespace

    preview = models.preview_model(cfg.model)
    check_job_tokens(cfg, preview.family, preview.tokenizers)
    check_resolution(cfg, preview.family, SimpleNamespace(config=SimpleNamespace(**preview.vae_config)))
    return preview


class TrainingJob:
    """A running job's state: the frozen model, the learned rows, the optimizer, each concept's progress.

    Built once per job (or per shard); :meth:`step` takes one step of the
    concepts :func:`~dti_fast.train.batching.pick_concepts` chooses. Every
    concept draws its samples from its own generator, so what it sees does not
    depend on its batch-mates.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        images: list[ConceptImages],
        ctx: DistContext | None = None,
        checkpoint_dir: Path | None = None,
        preview: models.ModelPreview | None = None,
    ) -> None:
        """``preview``: what :func:`preflight` returned for this config or one holding more concepts of the
        same model; its tokenizers, checked there, are used instead of loading and checking them again."""
        ctx = ctx or DistContext()

        self.cfg = cfg
        self.images = images
        self.ctx = ctx
        self.data_world = ctx.world_size if cfg.parallel == "data" else 1
        self.checkpoint_dir = checkpoint_dir or Path(cfg.output_dir) / "checkpoints"
        self.writes = ctx.is_main or cfg.parallel == "shard"
        self.device = resolve_device(cfg.device, ctx.local_rank if ctx.enabled else None)
        self.weight_dtype = resolve_dtype(cfg.precision, self.device)
        if cfg.attention == "xformers" and self.device.type != "cuda":
            raise ValueError(f"--attention xformers needs a CUDA device, not {self.device}; use --attention sdpa")
        self.parts = models.load_model_parts(
            cfg.model,
            dtype=self.weight_dtype,
            device=str(self.device),
            tokenizers=preview.tokenizers if preview is not None else None,
        )
        self.family = family_of(self.parts.family)
        self.sdxl = self.parts.family == "sdxl"
        if preview is None:
            check_job_tokens(cfg, self.parts.family, self.parts.tokenizers)
        self._install_tokens()
        self._build_optimizer()
        self.vae_factor = check_resolution(cfg, self.parts.family, self.parts.vae)
        self.latent_shape = self.family.latent_shape(self.parts.vae, cfg.resolution)
        self._configure_model()
        self._tokenize_templates()
        self.latent_cache = (
            LatentCache(
                self.parts.vae,
                images,
                cfg.resolution,
                self.vae_factor,
                self.device,
                self.parts.vae.dtype,
                max_crops=cfg.latent_cache_crops,
                encode=lambda pixels: self.family.posterior(self.parts.vae, pixels),
            )
            if cfg.latent_cache
            else None
        )
        use_text_cache = cfg.text_cache if cfg.text_cache != "auto" else self.sdxl and self.family.prefix_cache
        self.text_caches = self._text_caches() if use_text_cache else None
        self.generators = {c.name: _concept_generator(cfg.seed, c.name) for c in cfg.concepts}
        self.done = {c.name: 0 for c in cfg.concepts}
        self.bad = {c.name: 0 for c in cfg.concepts}  # consecutive non-finite steps
        self.stopped: dict[str, str] = {}
        self.job_step = 0
        self.samples = 0
        self.skipped = 0
        self.last_losses: dict[int, float] = {}  # concept index -> loss, of the last step's stepped concepts
        self.concepts_per_step: int | None = None  # set by batching.plan_batch() for max_batch="auto"
        self.max_images_per_step = 0
        # Step t+1's batch, drawn while step t's backward runs: (concepts, batch, their generators'
        # states before the draw). Used when step t+1 picks the same concepts, else redrawn from those states.
        self.prefetch = True
        self._prefetched: tuple[list[int], dict, dict[int, torch.Tensor]] | None = None
        self.prefetch_stats = {"used": 0, "redrawn": 0}

    # -- tokens and embeddings ----------------------------------------------------

    def _install_tokens(self) -> None:
        cfg = self.cfg
        scale = cfg.norm_scale if cfg.method == "dti" else None
        self.embeddings: list[DirectionalEmbedding] = []
        self.tokens: list[list[ConceptTokens]] = []  # per encoder, per concept
        init_gen = torch.Generator().manual_seed(cfg.seed)
        for tok, enc in zip(self.parts.tokenizers, self.parts.text_encoders):
            emb = install_embedding(enc, len(tok), scale)
            emb.to(self.device)
            per_concept = []
            for c in cfg.concepts:  # checked by check_job_tokens()
                init_ids = initializer_ids(tok, c.init, c.name)
                ct = add_concept_tokens(tok, c.placeholder, len(init_ids), c.name)
                ct.init_ids = init_ids
                start, prior = initial_rows(tok, enc, emb.base, c.init, init_ids, cfg.init, init_gen)
                emb.add_concept(ct.ids, start, prior)
                per_concept.append(ct)
            self.embeddings.append(emb)
            self.tokens.append(per_concept)

    def _configure_model(self) -> None:
        """Attention kernels, gradient checkpointing and memory format (none changes the math)."""
        cfg, unet = self.cfg, self.parts.unet
        if self.family.flow:
            pass  # the transformers' and VAEs' own processors (linear attention, SDPA) stay
        elif cfg.attention == "xformers":
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
                if not any(getattr(enc.config, k, 0.0) for k in ("dropout", "attention_dropout", "dropout_rate")):
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
                window = self.family.text_length(tok)
                longest = max(len(x) for x in tok(prompts).input_ids)
                if longest > window:
                    n = len(self.tokens[enc_index][ci].tokens)
                    raise ValueError(
                        f"concept {c.name!r}: initializer {c.init!r} gives {n} vectors, so its longest training "
                        f"prompt takes {longest} tokens, more than the text encoder's window of "
                        f"{window}: the vectors past the window would never be trained; use a "
                        "shorter initializer (a few words, such as the class noun)"
                    )
                ids = self.family.tokenize(tok, prompts)
                per_concept.append(ids)  # on the CPU: the text cache reads them there without a device sync
            self.prompt_ids.append(per_concept)

    def _text_caches(self) -> list:
        if self.family.flow:  # SANA: the family's own cache (Gemma-2, a causal decoder)
            return [
                self.family.make_text_cache(enc, emb.first_id)
                for enc, emb in zip(self.parts.text_encoders, self.embeddings)
            ]
        from ..textcache import PrefixCachedTextEncoder

        caches = []
        for enc_index, (enc, emb) in enumerate(zip(self.parts.text_encoders, self.embeddings)):
            pooled = self.sdxl and enc_index == len(self.parts.text_encoders) - 1
            caches.append(
                PrefixCachedTextEncoder(
                    enc, mode="penultimate" if self.sdxl else "last", pooled=pooled, first_learned_id=emb.first_id
                )
            )
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
            self.optimizer = bnb.optim.AdamW8bit(
                params, lr=lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, min_8bit_size=1
            )
        else:
            # DTI's SphericalSGD keeps one fp32 scalar per row, so optim_bits does not apply to it.
            self.optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)

    # -- one step -------------------------------------------------------------------

    def active_concepts(self, done: dict[str, int] | None = None) -> list[int]:
        """Indices of the concepts that still have steps to take and were not stopped (``done``: step counts
        to assume instead of the job's)."""
        done = self.done if done is None else done
        return [
            i
            for i, c in enumerate(self.cfg.concepts)
            if done[c.name] < self.cfg.concept_steps(c) and c.name not in self.stopped
        ]

    def _draw_sample(self, ci: int) -> dict:
        """One training sample of concept ``ci``, every random choice from the concept's own generator."""
        c, data, gen = self.cfg.concepts[ci], self.images[ci], self.generators[self.cfg.concepts[ci].name]
        res = self.cfg.resolution
        k = int(torch.randint(0, len(data.arrays), (1,), generator=gen))
        if self.latent_cache is not None:
            pixels = None
            crop, top, left = self.latent_cache.draw(ci, k, gen)
        else:
            crop = None
            pixels, (top, left) = random_crop_uint8(data.arrays[k], res, gen)  # normalised on the device
        template = int(torch.randint(0, len(c.templates), (1,), generator=gen))
        oh, ow = data.original_sizes[k]
        return {
            "pixels": pixels,
            "crop": (ci, k, crop),
            "template": template,
            "time_ids": [oh, ow, top, left, res, res],
            "timestep": int(
                torch.randint(0, self.family.num_timesteps(self.parts.noise_scheduler), (1,), generator=gen)
            ),
            "noise": torch.randn(self.latent_shape, generator=gen),
            "vae_eps": torch.randn(self.latent_shape, generator=gen),
        }

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor on the job's device: on CUDA through pinned memory with an asynchronous copy."""
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def make_batch(self, chosen: Sequence[int]) -> dict:
        """This rank's samples of the chosen concepts (``batch_size`` each), their tensors on the device.

        Noise, timesteps and crops are drawn on the CPU from each concept's generator; the batch's tensors
        go to the device (CUDA: pinned buffers, non-blocking copies), cached latents are gathered there, and
        uncached crops travel as uint8 pixels, normalised in :meth:`loss`. Prompt ids stay on the CPU.
        """
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
            "time_ids": self._to_device(torch.tensor([s["time_ids"] for s in samples], dtype=torch.float32)),
            "timesteps": self._to_device(torch.tensor([s["timestep"] for s in samples], dtype=torch.long)),
            "noise": self._to_device(torch.stack([s["noise"] for s in samples])),
            "vae_eps": self._to_device(torch.stack([s["vae_eps"] for s in samples])),
            "owners": owners,
            # The same, on the device: the loss's index_add then needs no blocking copy mid-step.
            "owner_index": self._to_device(torch.tensor(owners, dtype=torch.long)),
        }
        if self.latent_cache is not None:
            with torch.no_grad():
                batch["latents"] = self.latent_cache.latents([s["crop"] for s in samples], batch["vae_eps"])
        else:
            batch["pixels"] = self._to_device(torch.stack([s["pixels"] for s in samples]))  # uint8
        return batch

    # -- the next step's batch, drawn ahead ------------------------------------------------------

    def _batch_for(self, chosen: list[int]) -> dict:
        """The batch of ``chosen``: the one drawn ahead when it is for the same concepts, else a fresh one
        drawn after putting the generators back where the draw ahead found them (the same draws either way)."""
        if self._prefetched is not None:
            ahead, batch, _ = self._prefetched
            if ahead == chosen:
                self._prefetched = None
                self.prefetch_stats["used"] += 1
                return batch
            self.discard_prefetch()
            self.prefetch_stats["redrawn"] += 1
        return self.make_batch(chosen)

    def _prefetch_after(self, chosen: list[int]) -> None:
        """Draw the next step's batch now, assuming every concept of this step takes its step.

        Called while this step's backward runs on an asynchronous device, so the CPU's noise draws,
        crops and copies overlap the GPU's work. Each concept has its own generator, so drawing
        ahead consumes every stream in the same order as drawing later does.
        """
        if not self.prefetch:
            return
        done = dict(self.done)
        for i in chosen:
            done[self.cfg.concepts[i].name] += 1
        from .batching import pick_concepts

        ahead = pick_concepts(self, done=done, job_step=self.job_step + 1)
        if not ahead:
            return
        states = {i: self.generators[self.cfg.concepts[i].name].get_state() for i in ahead}
        try:
            batch = self.make_batch(ahead)
        except BaseException:
            for i, state in states.items():
                self.generators[self.cfg.concepts[i].name].set_state(state)
            raise
        self._prefetched = (ahead, batch, states)

    def discard_prefetch(self) -> None:
        """Drop a batch drawn ahead and put its concepts' generators back to where it found them."""
        if self._prefetched is not None:
            _, _, states = self._prefetched
            self._prefetched = None
            for i, state in states.items():
                self.generators[self.cfg.concepts[i].name].set_state(state)

    def generator_states(self) -> dict[str, torch.Tensor]:
        """Every concept's generator state as if nothing were drawn ahead (what a checkpoint keeps)."""
        states = {name: gen.get_state() for name, gen in self.generators.items()}
        if self._prefetched is not None:
            for i, state in self._prefetched[2].items():
                states[self.cfg.concepts[i].name] = state.clone()
        return states

    def encode_text(self, input_ids: list[torch.Tensor]) -> Conditioning:
        """The denoiser's text conditioning (hidden states, SDXL's pooled embedding, SANA's mask)."""
        if self.text_caches is None or self.family.flow:
            return self.family.encode_text(self.parts.text_encoders, input_ids, self.device, self.text_caches)
        hidden, pooled = [], None
        for enc_index, cache in enumerate(self.text_caches):
            h, p = cache(input_ids[enc_index])
            hidden.append(h)
            if cache.pooled:
                pooled = p
        return Conditioning(torch.cat(hidden, dim=-1), pooled)

    def loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's loss (sum of per-concept means) and the per-concept terms."""
        dev = self.device
        parts = self.parts
        fam, vae = self.family, parts.vae
        with torch.no_grad():
            if "latents" in batch:
                latents = batch["latents"]
            else:
                pixels = normalize_pixels(batch["pixels"].to(dev)).to(vae.dtype)  # uint8 on the wire
                mean, std = fam.posterior(vae, pixels)
                latents = mean + std * batch["vae_eps"].to(dev, mean.dtype)
            latents = fam.normalize(vae, latents)
        noise = batch["noise"].to(dev)
        t = batch["timesteps"].to(dev)
        noisy, target, timestep = fam.noisy_and_target(parts.noise_scheduler, latents, noise, t)
        # bf16: the text encoders run under bf16 autocast (their LayerNorms in fp32, the learned fp32 rows
        # meeting bf16 weights); the frozen denoiser, whose weights are bf16 already, runs WITHOUT autocast
        # on bf16 inputs: autocast would send its group_norm/layer_norm to fp32, keep fp32 activations for
        # backward and add casts, for no gain in a frozen bf16 network.
        autocast = (
            torch.autocast(dev.type, dtype=torch.bfloat16)
            if self.weight_dtype == torch.bfloat16
            else contextlib.nullcontext()
        )
        attention = contextlib.nullcontext()
        if self.cfg.deterministic:  # the fused attention kernels' backward is not deterministic on CUDA
            from torch.nn.attention import SDPBackend, sdpa_kernel

            attention = sdpa_kernel([SDPBackend.MATH])
        unet_dtype = parts.unet.dtype  # the denoiser (UNet or transformer), not its compiled wrapper
        with attention:
            with autocast:
                cond = self.encode_text(batch["input_ids"])
            cond = cond.to(unet_dtype)
            extra = {"time_ids": batch["time_ids"].to(dev, unet_dtype)}
            sample = noisy.to(unet_dtype)
            if self.cfg.channels_last:
                sample = sample.contiguous(memory_format=torch.channels_last)
            if self.cfg.compile:  # probe steps and concepts taking turns change the batch: compile for any size once
                for x in (sample, timestep, cond.hidden, cond.pooled, cond.mask, extra["time_ids"]):
                    if x is not None:
                        torch._dynamo.maybe_mark_dynamic(x, 0)
            pred = fam.denoise(self.unet, sample, timestep, cond, extra)
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(dim=1)
        # Per-concept means, summed: each concept's gradient is what it would get training alone.
        owners = batch["owner_index"].to(per_sample.device)
        per_concept = torch.zeros(len(self.cfg.concepts), device=per_sample.device)
        per_concept = per_concept.index_add(0, owners, per_sample / (self.cfg.batch_size * self.data_world))
        return per_concept.sum(), per_concept

    def step(self) -> float | None:
        """One job step; returns the mean loss of the concepts that stepped (None when all are done)."""
        chosen = pick_concepts(self)
        if not chosen:
            self.discard_prefetch()
            return None
        batch = self._batch_for(chosen)
        self.max_images_per_step = max(self.max_images_per_step, len(batch["owners"]))
        self.optimizer.zero_grad(set_to_none=True)
        total, per_concept = self.loss(batch)
        total.backward()
        if self.data_world > 1:
            all_reduce_grads([p for emb in self.embeddings for p in emb.rows])
            torch.distributed.all_reduce(per_concept.detach())
        self._prefetch_after(chosen)  # before the first host sync: overlaps the device's backward
        losses, ok = self._finite_losses_and_grads(chosen, per_concept)
        chosen_set = set(chosen)
        for i in range(len(self.cfg.concepts)):
            if i not in chosen_set:
                for p in self.concept_params(i):
                    p.grad = None  # absent concepts take no step (their own step count)
        for i, good in zip(chosen, ok):
            if not good:  # non-finite loss or gradient: this concept skips the step, its rows stay as they are
                for p in self.concept_params(i):
                    p.grad = None
        stepping = [i for i, good in zip(chosen, ok) if good]
        if stepping:
            stepping = self._update(stepping)
        stepped = set(stepping)
        self.last_losses = {i: v for i, v in zip(chosen, losses) if i in stepped}
        for i, value in zip(chosen, losses):
            name = self.cfg.concepts[i].name
            if i in stepped:
                self.bad[name] = 0
                self.done[name] += 1
            else:
                self._bad_step(name)
        self.job_step += 1
        self.samples += len(batch["owners"]) * self.data_world
        values = [v for i, v in zip(chosen, losses) if i in stepped]
        return sum(values) / len(values) if values else float("nan")

    def _finite_losses_and_grads(self, chosen: list[int], per_concept: torch.Tensor) -> tuple[list[float], list[bool]]:
        """Each chosen concept's loss, and whether its loss and gradients are finite: one host copy."""
        params = [[p for p in self.concept_params(i) if p.grad is not None] for i in chosen]
        finite = torch.isfinite(per_concept[chosen].detach())
        grads = [p.grad for ps in params for p in ps]
        if grads:
            owner = torch.repeat_interleave(torch.arange(len(chosen)), torch.tensor([len(ps) for ps in params]))
            norms = torch.stack(torch._foreach_norm(grads)).float()  # inf or NaN iff a gradient entry is
            bad = torch.zeros(len(chosen), device=norms.device).index_add_(
                0, owner.to(norms.device), (~torch.isfinite(norms)).float()
            )
            finite = finite & (bad.to(finite.device) == 0)
        losses, flags = torch.stack([per_concept[chosen].detach().float(), finite.float()]).tolist()
        return losses, [f > 0 for f in flags]

    def _update(self, stepping: list[int]) -> list[int]:
        """The optimizer step; a concept whose rows it made non-finite (or, for DTI, not unit) gets its rows and
        optimizer state back.

        Returns the concepts that stepped.
        """
        params = [p for i in stepping for p in self.concept_params(i)]
        saved = {
            p: (
                p.detach().clone(),
                {k: v.clone() if torch.is_tensor(v) else v for k, v in self.optimizer.state.get(p, {}).items()},
            )
            for p in params
        }
        self.optimizer.step()
        finite = self._rows_sound(stepping)
        kept = []
        for i, good in zip(stepping, finite):
            if good:
                kept.append(i)
                continue
            with torch.no_grad():
                for p in self.concept_params(i):
                    row, state = saved[p]
                    p.copy_(row)
                    if state:
                        self.optimizer.state[p] = state
                    else:
                        self.optimizer.state.pop(p, None)
        return kept

    @torch.no_grad()
    def _rows_sound(self, concepts: list[int]) -> list[bool]:
        """Per concept: are its rows finite and, for DTI, unit vectors? One batched norm per encoder, one host copy."""
        counts = torch.tensor([self.embeddings[0].rows[i].shape[0] for i in concepts])
        owner = torch.repeat_interleave(torch.arange(len(concepts)), counts)
        bad = torch.zeros(len(concepts))
        for emb in self.embeddings:
            norms = torch.cat([emb.rows[i].detach() for i in concepts]).float().norm(dim=-1)
            wrong = ~torch.isfinite(norms)
            if emb.spherical:
                wrong |= (norms - 1).abs() > 1e-3
            bad = bad.to(norms.device).index_add_(0, owner.to(norms.device), wrong.float())
        return [b == 0 for b in bad.tolist()]

    def _bad_step(self, name: str) -> None:
        """Count a skipped step of concept ``name``; stop it after ``max_bad_steps`` in a row."""
        self.skipped += 1
        self.bad[name] += 1
        if self.bad[name] >= self.cfg.max_bad_steps:
            self.stopped[name] = (
                f"{self.bad[name]} steps in a row had a non-finite loss, gradient or update; stopped at step "
                f"{self.done[name]} (check its images, or lower the learning rate)"
            )
            print(f"dti-fast: concept {name!r} {self.stopped[name]}; the other concepts continue", file=sys.stderr)

    # -- what the job made ----------------------------------------------------------------

    def fingerprints(self) -> dict[str, str]:
        return {c.name: self.cfg.concept_fingerprint(c, self.data_world) for c in self.cfg.concepts}

    def concept_records(self) -> list[ConceptRecord]:
        """Each concept's learned vectors and what was trained, as plain records for the exporters."""
        cfg = self.cfg
        vocab_scales = [norm_scale(emb.base.weight, cfg.norm_scale) for emb in self.embeddings]
        records = []
        for i, c in enumerate(cfg.concepts):
            records.append(
                ConceptRecord(
                    concept=c,
                    tokens=list(self.tokens[0][i].tokens),
                    prompt_string=self.tokens[0][i].prompt_string,
                    method=cfg.method,
                    steps=self.done[c.name],
                    stopped=self.stopped.get(c.name),
                    fingerprint=cfg.concept_fingerprint(c, self.data_world),
                    model=cfg.model,
                    family=self.parts.family,
                    encoders=[
                        EncoderVectors(
                            vectors=emb.vectors(i).cpu(),
                            scale=emb.scale if emb.spherical else None,
                            vocab_scale=vocab_scales[e],
                        )
                        for e, emb in enumerate(self.embeddings)
                    ],
                )
            )
        return records

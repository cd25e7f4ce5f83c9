"""What differs between model families during training, in one place per family.

A :class:`Family` describes how one kind of pipeline is trained with textual inversion:

- how prompts become token ids (:meth:`Family.tokenize`: length, padding) and how the
  text encoders turn them into the denoiser's conditioning (:meth:`Family.encode_text`);
- how pixels become latents (:meth:`Family.posterior`, :meth:`Family.normalize`) and the
  latent shape of one training image (:meth:`Family.latent_shape`);
- the objective: the noisy input and the regression target at a drawn timestep
  (:meth:`Family.noisy_and_target`), and how the denoiser is called (:meth:`Family.denoise`);
- :meth:`Family.contextual_states`: the text encoder's contextual output for a piece of
  text (what CrossInit starts from).

:func:`family_of` returns the description of a family name ("sd", "sdxl", "sana", "wan").
The trainer (:mod:`dti_fast.train.job`) calls these and holds no family branches itself.

Objectives
    "sd"/"sdxl": DDPM noise prediction (epsilon, or v / sample when the scheduler config
    says so), t uniform over the 1000 training steps, weight 1.

    "sana"/"wan": rectified flow, as diffusers' own SANA DreamBooth trainer
    (``examples/dreambooth/train_dreambooth_lora_sana.py``) and its flow-matching helpers
    (``diffusers.training_utils``) define it: ``x_t = (1 - sigma) x_0 + sigma * noise``, the
    target is the velocity ``noise - x_0``, the denoiser gets ``timestep = 1000 * sigma``.
    Timesteps: the trainer's default weighting scheme ("none"): an index drawn uniformly
    from the 1000 steps of ``FlowMatchEulerDiscreteScheduler`` with shift 1 (the trainer
    builds that scheduler from the model's ``scheduler/`` folder, whose SANA/Wan configs carry
    ``flow_shift`` for sampling, not ``shift``, so training sigmas are not shifted), and loss
    weight 1. Wan trains on images as one-frame videos: latents are (C, 1, h, w).

Text encoders
    "sana": Gemma-2 (a causal decoder): prompts padded on the right to 300 tokens (the
    pipeline's ``max_sequence_length``) with ``<bos>`` first, the final-normed last hidden
    states with the attention mask, handed to the transformer with that mask. The pipeline's
    complex-human-instruction prefix is off during training, as the method's authors train.
    "wan": UMT5's encoder (bidirectional): prompts padded to 512 tokens (``WanPipeline``'s
    default), the last hidden states with the padded positions set to zero, as the pipeline
    does. Both run their encoder over the batch's real tokens only, not the padding
    (:meth:`_Flow._encode`: exact for what the denoiser sees). SANA's Gemma-2 is causal:
    ``--text-cache`` reuses its states before the first learned token
    (:class:`~dti_fast.textcache.DecoderPrefixCache`, exact; off by default: with the padding
    skipped, Gemma covers about a dozen tokens per prompt, roughly 1.5% of a SANA-1.6B step
    at 1024 px by FLOP count, so the cache saves well under 1%, unmeasured on a GPU). UMT5 is
    bidirectional: no prefix of a prompt is independent of the learned tokens, so Wan has no
    prefix cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["Conditioning", "Family", "StableDiffusion", "Sana", "Wan", "family_of"]


@dataclass
class Conditioning:
    """The denoiser's text conditioning for a batch."""

    hidden: torch.Tensor  # (B, T, D)
    pooled: torch.Tensor | None = None  # SDXL's pooled embedding
    mask: torch.Tensor | None = None  # (B, T) attention mask (SANA)

    def to(self, dtype: torch.dtype) -> Conditioning:
        """The embeddings in ``dtype`` (the denoiser's); the mask as it is."""
        return Conditioning(self.hidden.to(dtype), None if self.pooled is None else self.pooled.to(dtype), self.mask)


class Family:
    """The training description of one family of pipelines (see the module docstring)."""

    name = ""
    #: True for rectified-flow (velocity) objectives.
    flow = False
    #: Whether dti_fast's exact prefix cache applies to this family's text encoder(s).
    prefix_cache = True
    #: The class of ``model_index.json`` a folder of this family is saved as.
    pipeline_class = ""

    # -- text -------------------------------------------------------------------------------

    def text_length(self, tokenizer) -> int:
        """Padded prompt length in tokens."""
        return int(tokenizer.model_max_length)

    def tokenize(self, tokenizer, prompts: list[str]) -> torch.Tensor:
        """Token ids (B, T), padded (on the right) to :meth:`text_length`."""
        n = self.text_length(tokenizer)
        return tokenizer(prompts, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids

    def encode_text(
        self, encoders: list, input_ids: list[torch.Tensor], device: torch.device, caches: list | None = None
    ) -> Conditioning:
        """The denoiser's conditioning of the token ids (one tensor per encoder); ``caches``: prefix caches."""
        raise NotImplementedError

    def contextual_states(self, tokenizer, encoder, text: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """The encoder's contextual output (n_pieces, D) at the pieces of ``text`` (no special tokens), fp32.

        ``text`` is tokenized as it would be inside a prompt; the states are those the
        denoiser reads (this family's output layer), taken at the text's own positions.
        """
        raise NotImplementedError

    # -- latents ----------------------------------------------------------------------------

    def vae_factor(self, vae) -> int:
        raise NotImplementedError

    def posterior(self, vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior of pixels (B, 3, H, W) in [-1, 1]: mean and std, shaped like a latent batch."""
        dist = vae.encode(pixels).latent_dist
        return dist.mean, dist.std

    def normalize(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> the denoiser's latent space (fp32)."""
        cfg = vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        return ((latents - shift) * cfg.scaling_factor).float()

    def latent_shape(self, vae, resolution: int) -> tuple[int, ...]:
        """Shape of one training image's latents."""
        side = resolution // self.vae_factor(vae)
        return (int(vae.config.latent_channels), side, side)

    # -- the objective ----------------------------------------------------------------------

    def num_timesteps(self, scheduler) -> int:
        return int(scheduler.config.num_train_timesteps)

    def noisy_and_target(
        self, scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The noisy input, the regression target and the denoiser's timestep for drawn indices ``t``."""
        raise NotImplementedError

    def denoise(self, model, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning, extra: dict) -> Any:
        raise NotImplementedError


class StableDiffusion(Family):
    """SD 1.x/2.x ("sd": one CLIP encoder, last layer) and SDXL ("sdxl": two, penultimate + pooled)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sdxl = name == "sdxl"
        self.pipeline_class = "StableDiffusionXLPipeline" if self.sdxl else "StableDiffusionPipeline"

    def encode_text(self, encoders, input_ids, device, caches=None) -> Conditioning:
        # SD/SDXL's prefix caches (PrefixCachedTextEncoder) are applied by the trainer itself.
        hidden, pooled = [], None
        last = len(encoders) - 1
        for i, enc in enumerate(encoders):
            ids = input_ids[i].to(device)
            if self.sdxl:
                out = enc(ids, output_hidden_states=True)
                hidden.append(out.hidden_states[-2])
                if i == last:
                    pooled = out[0]
            else:
                hidden.append(enc(ids)[0])
        return Conditioning(torch.cat(hidden, dim=-1), pooled)

    def vae_factor(self, vae) -> int:
        return 2 ** (len(vae.config.block_out_channels) - 1)

    def noisy_and_target(self, scheduler, latents, noise, t):
        noisy = scheduler.add_noise(latents, noise, t)
        kind = scheduler.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = scheduler.get_velocity(latents, noise, t)
        elif kind == "sample":
            target = latents
        else:
            raise ValueError(f"unsupported prediction_type {kind!r} in the model's scheduler config")
        return noisy, target, t

    def denoise(self, model, sample, timestep, cond, extra):
        kwargs = {}
        if self.sdxl:
            kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": extra["time_ids"]}
        return model(sample, timestep, encoder_hidden_states=cond.hidden, **kwargs).sample


class _Flow(Family):
    """Rectified flow on a transformer denoiser with one text encoder (SANA, Wan)."""

    flow = True
    prefix_cache = False
    max_length = 0

    def text_length(self, tokenizer) -> int:
        return self.max_length

    def mask(self, tokenizer_pad_id: int, ids: torch.Tensor) -> torch.Tensor:
        return (ids != tokenizer_pad_id).long()

    def noisy_and_target(self, scheduler, latents, noise, t):
        # Index i of the 1000 training steps -> sigma = sigmas[i] (shift 1: (1000 - i) / 1000).
        sigmas = scheduler.sigmas.to(latents.device, torch.float32)[t.to(latents.device)]
        s = sigmas.view(-1, *([1] * (latents.dim() - 1)))
        noisy = (1.0 - s) * latents + s * noise
        return noisy, noise - latents, sigmas * scheduler.config.num_train_timesteps

    def _states(self, encoder, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return encoder(ids, attention_mask=mask).last_hidden_state

    def make_text_cache(self, encoder, first_learned_id: int):
        """An exact prefix cache for ``encoder`` (:meth:`_encode` uses it), or None where none can be exact."""
        return None

    def _encode(self, enc, ids: torch.Tensor, cache=None) -> Conditioning:
        """Conditioning of right-padded ``ids``: the encoder runs on the longest prompt's tokens only.

        The positions after it are padding in every sample: Wan's pipeline sets their states to
        zero and SANA's transformer masks them out (an additive bias of -10000, so their weight
        underflows to exactly 0), so they are filled with zeros instead of running the encoder
        over up to 300 (SANA) or 512 (Wan) padding tokens. For the real tokens the encoder sees
        the same tokens and mask as over the full length (Gemma-2 is causal; UMT5 masks padding
        keys), so the denoiser's input is the same (tests/test_families.py).
        """
        mask = self.mask(int(enc.config.pad_token_id or 0), ids)
        n = max(int(mask.sum(dim=1).max()), 1)  # one host sync
        hidden = cache(ids[:, :n], mask[:, :n]) if cache is not None else self._states(enc, ids[:, :n], mask[:, :n])
        hidden = F.pad(hidden, (0, 0, 0, ids.shape[1] - n))
        return self._condition(hidden, mask)

    def encode_text(self, encoders, input_ids, device, caches=None) -> Conditioning:
        (enc,) = encoders
        return self._encode(enc, input_ids[0].to(device), caches[0] if caches else None)

    def _condition(self, hidden: torch.Tensor, mask: torch.Tensor) -> Conditioning:
        raise NotImplementedError

    def contextual_states(self, tokenizer, encoder, text, device="cpu"):
        ids = self.tokenize(tokenizer, [text]).to(device)
        pieces = tokenizer(text, add_special_tokens=False).input_ids
        full = ids[0].tolist()
        start = next((i for i in range(len(full) - len(pieces) + 1) if full[i : i + len(pieces)] == pieces), None)
        if start is None or not pieces:
            raise ValueError(f"text {text!r} has no pieces of its own in the tokenized prompt")
        with torch.no_grad():
            cond = self._encode(encoder, ids)
        return cond.hidden[0, start : start + len(pieces)].float()


class Sana(_Flow):
    """SANA / SANA 1.5: Gemma-2 text encoder, DC-AE (32x) VAE, linear-attention DiT."""

    name = "sana"
    pipeline_class = "SanaPipeline"
    max_length = 300  # SanaPipeline's max_sequence_length (BOS + 299, all kept by its select_index)

    def tokenize(self, tokenizer, prompts):
        # SanaPipeline lower-cases and strips every prompt (its caption cleaning off): train on what it sees.
        return super().tokenize(tokenizer, [p.lower().strip() for p in prompts])

    prefix_cache = True

    def _states(self, encoder, ids, mask):
        return encoder(ids, attention_mask=mask, use_cache=False).last_hidden_state  # no KV cache to build

    def make_text_cache(self, encoder, first_learned_id):
        from .textcache import DecoderPrefixCache

        return DecoderPrefixCache(encoder, first_learned_id)

    def _condition(self, hidden, mask):
        return Conditioning(hidden, mask=mask)

    def vae_factor(self, vae) -> int:
        return 2 ** (len(vae.config.encoder_block_out_channels) - 1)

    def posterior(self, vae, pixels):
        latent = vae.encode(pixels).latent  # DC-AE is deterministic
        return latent, torch.zeros_like(latent)

    def normalize(self, vae, latents):
        return (latents * vae.config.scaling_factor).float()

    def denoise(self, model, sample, timestep, cond, extra):
        t = timestep * float(getattr(model.config, "timestep_scale", 1.0) or 1.0)
        pred = model(
            sample, encoder_hidden_states=cond.hidden, encoder_attention_mask=cond.mask, timestep=t, return_dict=False
        )[0]
        if model.config.out_channels // 2 == model.config.in_channels:  # learned sigma: the first half
            pred = pred.chunk(2, dim=1)[0]
        return pred


class Wan(_Flow):
    """Wan 2.1 text-to-video: UMT5 encoder, 3-D causal VAE; images are one-frame videos."""

    name = "wan"
    pipeline_class = "WanPipeline"
    max_length = 512  # WanPipeline.__call__'s max_sequence_length

    def _condition(self, hidden, mask):
        return Conditioning(hidden * mask.unsqueeze(-1).to(hidden.dtype))  # padding is zeros, as the pipeline makes it

    def vae_factor(self, vae) -> int:
        return 2 ** len(vae.config.temperal_downsample)

    def posterior(self, vae, pixels):
        dist = vae.encode(pixels.unsqueeze(2)).latent_dist  # (B, 3, 1, H, W): one frame in, one latent frame out
        return dist.mean, dist.std

    def normalize(self, vae, latents):
        c = int(vae.config.z_dim)
        mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(1, c, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=latents.device).view(1, c, 1, 1, 1)
        return ((latents.float() - mean) / std).float()

    def latent_shape(self, vae, resolution):
        side = resolution // self.vae_factor(vae)
        return (int(vae.config.z_dim), 1, side, side)

    def denoise(self, model, sample, timestep, cond, extra):
        return model(hidden_states=sample, timestep=timestep, encoder_hidden_states=cond.hidden, return_dict=False)[0]


_FAMILIES: dict[str, Family] = {
    "sd": StableDiffusion("sd"),
    "sdxl": StableDiffusion("sdxl"),
    "sana": Sana(),
    "wan": Wan(),
}


def family_of(name: str) -> Family:
    """The :class:`Family` of ``name`` ("sd", "sdxl", "sana" or "wan")."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; expected one of {', '.join(_FAMILIES)}") from None


def _register_crossinit() -> None:
    """``--init xinit`` for the flow families' encoders, through :mod:`dti_fast.embedding`'s registry (CLIP
    encoders have theirs there: the authors' recipe, the last hidden state)."""
    from .embedding import register_contextual_states

    for model_type, fam in (("gemma2", _FAMILIES["sana"]), ("umt5", _FAMILIES["wan"]), ("t5", _FAMILIES["wan"])):
        register_contextual_states(
            model_type, lambda tok, enc, words, init_ids, fam=fam: fam.contextual_states(tok, enc, words, enc.device)
        )


_register_crossinit()

"""The trainer bench's baseline: the procedure of diffusers' textual-inversion example.

``examples/textual_inversion/textual_inversion.py`` (and ``textual_inversion_sdxl.py``
for SDXL) in the diffusers repository train one concept per run like this,
which :func:`run_baseline` repeats step for step (a re-implementation, not a
copy, with the example's best flags: bf16 mixed precision, PyTorch SDPA
attention, no gradient checkpointing):

1. load the model; add the placeholder token to the (first) tokenizer;
   ``resize_token_embeddings``; copy the initializer token's row into the
   placeholder's row;
2. freeze the UNet, the VAE and every text-encoder weight except the first
   text encoder's token embedding table, which stays trainable whole; the
   UNet and VAE (and SDXL's second text encoder, frozen: the SDXL example
   trains the first encoder's table only, and the second tokenizer sees the
   placeholder as ordinary text) are cast to the weight dtype (bf16 on a GPU,
   fp32 on the CPU); the trained text encoder stays fp32 and runs under
   autocast (what ``accelerate``'s mixed precision does to a prepared model);
3. ``torch.optim.AdamW`` over the *full* embedding table: lr, betas
   (0.9, 0.999), weight decay 1e-2, eps 1e-8;
4. every step: a batch of samples (random template prompt, tokenized per
   sample; image flipped at random); VAE-encode the pixels
   (``latent_dist.sample() * scaling_factor``); noise, random timesteps,
   ``add_noise``; text encoder forward (SDXL: both encoders' penultimate hidden
   states concatenated, the pooled projection of the second and the six time
   ids as added conditioning); UNet forward; MSE against the noise (or the
   velocity); backward; optimizer step; zero_grad; restore every embedding row
   except the placeholder's from a copy saved before training
   (``index_no_updates``); ``loss.item()`` for the progress bar.

Departures, each in the baseline's favour: images are decoded and resized once
before the loop (the example's DataLoader, with its default of no worker
processes, decodes and resizes every sample in the training loop); the model
loads directly in the weight dtype with only the text encoders cast to fp32
(the example loads everything in fp32 and casts); no learning-rate scheduler,
checkpointing, validation or logging beyond the per-step ``loss.item()``.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dti_fast.data import IMAGE_SUFFIXES, OBJECT_TEMPLATES
from dti_fast.memory import peak_bytes, reset_peak
from dti_fast.models import load_model_parts

PLACEHOLDER = "<baseline-concept>"


@dataclass
class BaselineResult:
    """One baseline run: a single concept, ``steps`` steps of ``batch_size`` samples."""

    steps: int
    batch_size: int
    samples: int
    seconds: float  # the training loop only
    load_seconds: float  # load_model_parts
    setup_seconds: float  # tokens, embedding resize, optimizer, image decode
    peak_memory: int | None  # bytes during the loop: CUDA max allocated, or the process's peak RSS
    device: str
    final_loss: float
    gradient_checkpointing: bool = False

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / self.steps


def _load_images(folder: Path, resolution: int) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """The example's dataset images: RGB, resized to ``resolution`` x ``resolution`` (bicubic)."""
    arrays, sizes = [], []
    for path in sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        with Image.open(path) as im:
            im = im.convert("RGB")
            sizes.append((im.height, im.width))
            arrays.append(np.array(im.resize((resolution, resolution), resample=Image.Resampling.BICUBIC)))
    if not arrays:
        raise ValueError(f"no images in {folder}")
    return arrays, sizes


def run_baseline(
    model: str | Path,
    images: str | Path,
    init_word: str,
    *,
    steps: int,
    batch_size: int,
    resolution: int,
    lr: float = 5e-4,
    seed: int = 0,
    device: str | None = None,
    gradient_checkpointing: bool = False,
) -> BaselineResult:
    """Train one concept the diffusers example's way; returns its timings (see the module docstring).

    ``gradient_checkpointing`` is the example's ``--gradient_checkpointing`` (SD: UNet in
    train mode with checkpointing and the text encoder's checkpointing on; the SDXL example
    checkpoints its trained text encoder only): for a batch that does not fit without it.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    weight_dtype = torch.bfloat16 if cuda else torch.float32  # the example: --mixed_precision bf16 on a GPU
    rng = random.Random(seed)
    gen = torch.Generator(device=dev).manual_seed(seed)

    t0 = time.perf_counter()
    parts = load_model_parts(str(model), dtype=weight_dtype, device=str(dev))
    load_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    sdxl = parts.family == "sdxl"
    unet, vae, scheduler = parts.unet, parts.vae, parts.noise_scheduler
    tok, enc = parts.tokenizers[0], parts.text_encoders[0]  # the trained encoder
    if tok.add_tokens([PLACEHOLDER]) != 1:
        raise ValueError(f"the tokenizer already has {PLACEHOLDER}")
    init_ids = tok.encode(init_word, add_special_tokens=False)
    if len(init_ids) != 1:
        raise ValueError(f"the example needs a single-token initializer, {init_word!r} is {len(init_ids)}")
    ph_id = tok.convert_tokens_to_ids(PLACEHOLDER)
    enc.float()  # the trained text encoder stays fp32
    enc.resize_token_embeddings(len(tok))
    table = enc.get_input_embeddings().weight
    with torch.no_grad():
        table[ph_id] = table[init_ids[0]].clone()
    enc.requires_grad_(False)
    table.requires_grad_(True)  # only the token embedding table trains
    enc.train()
    original = table.detach().clone()
    keep = torch.ones(len(tok), dtype=torch.bool, device=dev)
    keep[ph_id] = False  # index_no_updates
    if gradient_checkpointing:
        enc.gradient_checkpointing_enable()
        if not sdxl:
            unet.train()
            unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW([table], lr=lr * batch_size, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    arrays, original_sizes = _load_images(Path(images), resolution)
    setup_seconds = time.perf_counter() - t0
    # accelerate's mixed precision runs a prepared model's forward under autocast.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def tokenize(tok, text: str) -> torch.Tensor:
        return tok(
            text, padding="max_length", truncation=True, max_length=tok.model_max_length, return_tensors="pt"
        ).input_ids[0]

    def get_item() -> dict:
        """The example dataset's __getitem__ (minus the image decode and resize, done once above)."""
        k = rng.randrange(len(arrays))
        text = rng.choice(OBJECT_TEMPLATES).format(PLACEHOLDER)
        img = arrays[k][:, ::-1] if rng.random() < 0.5 else arrays[k]  # RandomHorizontalFlip(p=0.5)
        pixels = torch.from_numpy((np.ascontiguousarray(img) / 127.5 - 1.0).astype(np.float32)).permute(2, 0, 1)
        oh, ow = original_sizes[k]
        return {
            "pixel_values": pixels,
            "input_ids": [tokenize(t, text) for t in parts.tokenizers],
            "time_ids": [oh, ow, 0, 0, resolution, resolution],
        }

    reset_peak(dev)
    loss_value = float("nan")
    started = time.perf_counter()
    for _ in range(steps):
        items = [get_item() for _ in range(batch_size)]  # default collate
        pixel_values = torch.stack([x["pixel_values"] for x in items]).to(dev)
        input_ids = [torch.stack([x["input_ids"][e] for x in items]).to(dev) for e in range(len(parts.tokenizers))]

        latents = vae.encode(pixel_values.to(dtype=weight_dtype)).latent_dist.sample(generator=gen).detach()
        latents = latents * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=gen, device=dev, dtype=latents.dtype)
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (batch_size,), generator=gen, device=dev
        ).long()
        noisy_latents = scheduler.add_noise(latents, noise, timesteps)
        kwargs = {}
        if sdxl:
            with autocast:  # the prepared (trained) encoder
                out1 = enc(input_ids[0], output_hidden_states=True)
            hidden1 = out1.hidden_states[-2].float().to(dtype=weight_dtype)
            out2 = parts.text_encoders[1](input_ids[1], output_hidden_states=True)  # frozen, weight dtype
            time_ids = torch.tensor([x["time_ids"] for x in items], device=dev, dtype=weight_dtype)
            kwargs["added_cond_kwargs"] = {"text_embeds": out2[0], "time_ids": time_ids}
            encoder_hidden_states = torch.cat([hidden1, out2.hidden_states[-2].to(dtype=weight_dtype)], dim=-1)
        else:
            with autocast:
                hidden = enc(input_ids[0])[0]
            encoder_hidden_states = hidden.float().to(dtype=weight_dtype)
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, **kwargs).sample
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():  # keep every row but the placeholder's
            table[keep] = original[keep]
        loss_value = loss.detach().item()
    if cuda:
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - started
    return BaselineResult(
        steps=steps,
        batch_size=batch_size,
        samples=steps * batch_size,
        seconds=seconds,
        load_seconds=load_seconds,
        setup_seconds=setup_seconds,
        peak_memory=peak_bytes(dev),
        device=str(dev),
        final_loss=loss_value,
        gradient_checkpointing=gradient_checkpointing,
    )


__all__: list[str] = ["BaselineResult", "run_baseline"]

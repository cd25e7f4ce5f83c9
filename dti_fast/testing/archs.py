"""Stable Diffusion 1.5 and SDXL architectures at their real sizes, with random weights.

The configs below are the published diffusers / transformers configs of
``runwayml/stable-diffusion-v1-5`` and ``stabilityai/stable-diffusion-xl-base-1.0``
(UNet, VAE, CLIP text encoders), written out here so that benchmarks can build
the real architectures without downloading anything. Weights are random: the
models are good for speed and memory figures, not for images.

- :func:`component_configs`: the configs of one family ("sd" or "sdxl"), or a
  ``reduced`` variant (same block layout, tiny widths) for tests.
- :func:`build_components`: the modules, built directly on ``device``
  (``torch.device("meta")`` for shapes and parameter counts without memory).
- :func:`full_size_parts_meta`: the full-size modules on the meta device.
- :func:`make_full_size_model`: a diffusers model folder that
  :func:`dti_fast.models.load_model_parts` loads (about 2.1 GB for SD 1.5 and
  6.9 GB for SDXL in bf16).

``PARAM_COUNTS`` holds the real models' parameter counts, which the configs
reproduce exactly.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch

from .tiny import TINY_TE1, TINY_TE2, TINY_VAE

__all__ = [
    "PARAM_COUNTS",
    "build_components",
    "component_configs",
    "full_size_parts_meta",
    "make_full_size_model",
    "param_count",
]

# -- Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5) ------------------------------------

# What the SD 1.5 and SDXL UNet configs share.
_UNET_COMMON: dict[str, Any] = dict(
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
)

SD15_UNET: dict[str, Any] = dict(
    _UNET_COMMON,
    sample_size=64,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=768,
    attention_head_dim=8,
)

SD_VAE: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)

# CLIP ViT-L/14 text encoder (SD 1.5's text_encoder, SDXL's text_encoder). The legacy
# eos_token_id=2 of the published config makes transformers pool at the highest token id.
CLIP_L_TEXT: dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    projection_dim=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
    dropout=0.0,
    initializer_range=0.02,
    initializer_factor=1.0,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
)

# -- SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0) ---------------------------------

SDXL_UNET: dict[str, Any] = dict(
    _UNET_COMMON,
    sample_size=128,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    block_out_channels=(320, 640, 1280),
    cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + pooled bigG 1280
)

SDXL_VAE: dict[str, Any] = dict(SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)

# OpenCLIP ViT-bigG/14 text encoder with projection (SDXL's text_encoder_2).
CLIP_BIGG_TEXT: dict[str, Any] = dict(
    CLIP_L_TEXT,
    hidden_size=1280,
    intermediate_size=5120,
    projection_dim=1280,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
)

PARAM_COUNTS: dict[str, dict[str, int]] = {
    "sd": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
}
"""Parameter counts of the real models' components (what the configs above build)."""

# -- Reduced variants: the same block layout and conditioning, tiny widths ------------------

# The tiny model's configs (dti_fast.testing.tiny), with two text-encoder layers instead of three.
_REDUCED_VAE = {k: TINY_VAE[k] for k in ("block_out_channels", "layers_per_block", "norm_num_groups", "sample_size")}
_REDUCED_CLIP_L = dict(TINY_TE1, num_hidden_layers=2)
_REDUCED = {
    "sd": {
        "unet": dict(
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=1,
            norm_num_groups=8,
            cross_attention_dim=32,
            attention_head_dim=4,
            sample_size=8,
        ),
        "vae": _REDUCED_VAE,
        "text_encoder": _REDUCED_CLIP_L,
    },
    "sdxl": {
        "unet": dict(
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            norm_num_groups=8,
            cross_attention_dim=32 + 64,
            transformer_layers_per_block=(1, 2, 2),
            attention_head_dim=(2, 4, 4),
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
            sample_size=8,
        ),
        "vae": _REDUCED_VAE,
        "text_encoder": _REDUCED_CLIP_L,
        "text_encoder_2": dict(TINY_TE2, num_hidden_layers=2),
    },
}


def component_configs(family: str, reduced: bool = False) -> dict[str, dict[str, Any]]:
    """Constructor kwargs of each component of ``family`` ("sd" or "sdxl").

    Keys: ``unet``, ``vae``, ``text_encoder`` and, for "sdxl", ``text_encoder_2``.
    ``reduced`` keeps every block type, the layer pattern and the conditioning
    (cross attention, SDXL's text_time embedding) but shrinks widths and depths
    to a model of a few million parameters (most of them the 49408-token
    vocabulary), for tests.
    """
    if family == "sd":
        out = {"unet": SD15_UNET, "vae": SD_VAE, "text_encoder": CLIP_L_TEXT}
    elif family == "sdxl":
        out = {"unet": SDXL_UNET, "vae": SDXL_VAE, "text_encoder": CLIP_L_TEXT, "text_encoder_2": CLIP_BIGG_TEXT}
    else:
        raise ValueError(f"unknown model family {family!r}; expected 'sd' or 'sdxl'")
    out = copy.deepcopy(out)
    if reduced:
        for name, changes in _REDUCED[family].items():
            out[name].update(changes)
    return out


def build_components(
    family: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    reduced: bool = False,
) -> dict[str, torch.nn.Module]:
    """The random-weight modules of ``family``, created directly on ``device`` and cast to ``dtype``.

    On CUDA the default initializers run on the GPU (seconds for SDXL's 3.5 B
    parameters, against minutes on a CPU). ``device="meta"`` allocates nothing.
    Weights depend only on ``seed`` and the device; the global RNG state is
    left untouched. Modules are returned in eval mode.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = component_configs(family, reduced=reduced)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    rng_devices = [device.index] if device.type == "cuda" else []
    modules: dict[str, torch.nn.Module] = {}
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(seed)
        with torch.device(device):
            modules["text_encoder"] = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
            if family == "sdxl":
                modules["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))
            modules["vae"] = AutoencoderKL(**configs["vae"])
            # Each module is cast as soon as it is built: on a GPU the fp32 SDXL UNet
            # (10 GB) is the largest thing ever held.
            modules["unet"] = _cast(UNet2DConditionModel(**configs["unet"]), dtype)
            modules["vae"] = _cast(modules["vae"], dtype)
    for name in ("text_encoder", "text_encoder_2"):
        if name in modules:
            modules[name] = _cast(modules[name], dtype)
    for module in modules.values():
        module.eval()
    return modules


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module.to(dtype)`` without diffusers' warning about modules to keep in fp32 (none here)."""
    if dtype == torch.float32:
        return module
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        return module.to(dtype)
    finally:
        dlogging.set_verbosity(level)


def full_size_parts_meta(family: str) -> dict[str, torch.nn.Module]:
    """The full-size modules of ``family`` on ``torch.device("meta")``: shapes without memory."""
    return build_components(family, device="meta")


def param_count(module: torch.nn.Module) -> int:
    """Number of parameter elements of ``module``."""
    return sum(p.numel() for p in module.parameters())


def make_full_size_model(
    path: str | os.PathLike,
    family: str,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    seed: int = 0,
    reduced: bool = False,
) -> Path:
    """Write a random-weight SD 1.5 ("sd") or SDXL ("sdxl") model folder at ``path``; returns it.

    The folder is diffusers' real layout (``StableDiffusionPipeline`` /
    ``StableDiffusionXLPipeline``, safetensors, CLIP's real BPE tokenizers, the
    SD DDPM training schedule) and loads with
    :func:`dti_fast.models.load_model_parts`. Weights are built on ``device``
    (pass "cuda" on a GPU machine: much faster than the CPU) in ``dtype``, then
    saved from CPU memory. ``model_index.json`` records
    ``"_dti_fast_random_arch": "<family>"`` (``"<family>-reduced"`` for the
    reduced variant). Full size: about 2.1 GB (sd) or 6.9 GB (sdxl) in bf16.
    """
    from .tiny import write_model_folder

    modules = build_components(family, device=device, dtype=dtype, seed=seed, reduced=reduced)
    text_encoders = [modules.pop("text_encoder")]
    if "text_encoder_2" in modules:
        text_encoders.append(modules.pop("text_encoder_2"))
    for module in (*text_encoders, *modules.values()):
        module.to("cpu")
    tag = family + ("-reduced" if reduced else "")
    return write_model_folder(
        path,
        family,
        unet=modules["unet"],
        vae=modules["vae"],
        text_encoders=text_encoders,
        index_extra={"_dti_fast_random_arch": tag},
    )

"""Tiny random-weight Stable Diffusion, SDXL, SANA and Wan models in diffusers' real folder layout.

:func:`make_tiny_model` writes one (CLIP's real BPE tokenizer, shipped in
``dti_fast/assets/clip_tokenizer``; real architecture families at tiny widths),
so the whole pipeline runs end to end on a CPU in seconds;
:func:`tiny_model_path` builds one once and caches it. :func:`write_model_folder`
saves any SD/SDXL modules in the layout :func:`dti_fast.models.load_model_parts`
loads. The tiny configs here are the project's only ones: the reduced
real-layout variants of :mod:`dti_fast.testing.archs` reuse them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..models import FAMILIES, FLOW_FAMILIES, SD_SCHEDULER_CONFIG, build_once, prefix_text_encoder_keys

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTokenizer

__all__ = [
    "TINY_VERSION",
    "TINY_RESOLUTION",
    "clip_tokenizer",
    "clip_tokenizer_files",
    "make_tiny_model",
    "tiny_model_path",
    "write_model_folder",
]

TINY_VERSION = 2
"""Bumped whenever the tiny model's architecture changes; part of :func:`tiny_model_path`'s folder name."""

CLIP_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "clip_tokenizer"

# Per-family architecture of the tiny model. Text encoders are real CLIP text transformers
# (pre-norm, causal mask, quick_gelu) with the real 49408-token vocabulary and 77 positions.
TINY_TEXT = dict(
    vocab_size=49408,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    num_hidden_layers=3,
    bos_token_id=49406,
    eos_token_id=49407,
)
TINY_TE1 = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, projection_dim=32)
TINY_TE2 = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, projection_dim=32)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 16, 16),  # 4 blocks: 3 downsamples, 8x like the real SD VAE
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=64,
)
TINY_RESOLUTION = 64
"""Pixel size the tiny models are built for (latents are 8x8)."""
TIME_IDS = 6  # SDXL's added time ids: original size (2), crop top-left (2), target size (2)


def clip_tokenizer_files() -> tuple[Path, Path]:
    """Paths of the shipped CLIP BPE files (``vocab.json``, ``merges.txt``; MIT, OpenAI CLIP)."""
    vocab, merges = CLIP_TOKENIZER_DIR / "vocab.json", CLIP_TOKENIZER_DIR / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        raise FileNotFoundError(
            f"CLIP tokenizer files are missing from {CLIP_TOKENIZER_DIR}; reinstall dti_fast (they ship as "
            "package data)"
        )
    return vocab, merges


def clip_tokenizer(pad_token: str) -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    clip_tokenizer_files()  # clear error if the package data is missing
    return CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR), pad_token=pad_token, model_max_length=77)


def _save_tokenizer(tok: CLIPTokenizer, folder: Path) -> None:
    """Save like the real SD repos: tokenizer_config, special_tokens_map, vocab.json, merges.txt."""
    tok.save_pretrained(str(folder))
    vocab, merges = clip_tokenizer_files()
    for f in (vocab, merges):  # the slow tokenizer of transformers 4.x reads these two
        if not (folder / f.name).exists():
            shutil.copyfile(f, folder / f.name)
    special = {
        "bos_token": {
            "content": "<|startoftext|>",
            "lstrip": False,
            "normalized": True,
            "rstrip": False,
            "single_word": False,
        },
        "eos_token": {
            "content": "<|endoftext|>",
            "lstrip": False,
            "normalized": True,
            "rstrip": False,
            "single_word": False,
        },
        "pad_token": tok.pad_token,
        "unk_token": {
            "content": "<|endoftext|>",
            "lstrip": False,
            "normalized": True,
            "rstrip": False,
            "single_word": False,
        },
    }
    if not (folder / "special_tokens_map.json").exists():
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


def _tiny_unet(family: str) -> UNet2DConditionModel:
    from diffusers import UNet2DConditionModel

    common = dict(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        norm_num_groups=8,
    )
    if family == "sd":  # SD 1.x shape: cross-attention blocks, the lowest-resolution block plain
        return UNet2DConditionModel(
            **common,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TINY_TE1["hidden_size"],
            attention_head_dim=4,
        )
    # SDXL shape: no attention at the top resolution, linear projections, more transformer layers
    # deeper, text_time added conditioning from the pooled bigG embedding and the 6 time ids.
    time_dim = 8
    return UNet2DConditionModel(
        **common,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TINY_TE1["hidden_size"] + TINY_TE2["hidden_size"],
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=TIME_IDS * time_dim + TINY_TE2["projection_dim"],
    )


def make_tiny_model(path: str | os.PathLike, family: str = "sd", seed: int = 0) -> Path:
    """Write a tiny random-weight ``family`` ("sd", "sdxl", "sana" or "wan") model to ``path``; returns the folder.

    "sana" and "wan": see :mod:`dti_fast.testing.tiny_flow` (``SanaPipeline`` / ``WanPipeline``
    layout, Gemma-2 / UMT5 kind tokenizers built by the project). For "sd" and "sdxl":

    The folder has diffusers' real layout, saved with ``save_pretrained`` (safetensors): "sd" as a
    ``StableDiffusionPipeline`` (unet, vae, text_encoder, tokenizer, scheduler; no safety checker),
    "sdxl" as a ``StableDiffusionXLPipeline`` (plus text_encoder_2 with projection, tokenizer_2
    padding with "!"). Tokenizers are CLIP's real BPE; text encoders are real CLIP text
    transformers with hidden sizes 32 and 64 and the full 49408-token vocabulary; images are
    64x64 px, latents 4x8x8. ``model_index.json`` carries ``"_dti_fast_tiny": <version>``.
    Weights depend only on ``seed``; the global RNG state is left untouched.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    if family in FLOW_FAMILIES:
        from .tiny_flow import make_tiny_flow_model

        extra = {"_dti_fast_tiny": TINY_VERSION, "_dti_fast_resolution": TINY_RESOLUTION}
        return make_tiny_flow_model(path, family, seed=seed, index_extra=extra)
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoders = [CLIPTextModel(CLIPTextConfig(**TINY_TEXT, **TINY_TE1, pad_token_id=49407))]
        unet = _tiny_unet(family)
        vae = AutoencoderKL(**TINY_VAE, scaling_factor=0.18215 if family == "sd" else 0.13025)
        if family == "sdxl":
            text_encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**TINY_TEXT, **TINY_TE2, pad_token_id=0)))
    return write_model_folder(
        path, family, unet=unet, vae=vae, text_encoders=text_encoders, index_extra={"_dti_fast_tiny": TINY_VERSION}
    )


def write_model_folder(
    path: str | os.PathLike,
    family: str,
    *,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoders: list[torch.nn.Module],
    index_extra: dict[str, Any] | None = None,
) -> Path:
    """Save ``family`` modules as a diffusers model folder :func:`load_model_parts` loads; returns it.

    ``StableDiffusionPipeline`` layout for "sd" (``text_encoders``: ``[CLIPTextModel]``),
    ``StableDiffusionXLPipeline`` for "sdxl" (plus a ``CLIPTextModelWithProjection``), with CLIP's
    real BPE tokenizers (tokenizer_2 padding with "!"), the SD DDPM training schedule and no
    safety checker. ``index_extra`` entries are added to ``model_index.json``.
    """
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    out = Path(path).expanduser()
    scheduler = DDPMScheduler(**SD_SCHEDULER_CONFIG)
    tok1 = clip_tokenizer(pad_token="<|endoftext|>")
    if family == "sd":
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoders[0],
            tokenizer=tok1,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    elif family == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoders[0],
            text_encoder_2=text_encoders[1],
            tokenizer=tok1,
            tokenizer_2=clip_tokenizer(pad_token="!"),
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    else:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out), safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        if (out / name).is_dir():
            _save_tokenizer(getattr(pipe, name), out / name)
    for name in ("text_encoder", "text_encoder_2"):
        if (out / name).is_dir():
            prefix_text_encoder_keys(out / name)
    if index_extra:
        index_file = out / "model_index.json"
        index = json.loads(index_file.read_text(encoding="utf-8"))
        index.update(index_extra)
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


def tiny_model_path(family: str = "sd", cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of the cached tiny ``family`` model, building it on first use.

    Lives at ``<cache_dir>/tiny-<family>-v<TINY_VERSION>`` (default cache_dir:
    :func:`dti_fast.models.cache_root`); built once, atomically (:func:`build_once`).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    return build_once(
        f"tiny-{family}-v{TINY_VERSION}",
        "model_index.json",
        lambda folder: make_tiny_model(folder, family=family, seed=0),
        cache_dir,
    )

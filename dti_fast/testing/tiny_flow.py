"""Tiny random-weight SANA and Wan 2.1 pipelines in diffusers' folder layout.

:func:`make_tiny_flow_model` writes a ``SanaPipeline`` (tiny Gemma-2 text encoder with
sliding-window layers and attention soft-capping, DC-AE VAE, SANA transformer) or a
``WanPipeline`` (tiny UMT5 encoder, 3-D causal Wan VAE, Wan transformer) with
``save_pretrained`` (safetensors). The tokenizers are real Gemma / T5 kind tokenizer
files built by :mod:`dti_fast.testing.tokenizers`. Images are 64x64 px: SANA latents
4x16x16 (a 4x DC-AE; the real one is 32x), Wan latents 4x1x8x8 (one frame).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .tokenizers import write_tokenizer_folder

__all__ = ["TINY_GEMMA", "TINY_UMT5", "make_tiny_flow_model"]

# Gemma-2's layout at a tiny width: alternating sliding-window / full layers, grouped-query
# attention, attention-logit soft-capping, sqrt(hidden) embedding scale. The window (16) is
# shorter than the 300-token prompts, so the sliding layers really slide.
TINY_GEMMA = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    sliding_window=16,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    query_pre_attn_scalar=8,
    max_position_embeddings=512,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)
TINY_UMT5 = dict(d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, relative_attention_num_buckets=8)


def _tiny_sana(vocab: int):
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    text_encoder = Gemma2Model(Gemma2Config(vocab_size=vocab, **TINY_GEMMA))
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8, 8),
        decoder_block_out_channels=(8, 8, 8),
        encoder_qkv_multiscales=((), (), (5,)),
        decoder_qkv_multiscales=((), (), (5,)),
        encoder_layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    transformer = SanaTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=4,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=TINY_GEMMA["hidden_size"],
        sample_size=16,
        patch_size=1,
    )
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return text_encoder, vae, transformer, scheduler


def _tiny_wan(vocab: int):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=vocab, pad_token_id=0, eos_token_id=1, **TINY_UMT5))
    vae = AutoencoderKLWan(
        base_dim=3,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.05, 0.0],
        latents_std=[1.5, 2.0, 1.2, 1.8],
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=TINY_UMT5["d_model"],
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return text_encoder, vae, transformer, scheduler


def make_tiny_flow_model(path: str | os.PathLike, family: str, seed: int = 0, index_extra: dict | None = None) -> Path:
    """Write a tiny random-weight "sana" or "wan" pipeline folder to ``path``; returns it.

    Weights depend only on ``seed`` (the global RNG state is left untouched); the
    tokenizer is built deterministically. ``index_extra`` entries go into ``model_index.json``.
    """
    from diffusers import SanaPipeline, WanPipeline
    from transformers import AutoTokenizer

    if family not in ("sana", "wan"):
        raise ValueError(f"make_tiny_flow_model builds 'sana' or 'wan', not {family!r}")
    out = Path(path).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = write_tokenizer_folder(
        out / "tokenizer", "gemma" if family == "sana" else "t5", 300 if family == "sana" else 512
    )
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        build = _tiny_sana if family == "sana" else _tiny_wan
        text_encoder, vae, transformer, scheduler = build(len(tokenizer))
    cls = SanaPipeline if family == "sana" else WanPipeline
    pipe = cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler)
    pipe.save_pretrained(str(out), safe_serialization=True)
    write_tokenizer_folder(out / "tokenizer", "gemma" if family == "sana" else "t5", 300 if family == "sana" else 512)
    if index_extra:
        index_file = out / "model_index.json"
        index = json.loads(index_file.read_text(encoding="utf-8"))
        index.update(index_extra)
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out

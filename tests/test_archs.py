"""dti_fast.archs: the SD 1.5 / SDXL architectures built from the project's configs."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from dti_fast.models import load_model_parts  # noqa: E402
from dti_fast.testing.archs import (  # noqa: E402
    PARAM_COUNTS,
    build_components,
    component_configs,
    full_size_parts_meta,
    make_full_size_model,
    param_count,
)

# The real models' parameter counts (runwayml/stable-diffusion-v1-5,
# stabilityai/stable-diffusion-xl-base-1.0), written out independently of PARAM_COUNTS.
REAL_COUNTS = {
    "sd": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_full_size_param_counts_on_meta(family):
    parts = full_size_parts_meta(family)
    assert set(parts) == set(REAL_COUNTS[family])
    for name, module in parts.items():
        assert all(p.device.type == "meta" for p in module.parameters()), name
        assert param_count(module) == REAL_COUNTS[family][name], name
    assert PARAM_COUNTS == REAL_COUNTS


def test_bigg_text_encoder_count_by_hand():
    """694,659,840 = embeddings + 32 pre-norm layers + final norm + bias-free 1280x1280 projection."""
    d, ff, layers, vocab, pos = 1280, 5120, 32, 49408, 77
    layer = 4 * (d * d + d) + 2 * 2 * d + (d * ff + ff) + (ff * d + d)
    assert vocab * d + pos * d + layers * layer + 2 * d + d * d == REAL_COUNTS["sdxl"]["text_encoder_2"]


def test_configs_published_facts():
    sd, xl = component_configs("sd"), component_configs("sdxl")
    assert sd["unet"]["cross_attention_dim"] == 768 and sd["unet"]["block_out_channels"] == (320, 640, 1280, 1280)
    assert sd["vae"]["scaling_factor"] == 0.18215 and xl["vae"]["scaling_factor"] == 0.13025
    assert sd["text_encoder"]["eos_token_id"] == 2 and sd["text_encoder"]["hidden_act"] == "quick_gelu"
    u = xl["unet"]
    assert u["cross_attention_dim"] == 768 + 1280
    assert u["projection_class_embeddings_input_dim"] == 6 * u["addition_time_embed_dim"] + 1280
    assert u["transformer_layers_per_block"] == (1, 2, 10) and u["attention_head_dim"] == (5, 10, 20)
    g = xl["text_encoder_2"]
    assert (g["hidden_size"], g["num_hidden_layers"], g["num_attention_heads"], g["intermediate_size"]) == (
        1280,
        32,
        20,
        5120,
    )
    assert g["hidden_act"] == "gelu" and g["projection_dim"] == 1280
    # component_configs hands out copies
    sd["unet"]["cross_attention_dim"] = 1
    assert component_configs("sd")["unet"]["cross_attention_dim"] == 768


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_reduced_keeps_the_layout(family):
    full, small = component_configs(family), component_configs(family, reduced=True)
    for name in full:
        for key in (
            "down_block_types",
            "up_block_types",
            "addition_embed_type",
            "use_linear_projection",
            "hidden_act",
            "eos_token_id",
            "vocab_size",
            "scaling_factor",
            "latent_channels",
        ):
            assert full[name].get(key) == small[name].get(key), (name, key)
    if family == "sdxl":
        assert len(small["unet"]["transformer_layers_per_block"]) == 3
        assert (
            small["unet"]["cross_attention_dim"]
            == small["text_encoder"]["hidden_size"] + small["text_encoder_2"]["hidden_size"]
        )
    counts = {k: param_count(m) for k, m in build_components(family, device="meta", reduced=True).items()}
    assert sum(counts.values()) < 20_000_000


def test_build_components_is_seeded_and_leaves_global_rng():
    state = torch.get_rng_state()
    a = build_components("sd", reduced=True, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = build_components("sd", reduced=True, seed=3)
    c = build_components("sd", reduced=True, seed=4)
    wa, wb, wc = (m["unet"].conv_in.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_unknown_family():
    with pytest.raises(ValueError, match="unknown model family"):
        component_configs("sd3")


@pytest.mark.parametrize(("family", "dtype"), [("sd", torch.float32), ("sdxl", torch.bfloat16)])
def test_reduced_folder_loads_and_runs(tmp_path, family, dtype):
    folder = make_full_size_model(tmp_path / family, family, dtype=dtype, reduced=True, seed=1)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_dti_fast_random_arch"] == f"{family}-reduced"
    parts = load_model_parts(folder, dtype=dtype)
    assert parts.family == family
    cfg = component_configs(family, reduced=True)
    assert parts.hidden_sizes == [cfg[k]["hidden_size"] for k in ("text_encoder", "text_encoder_2") if k in cfg]
    assert parts.vae.config.scaling_factor == cfg["vae"]["scaling_factor"]
    assert all(p.dtype == dtype for p in parts.unet.parameters())
    # The saved weights are the built ones.
    built = build_components(family, dtype=dtype, reduced=True, seed=1)
    assert torch.equal(parts.unet.conv_in.weight, built["unet"].conv_in.weight)
    assert torch.equal(
        parts.text_encoders[0].get_input_embeddings().weight, built["text_encoder"].get_input_embeddings().weight
    )

    # One denoising forward with the family's conditioning, at 64 px (8x8 latents).
    ids = [
        tok(["a photo of a dog"], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        for tok in parts.tokenizers
    ]
    with torch.no_grad():
        latents = parts.vae.encode(torch.zeros(1, 3, 64, 64, dtype=dtype)).latent_dist.mean
        assert latents.shape == (1, 4, 8, 8)
        kwargs = {}
        if family == "sdxl":
            h = [enc(i, output_hidden_states=True) for enc, i in zip(parts.text_encoders, ids)]
            hidden = torch.cat([o.hidden_states[-2] for o in h], dim=-1)
            kwargs["added_cond_kwargs"] = {
                "text_embeds": h[1].text_embeds,
                "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]], dtype=dtype),
            }
        else:
            hidden = parts.text_encoders[0](ids[0])[0]
        out = parts.unet(latents, torch.tensor([10]), encoder_hidden_states=hidden, **kwargs).sample
    assert out.shape == latents.shape and torch.isfinite(out.float()).all()


def test_reduced_sdxl_trains(tmp_path):
    """The trainer runs on the real SDXL layout (legacy eos id, text_time conditioning of real proportions)."""
    from dti_fast.data import Concept
    from dti_fast.demo import demo_images_dir
    from dti_fast.train import TrainConfig, train

    folder = make_full_size_model(tmp_path / "sdxl", "sdxl", dtype=torch.float32, reduced=True)
    concepts = [Concept(name="dog", images=demo_images_dir() / "dog", init="dog")]
    result = train(
        TrainConfig(
            model=str(folder),
            output_dir=tmp_path / "out",
            concepts=concepts,
            steps=2,
            batch_size=1,
            resolution=64,
            progress=False,
        )
    )
    assert result.samples == 2 and result.skipped_steps == 0
    assert [v.shape for v in result.vectors["dog"]] == [(1, 32), (1, 64)]

"""Interpolation between concepts: slerp at m* for DTI, lerp vs slerp for TI, files diffusers loads."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dti_fast.concept_files import read_concept, write_concept_files
from dti_fast.interpolate import interpolate_concepts, interpolate_vectors, interpolation_times, interpolation_vectors
from dti_fast.io import load_safetensors, write_json


def make_concept(
    folder: Path, name: str, vectors: list[torch.Tensor], method: str = "dti", scales=None, model: str = "tiny"
) -> Path:
    """A concept folder like training writes (vectors per encoder; DTI vectors rescaled to ``scales``)."""
    family = "sdxl" if len(vectors) == 2 else "sd"
    if method == "dti":
        vectors = [v / v.norm(dim=-1, keepdim=True) * s for v, s in zip(vectors, scales)]
    write_concept_files(folder, name, f"<{name}>", vectors, family, steps=1)
    n = vectors[0].shape[0]
    tokens = [f"<{name}>"] + [f"<{name}>_{i}" for i in range(1, n)]
    write_json(
        {
            "name": name,
            "placeholder": f"<{name}>",
            "tokens": tokens,
            "prompt_string": " ".join(tokens),
            "init": "dog",
            "class_noun": "dog",
            "kind": "object",
            "method": method,
            "steps": 1,
            "model": model,
            "family": family,
            "encoders": [
                {
                    "scale": (scales[e] if method == "dti" else None),
                    "vocab_scale": 0.39,
                    "dim": v.shape[-1],
                    "norms": [float(x) for x in v.norm(dim=-1)],
                }
                for e, v in enumerate(vectors)
            ],
        },
        folder / "concept.json",
    )
    return folder


def _angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.arccos(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).clamp(-1, 1))


def test_dti_slerp_stays_at_mstar_and_moves_at_constant_speed():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 64, generator=g), torch.randn(3, 64, generator=g)
    m = 0.387
    a, b = a / a.norm(dim=-1, keepdim=True) * m, b / b.norm(dim=-1, keepdim=True) * m
    theta = _angle(a, b)
    for t in (0.0, 0.2, 0.5, 0.9, 1.0):
        e = interpolate_vectors(a, b, t, "slerp", scale=m)
        torch.testing.assert_close(e.norm(dim=-1), torch.full((3,), m), rtol=1e-6, atol=0)
        # On the great circle: the angle to a is t*theta, to b (1-t)*theta.
        torch.testing.assert_close(_angle(e, a), t * theta, atol=2e-3, rtol=0)
        torch.testing.assert_close(_angle(e, b), (1 - t) * theta, atol=2e-3, rtol=0)
    torch.testing.assert_close(interpolate_vectors(a, b, 0.0, "slerp", scale=m), a, atol=1e-6, rtol=0)
    torch.testing.assert_close(interpolate_vectors(a, b, 1.0, "slerp", scale=m), b, atol=1e-6, rtol=0)


def test_ti_lerp_sags_while_slerp_interpolates_the_norm():
    a = torch.tensor([[3.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 1.0, 0.0]])
    lerp = interpolate_vectors(a, b, 0.5, "lerp")
    torch.testing.assert_close(lerp, torch.tensor([[1.5, 0.5, 0.0]]))
    s = interpolate_vectors(a, b, 0.5, "slerp")
    torch.testing.assert_close(s.norm(dim=-1), torch.tensor([2.0]))  # (3 + 1) / 2
    torch.testing.assert_close(s / s.norm(), torch.tensor([[1.0, 1.0, 0.0]]) / math.sqrt(2))
    assert float(lerp.norm()) < float(s.norm())


def test_nearly_equal_directions_fall_back_to_lerp_and_antipodal_ones_are_refused(tmp_path):
    a = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    b = torch.tensor([[1.0, 1e-6, 0.0, 0.0]])
    e = interpolate_vectors(a, b, 0.5, "slerp", scale=0.4)
    assert torch.isfinite(e).all()
    torch.testing.assert_close(e, torch.tensor([[0.4, 0.0, 0.0, 0.0]]), atol=1e-6, rtol=0)
    pa = make_concept(tmp_path / "a", "a", [torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])], scales=[0.4])
    pb = make_concept(tmp_path / "b", "b", [torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, -1.0, 0.0, 0.0]])], scales=[0.4])
    with pytest.raises(ValueError, match=r"vector 1 of text encoder 1 .*opposite.*--mode lerp"):
        interpolate_concepts(pa, pb, tmp_path / "out", steps=3, mode="slerp")
    assert not (tmp_path / "out").exists()
    # lerp is defined there.
    res = interpolate_concepts(pa, pb, tmp_path / "out", steps=3, mode="lerp")
    mid = load_safetensors(res.folders["lerp"][1] / "learned_embeds.safetensors")["<a-b-lerp-t0.5>"]
    torch.testing.assert_close(mid[1], torch.zeros(4), atol=1e-7, rtol=0)


def test_different_vector_counts_dims_or_families_are_clear_errors(tmp_path):
    g = torch.Generator().manual_seed(1)
    one = make_concept(tmp_path / "one", "one", [torch.randn(1, 8, generator=g)], scales=[0.4])
    two = make_concept(tmp_path / "two", "two", [torch.randn(2, 8, generator=g)], scales=[0.4])
    wide = make_concept(tmp_path / "wide", "wide", [torch.randn(1, 16, generator=g)], scales=[0.4])
    xl = make_concept(
        tmp_path / "xl", "xl", [torch.randn(1, 8, generator=g), torch.randn(1, 16, generator=g)], scales=[0.4, 0.45]
    )
    with pytest.raises(ValueError, match=r"has 1 vector\(s\).*has 2 .*same count"):
        interpolate_concepts(one, two, tmp_path / "o1")
    with pytest.raises(ValueError, match="size 8 .* size 16"):
        interpolate_concepts(one, wide, tmp_path / "o2")
    with pytest.raises(ValueError, match="1 text encoder.*2"):
        interpolate_concepts(one, xl, tmp_path / "o3")
    with pytest.raises(ValueError, match="steps must be an integer >= 2"):
        interpolation_times(1)


def test_sdxl_encoders_share_t_and_files_are_written_per_encoder(tmp_path):
    g = torch.Generator().manual_seed(2)
    scales = [0.38, 0.45]
    a = make_concept(
        tmp_path / "a", "a", [torch.randn(2, 32, generator=g), torch.randn(2, 64, generator=g)], scales=scales
    )
    b = make_concept(
        tmp_path / "b", "b", [torch.randn(2, 32, generator=g), torch.randn(2, 64, generator=g)], scales=scales
    )
    ca, cb = read_concept(a), read_concept(b)
    res = interpolate_concepts(a, b, tmp_path / "out", steps=5)
    assert res.modes == ["slerp"] and res.times == [0.0, 0.25, 0.5, 0.75, 1.0]
    for t, folder in zip(res.times, res.folders["slerp"]):
        placeholder = f"<a-b-t{t:g}>"
        v1 = load_safetensors(folder / "learned_embeds.safetensors")[placeholder]
        v2 = load_safetensors(folder / "learned_embeds_2.safetensors")[placeholder]
        for e, v in enumerate((v1, v2)):
            va, vb = ca.vectors[e], cb.vectors[e]
            torch.testing.assert_close(v.norm(dim=-1), torch.full((2,), scales[e]), rtol=1e-5, atol=0)
            theta = _angle(va, vb)
            torch.testing.assert_close(_angle(v, va), t * theta, atol=2e-3, rtol=0)
        back = read_concept(folder)
        assert back.placeholder == placeholder and back.tokens == [placeholder, f"{placeholder}_1"]
        assert back.info["interpolation"]["t"] == t and back.method == "dti"
        assert [enc["scale"] for enc in back.info["encoders"]] == pytest.approx(scales, rel=1e-5)
    assert (tmp_path / "out" / "interpolation.json").is_file()


def test_mode_auto_is_slerp_for_dti_and_both_for_ti(tmp_path):
    g = torch.Generator().manual_seed(3)
    d1 = make_concept(tmp_path / "d1", "d1", [torch.randn(1, 8, generator=g)], scales=[0.4])
    d2 = make_concept(tmp_path / "d2", "d2", [torch.randn(1, 8, generator=g)], scales=[0.4])
    t1 = make_concept(tmp_path / "t1", "t1", [torch.randn(1, 8, generator=g) * 3], method="ti")
    t2 = make_concept(tmp_path / "t2", "t2", [torch.randn(1, 8, generator=g)], method="ti")
    assert interpolate_concepts(d1, d2, tmp_path / "o1", steps=3).modes == ["slerp"]
    res = interpolate_concepts(t1, t2, tmp_path / "o2", steps=3)
    assert res.modes == ["lerp", "slerp"]
    ct1, ct2 = read_concept(t1), read_concept(t2)
    mid = read_concept(res.folders["slerp"][1]).vectors[0]
    expected = (ct1.vectors[0].norm(dim=-1) + ct2.vectors[0].norm(dim=-1)) / 2
    torch.testing.assert_close(mid.norm(dim=-1), expected, rtol=1e-5, atol=0)
    lerp_mid = read_concept(res.folders["lerp"][1]).vectors[0]
    torch.testing.assert_close(lerp_mid, (ct1.vectors[0] + ct2.vectors[0]) / 2)


def test_dti_concepts_mixed_scales_move_linearly(tmp_path):
    g = torch.Generator().manual_seed(4)
    a = read_concept(make_concept(tmp_path / "a", "a", [torch.randn(1, 8, generator=g)], scales=[0.3]))
    b = read_concept(make_concept(tmp_path / "b", "b", [torch.randn(1, 8, generator=g)], scales=[0.5]))
    v = interpolation_vectors(a, b, 0.25, "slerp")[0]
    torch.testing.assert_close(v.norm(dim=-1), torch.tensor([0.35]), rtol=1e-5, atol=0)


def test_trained_concepts_interpolate_load_in_diffusers_and_draw_a_strip(trained_sd, eval_sd_model, tmp_path):
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    dti = trained_sd["dti"]
    res = interpolate_concepts(
        dti.concept_dirs["dog"],
        dti.concept_dirs["cat2"],
        tmp_path / "out",
        steps=3,
        images=True,
        inference_steps=2,
        model=str(eval_sd_model),
    )
    m_star = dti.scales[0]
    pipe = StableDiffusionPipeline.from_pretrained(eval_sd_model, safety_checker=None, requires_safety_checker=False)
    for t, folder in zip(res.times, res.folders["slerp"]):
        token = f"<dog-cat2-t{t:g}>"
        pipe.load_textual_inversion(str(folder / "learned_embeds.safetensors"))
        row = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids(token)].detach()
        assert abs(float(row.norm()) - m_star) < 1e-5 * m_star
    row0 = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("<dog-cat2-t0>")]
    torch.testing.assert_close(row0.detach(), dti.vectors["dog"][0][0], atol=1e-6, rtol=0)
    strip = res.strips["slerp"]
    with Image.open(strip) as im:
        assert im.size[0] >= 3 * 128  # one tile per t
    recs = (tmp_path / "out" / "images" / "slerp" / "images.json").read_text()
    assert '"seed": 0' in recs and recs.count('"seed": 0') == 3  # the same seed at every t


def test_cli_interpolate(trained_sd, tmp_path, capsys):
    from dti_fast.cli import main

    ti = trained_sd["ti"]
    rc = main(
        [
            "interpolate",
            str(ti.concept_dirs["dog"]),
            str(ti.concept_dirs["cat2"]),
            "--steps",
            "4",
            "--no-images",
            "--output",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "lerp, slerp" in out and (tmp_path / "o" / "lerp" / "t1" / "learned_embeds.safetensors").is_file()
    assert len(list((tmp_path / "o" / "slerp").iterdir())) == 4
    rc = main(
        [
            "interpolate",
            str(ti.concept_dirs["dog"]),
            str(ti.concept_dirs["backpack"]),
            "--no-images",
            "--output",
            str(tmp_path / "o2"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "same count" in err and len(err.strip().splitlines()) == 1

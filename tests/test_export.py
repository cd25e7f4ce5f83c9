"""dti_fast.export: concept records in, every format out (no model, no trainer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dti_fast.data import Concept
from dti_fast.export import ConceptRecord, EncoderVectors, export_concepts
from dti_fast.io import load_safetensors, load_torch


def _record(tmp_path: Path, family: str = "sd", method: str = "dti", n: int = 2, stopped: str | None = None):
    gen = torch.Generator().manual_seed(0)
    dims = [32] if family == "sd" else [32, 64]
    encoders = []
    for d in dims:
        v = torch.randn(n, d, generator=gen)
        scale = 0.5 if method == "dti" else None
        vectors = v / v.norm(dim=-1, keepdim=True) * 0.5 if method == "dti" else v * 3
        encoders.append(EncoderVectors(vectors=vectors, scale=scale, vocab_scale=0.5))
    concept = Concept(name="bag", images=tmp_path, init="red backpack", class_noun="backpack")
    return ConceptRecord(
        concept=concept,
        tokens=["<bag>", "<bag>_1"][:n],
        prompt_string="<bag> <bag>_1",
        method=method,
        steps=7,
        stopped=stopped,
        fingerprint="f" * 16,
        model="m",
        family=family,
        encoders=encoders,
    )


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_every_format_holds_the_record_vectors(tmp_path, family):
    r = _record(tmp_path, family)
    dirs = export_concepts(tmp_path / "out", [r])
    folder = dirs["bag"]
    assert folder == tmp_path / "out" / "bag"
    first = load_safetensors(folder / "learned_embeds.safetensors")
    assert list(first) == ["<bag>"] and torch.equal(first["<bag>"], r.encoders[0].vectors)
    if family == "sdxl":
        assert torch.equal(load_safetensors(folder / "learned_embeds_2.safetensors")["<bag>"], r.encoders[1].vectors)
        a1111 = load_safetensors(folder / "bag-dti.safetensors")
        assert torch.equal(a1111["clip_l"], r.encoders[0].vectors) and torch.equal(
            a1111["clip_g"], r.encoders[1].vectors
        )
    else:
        a1111 = load_torch(folder / "bag-dti.pt")
        assert torch.equal(next(iter(a1111["string_to_param"].values())), r.encoders[0].vectors)
    info = json.loads((folder / "concept.json").read_text())
    assert info["status"] == "complete" and info["steps"] == 7 and info["family"] == family
    assert info["tokens"] == ["<bag>", "<bag>_1"] and info["class_noun"] == "backpack"
    assert [e["dim"] for e in info["encoders"]] == [e.vectors.shape[1] for e in r.encoders]
    assert info["encoders"][0]["norms"] == pytest.approx([0.5, 0.5])


def test_ti_rescaled_writes_unit_directions_at_the_vocabulary_scale(tmp_path):
    r = _record(tmp_path, method="ti")
    folder = export_concepts(tmp_path / "out", [r], ti_rescaled=True)["bag"]
    rescaled = load_safetensors(folder / "rescaled" / "learned_embeds.safetensors")["<bag>"]
    assert torch.allclose(rescaled.norm(dim=-1), torch.full((2,), 0.5))
    assert torch.allclose(rescaled / 0.5, r.encoders[0].vectors / r.encoders[0].vectors.norm(dim=-1, keepdim=True))
    assert json.loads((folder / "concept.json").read_text())["rescaled"] == "rescaled/"
    # DTI has nothing to rescale.
    folder = export_concepts(tmp_path / "dti", [_record(tmp_path)], ti_rescaled=True)["bag"]
    assert not (folder / "rescaled").exists()


def test_a_stopped_concept_says_why(tmp_path):
    folder = export_concepts(tmp_path / "out", [_record(tmp_path, stopped="3 steps in a row had a NaN")])["bag"]
    assert json.loads((folder / "concept.json").read_text())["status"] == "stopped: 3 steps in a row had a NaN"


def test_non_finite_vectors_are_never_exported(tmp_path):
    r = _record(tmp_path)
    r.encoders[0].vectors[1, 3] = float("nan")
    folder = export_concepts(tmp_path / "out", [r])["bag"]
    assert sorted(p.name for p in folder.iterdir()) == ["concept.json"]
    assert json.loads((folder / "concept.json").read_text())["status"].startswith("failed: its vectors are not finite")


def test_concept_files_that_are_damaged_or_not_finite_are_refused_by_name(tmp_path):
    from dti_fast.concept_files import read_concept

    folder = export_concepts(tmp_path / "out", [_record(tmp_path)])["bag"]
    (folder / "concept.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="concept.json holds a list, not the JSON object"):
        read_concept(folder)
    (folder / "concept.json").write_text("{")
    with pytest.raises(ValueError, match="concept.json is not readable JSON"):
        read_concept(folder)
    bad = tmp_path / "nan.safetensors"
    from dti_fast.io import save_safetensors

    save_safetensors({"<x>": torch.full((1, 32), float("nan"))}, bad)
    with pytest.raises(ValueError, match="nan.safetensors: the learned vectors hold NaN or inf"):
        read_concept(bad)

"""Generation with learned concepts: loading into diffusers pipelines, prompts x seeds, batches, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dti_fast.concept_files import load_concepts, read_concept, unload_concepts, write_concept_files
from dti_fast.generate import expand_prompts, generate, load_pipeline, scoring_text
from dti_fast.io import write_json


@pytest.fixture(scope="module")
def sd_pipe(eval_sd_model):
    return load_pipeline(str(eval_sd_model), device="cpu")


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_load_concepts_puts_the_exported_vectors_in_the_text_encoder_and_unload_removes_them(trained_sd, sd_pipe):
    dti = trained_sd["dti"]
    concepts = [read_concept(dti.concept_dirs["dog"]), read_concept(dti.concept_dirs["backpack"])]
    before = len(sd_pipe.tokenizer)
    load_concepts(sd_pipe, concepts)
    try:
        ids = sd_pipe.tokenizer.convert_tokens_to_ids(["<backpack>", "<backpack>_1"])
        rows = sd_pipe.text_encoder.get_input_embeddings().weight[ids].detach()
        torch.testing.assert_close(rows, dti.vectors["backpack"][0], rtol=0, atol=0)
        # The bare placeholder expands to both vectors, as diffusers does for multi-vector tokens.
        assert "<backpack>_1" in sd_pipe.maybe_convert_prompt("a photo of <backpack>", sd_pipe.tokenizer)
    finally:
        unload_concepts(sd_pipe, concepts)
    assert len(sd_pipe.tokenizer) == before and "<dog>" not in sd_pipe.tokenizer.get_vocab()


def test_generate_prompts_times_seeds_manifest_grid_and_skip(trained_sd, sd_pipe, tmp_path):
    dti = trained_sd["dti"]
    prompts = ["a photo of {}", "a {} on the beach"]
    res = generate(
        None,
        [dti.concept_dirs["dog"], dti.concept_dirs["backpack"]],
        prompts,
        tmp_path / "g",
        seeds=[0, 1],
        steps=2,
        batch_size=3,
        pipe=sd_pipe,
    )
    assert len(res.records) == 2 * 2 * 2 and res.generated == 8
    manifest = json.loads(res.manifest.read_text())
    rec = next(r for r in manifest["records"] if r["concept"] == "backpack" and r["prompt_index"] == 1)
    assert rec["prompt_text"] == "a <backpack> on the beach" and rec["text"] == "a backpack on the beach"
    for r in res.records:
        assert (tmp_path / "g" / r.file).is_file()
    with Image.open(res.grids["dog"]) as sheet:
        assert sheet.size[0] == 2 * 128  # columns = seeds, 64 px tiles shown at 128
    a, b = _pixels(tmp_path / "g" / "dog/p000_s0.png"), _pixels(tmp_path / "g" / "dog/p000_s1.png")
    assert np.abs(a - b).mean() > 1  # seeds differ
    again = generate(
        None,
        [dti.concept_dirs["dog"], dti.concept_dirs["backpack"]],
        prompts,
        tmp_path / "g",
        seeds=[0, 1],
        steps=2,
        pipe=sd_pipe,
    )
    assert again.generated == 0


def test_an_image_depends_on_its_seed_not_on_its_batch(trained_sd, sd_pipe, tmp_path):
    dog = trained_sd["dti"].concept_dirs["dog"]
    generate(None, [dog], ["a photo of {}"], tmp_path / "b1", seeds=[3, 4, 5], steps=2, batch_size=1, pipe=sd_pipe)
    generate(None, [dog], ["a photo of {}"], tmp_path / "b3", seeds=[3, 4, 5], steps=2, batch_size=3, pipe=sd_pipe)
    for seed in (3, 4, 5):
        d = np.abs(
            _pixels(tmp_path / "b1" / f"dog/p000_s{seed}.png") - _pixels(tmp_path / "b3" / f"dog/p000_s{seed}.png")
        )
        assert d.max() <= 2, seed


def test_the_learned_vectors_change_the_image(trained_sd, sd_pipe, tmp_path):
    dti, ti = trained_sd["dti"], trained_sd["ti"]
    generate(None, [dti.concept_dirs["dog"]], ["a photo of {}"], tmp_path / "d", seeds=[0], steps=2, pipe=sd_pipe)
    generate(None, [ti.concept_dirs["dog"]], ["a photo of {}"], tmp_path / "t", seeds=[0], steps=2, pipe=sd_pipe)
    assert np.abs(_pixels(tmp_path / "d/dog/p000_s0.png") - _pixels(tmp_path / "t/dog/p000_s0.png")).mean() > 0.1


def test_rescaled_folder_reads_as_ti_rescaled_at_mstar(trained_sd):
    ti = trained_sd["ti"]
    c = read_concept(ti.concept_dirs["dog"] / "rescaled")
    assert c.method == "ti-rescaled" and c.placeholder == "<dog>" and c.class_noun == "dog"
    vocab = json.loads((ti.concept_dirs["dog"] / "concept.json").read_text())["encoders"][0]["vocab_scale"]
    torch.testing.assert_close(c.vectors[0].norm(dim=-1), torch.full((1,), vocab), rtol=1e-5, atol=0)
    assert float(read_concept(ti.concept_dirs["dog"]).vectors[0].norm()) != pytest.approx(vocab, rel=1e-3)


def test_sdxl_concept_loads_into_both_encoders_and_generates(trained_sdxl, eval_sdxl_model, tmp_path):
    pipe = load_pipeline(str(eval_sdxl_model), device="cpu")
    c = read_concept(trained_sdxl.concept_dirs["dog"])
    assert c.family == "sdxl"
    load_concepts(pipe, [c])
    for tok, enc, v in (
        (pipe.tokenizer, pipe.text_encoder, c.vectors[0]),
        (pipe.tokenizer_2, pipe.text_encoder_2, c.vectors[1]),
    ):
        row = enc.get_input_embeddings().weight[tok.convert_tokens_to_ids("<dog>")].detach()
        torch.testing.assert_close(row, v[0], rtol=0, atol=0)
    unload_concepts(pipe, [c])
    assert "<dog>" not in pipe.tokenizer_2.get_vocab()
    res = generate(None, [c], ["a photo of {}"], tmp_path / "x", seeds=[0], steps=2, pipe=pipe)
    assert res.generated == 1


def test_wrong_model_for_the_concept_is_a_clear_error(trained_sd, trained_sdxl, eval_sdxl_model, sd_pipe, tmp_path):
    sd_concept = read_concept(trained_sd["dti"].concept_dirs["dog"])
    xl_pipe = load_pipeline(str(eval_sdxl_model), device="cpu")
    with pytest.raises(ValueError, match=r"one text encoder \(SD 1.x/2.x\) but model .* is SDXL"):
        load_concepts(xl_pipe, [sd_concept])
    with pytest.raises(ValueError, match=r"two text encoders \(SDXL\)"):
        load_concepts(sd_pipe, [read_concept(trained_sdxl.concept_dirs["dog"])])
    # Right family, wrong width (e.g. an SD 1.5 embedding into SD 2.x): the error names the file.
    folder = tmp_path / "wide"
    write_concept_files(folder, "wide", "<wide>", [torch.randn(1, 48)], "sd", steps=1)
    write_json(
        {"name": "wide", "placeholder": "<wide>", "method": "dti", "model": "other-model"}, folder / "concept.json"
    )
    with pytest.raises(
        ValueError,
        match=r"learned_embeds.safetensors holds vectors of size 48 but text encoder 1 .* "
        r"takes 32.*other-model",
    ):
        load_concepts(sd_pipe, [read_concept(folder)])
    assert "<wide>" not in sd_pipe.tokenizer.get_vocab()  # nothing half-loaded


def test_read_concept_errors_name_the_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_concept(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no learned_embeds.safetensors"):
        read_concept(tmp_path / "empty")
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="bad.safetensors is not a readable safetensors file"):
        read_concept(tmp_path / "bad.safetensors")


def test_scoring_text_puts_the_class_noun_where_the_concept_was():
    assert scoring_text("a {} in the snow", "dog") == "a dog in the snow"
    assert scoring_text("a photo of <bag> <bag>_1 on sand", "backpack", ["<bag>"]) == "a photo of backpack on sand"
    assert scoring_text("<dog> and <cat>", "dog", ["<dog>", "<cat>"]) == "dog and dog"
    assert scoring_text("a {}", None) == "a object"


def test_expand_prompts_per_concept_lists(trained_sd):
    dti = trained_sd["dti"]
    dog, bag = read_concept(dti.concept_dirs["dog"]), read_concept(dti.concept_dirs["backpack"])
    recs = expand_prompts(
        {"dog": ["a {} wearing a hat"], "backpack": ["a {} on a rug", "a red {}"]}, [dog, bag], [0, 1]
    )
    assert [(r.concept, r.prompt_index, r.seed) for r in recs] == [
        ("dog", 0, 0),
        ("dog", 0, 1),
        ("backpack", 0, 0),
        ("backpack", 0, 1),
        ("backpack", 1, 0),
        ("backpack", 1, 1),
    ]
    with pytest.raises(ValueError, match="no prompts for concept"):
        expand_prompts({"dog": ["a {}"]}, [dog, bag], [0])
    with pytest.raises(ValueError, match="no concept was given"):
        expand_prompts(["a {}"], [], [0])


def test_cli_generate(trained_sd, tmp_path, capsys):
    from dti_fast.cli import main

    rc = main(
        [
            "generate",
            "--concept",
            str(trained_sd["dti"].concept_dirs["cat2"]),
            "--prompt",
            "a {} in the snow",
            "--seeds",
            "0-1",
            "--steps",
            "2",
            "--output",
            str(tmp_path / "o"),
            "--no-progress",
        ]
    )
    assert rc == 0
    assert "2 image(s)" in capsys.readouterr().out
    assert (tmp_path / "o" / "cat2" / "p000_s1.png").is_file() and (tmp_path / "o" / "cat2" / "grid.png").is_file()
    parser_help = __import__("dti_fast.cli", fromlist=["build_parser"]).build_parser()
    gen = parser_help._subparsers._group_actions[0].choices["generate"]
    assert all(a.help for a in gen._actions)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 generation on a GPU needs CUDA")
def test_gpu_generation_is_bf16(trained_sd, eval_sd_model, tmp_path):
    pipe = load_pipeline(str(eval_sd_model))
    assert pipe.unet.dtype == torch.bfloat16 and pipe.device.type == "cuda"
    res = generate(
        None,
        [trained_sd["dti"].concept_dirs["dog"]],
        ["a photo of {}"],
        tmp_path / "g",
        seeds=[0, 1],
        steps=2,
        pipe=pipe,
        batch_size=2,
    )
    assert res.generated == 2

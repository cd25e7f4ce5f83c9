"""Damaged model folders and embedding files are refused with one line naming the file and the fix.

Every case uses the real thing: a copy of the tiny model with one file damaged, a real SDXL concept
trained on the tiny SDXL model, embedding files written with safetensors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dti_fast.concept_files import load_concepts, read_concept
from dti_fast.models import load_model_parts, model_load_errors, probe_tokenizer, resolve_source

pytestmark = pytest.mark.usefixtures("one_thread")


def _copy(model: Path, tmp_path: Path, name: str = "m") -> Path:
    dest = tmp_path / name
    shutil.copytree(model, dest)
    return dest


def _edit_json(file: Path, **changes) -> None:
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def sd_pipe(eval_sd_model):
    from dti_fast.generate import load_pipeline

    return load_pipeline(eval_sd_model, device="cpu", dtype="fp32")


# -- model folders ------------------------------------------------------------------------------------


def test_model_index_that_is_a_list_is_refused_naming_the_file(eval_sd_model, tmp_path, capsys):
    from dti_fast.cli import main

    m = _copy(eval_sd_model, tmp_path)
    (m / "model_index.json").write_text("[]")
    with pytest.raises(ValueError, match=r"model_index.json holds a list, not the JSON object .* re-save the model"):
        resolve_source(str(m), None, None)
    concept = tmp_path / "c.safetensors"
    save_file({"emb_params": torch.randn(1, 32)}, str(concept))
    code = main(["generate", "--concept", str(concept), "--model", str(m), "--output", str(tmp_path / "g")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "model_index.json holds a list" in err[0], err


def test_tokenizer_config_with_a_wrong_type_is_refused_before_loading(eval_sd_model, tmp_path):
    m = _copy(eval_sd_model, tmp_path)
    _edit_json(m / "tokenizer" / "tokenizer_config.json", model_max_length="abc")
    with pytest.raises(ValueError, match=r'tokenizer/tokenizer_config.json has "model_max_length": "abc", which must'):
        resolve_source(str(m), None, None)


@pytest.mark.parametrize("file", ["tokenizer/tokenizer.json", "unet/config.json", "scheduler/scheduler_config.json"])
def test_a_json_file_that_is_not_json_is_named(eval_sd_model, tmp_path, file):
    m = _copy(eval_sd_model, tmp_path)
    (m / file).write_text("garbage")
    with pytest.raises(ValueError, match=rf"model '.*': {file} is not valid JSON \(Expecting value.*re-save the model"):
        load_model_parts(m)


def test_vocab_json_needs_to_parse_only_without_tokenizer_json(eval_sd_model, tmp_path):
    m = _copy(eval_sd_model, tmp_path)
    (m / "tokenizer" / "vocab.json").write_text("garbage")
    resolve_source(str(m), None, None)  # tokenizer.json is what loads: the folder works
    (m / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"tokenizer/vocab.json is not valid JSON"):
        resolve_source(str(m), None, None)


def test_truncated_weights_are_named_before_loading(eval_sd_model, tmp_path):
    m = _copy(eval_sd_model, tmp_path)
    weights = m / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"unet/diffusion_pytorch_model.safetensors is not a readable safetensors"):
        resolve_source(str(m), None, None)


def test_unet_config_that_does_not_match_its_weights_names_the_part(eval_sd_model, tmp_path):
    from diffusers import StableDiffusionPipeline

    m = _copy(eval_sd_model, tmp_path)
    cfg = json.loads((m / "unet" / "config.json").read_text())
    _edit_json(m / "unet" / "config.json", block_out_channels=[2 * c for c in cfg["block_out_channels"]])
    with pytest.raises(ValueError, match=r"the config of unet/ does not match its weights") as info:
        load_model_parts(m)
    assert "ignore_mismatched_sizes" not in str(info.value) and "\n" not in str(info.value)
    # What generate's pipeline loading raises, through the same translation (no part given: found from the key).
    with pytest.raises(ValueError, match=r"the config of unet/ does not match its weights \(conv_in\.bias is \[32\]"):
        with model_load_errors(resolve_source(str(m), None, None)):
            StableDiffusionPipeline.from_pretrained(str(m), local_files_only=True)


def test_probe_tokenizer_refuses_a_tokenizer_that_cannot_tokenize(eval_sd_model):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(eval_sd_model, subfolder="tokenizer")
    probe_tokenizer(tok, "m")
    tok.model_max_length = "abc"
    with pytest.raises(ValueError, match=r"model 'm': its tokenizer/ does not tokenize a prompt .*re-save the model"):
        probe_tokenizer(tok, "m")


# -- concept files ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key,value",
    [("placeholder", 5), ("family", "sd3"), ("model", ["x"]), ("encoders", "x"), ("name", ""), ("clients", [1])],
)
def test_concept_json_values_of_the_wrong_type_are_refused(trained_sd, tmp_path, key, value):
    c = tmp_path / "dog"
    shutil.copytree(trained_sd["dti"].concept_dirs["dog"], c)
    _edit_json(c / "concept.json", **{key: value})
    with pytest.raises(ValueError, match=rf'concept.json: "{key}" must be .*re-export the concept'):
        read_concept(c)


def test_huge_finite_vectors_are_refused_where_they_load(sd_pipe, tmp_path):
    f = tmp_path / "huge.safetensors"
    save_file({"emb_params": torch.randn(1, 32) * 1e30}, str(f))
    concept = read_concept(f)  # finite: passes the NaN/inf check
    with pytest.raises(ValueError, match=r"huge.safetensors: a vector has norm .* times the longest word vector"):
        load_concepts(sd_pipe, concept)
    assert "huge" not in sd_pipe.tokenizer.get_vocab()
    ok = tmp_path / "fine-emb.safetensors"
    save_file({"emb_params": torch.randn(1, 32) * 0.1}, str(ok))
    words = load_concepts(sd_pipe, ok)
    from dti_fast.concept_files import unload_concepts

    unload_concepts(sd_pipe, [read_concept(ok)])
    assert words == ["fine-emb"]


def test_the_first_half_of_an_sdxl_concept_is_refused_by_an_sd_model(trained_sdxl, sd_pipe, tmp_path):
    folder = trained_sdxl.concept_dirs["dog"]
    half = folder / "learned_embeds.safetensors"
    assert json.loads((folder / "concept.json").read_text())["family"] == "sdxl"
    assert read_concept(half).vectors[0].shape[-1] == 32  # as wide as the SD model's rows
    with pytest.raises(ValueError, match=r"first text encoder's half of an SDXL concept .* load the concept folder"):
        load_concepts(sd_pipe, half)
    # The same file without its concept.json is a plain SD embedding file, as before.
    alone = tmp_path / "learned_embeds.safetensors"
    shutil.copy(half, alone)
    words = load_concepts(sd_pipe, alone)
    from dti_fast.concept_files import unload_concepts

    unload_concepts(sd_pipe, [read_concept(alone)])
    assert len(words) == 1


def test_an_embedding_longer_than_the_window_is_refused(sd_pipe, tmp_path):
    f = tmp_path / "long.safetensors"
    save_file({"emb_params": torch.randn(200, 32) * 0.1}, str(f))
    with pytest.raises(ValueError, match=r"holds 200 vectors, so a prompt with it takes at least 202 tokens"):
        load_concepts(sd_pipe, f)
    fits = tmp_path / "fits.safetensors"
    save_file({"emb_params": torch.randn(75, 32) * 0.1}, str(fits))
    load_concepts(sd_pipe, fits)
    from dti_fast.concept_files import unload_concepts

    unload_concepts(sd_pipe, [read_concept(fits)])


@pytest.mark.parametrize("tensor", [torch.randn(1, 32) > 0, torch.randint(0, 5, (1, 32))], ids=["bool", "int64"])
def test_non_float_embeddings_are_refused(tmp_path, tensor):
    f = tmp_path / "e.safetensors"
    save_file({"emb_params": tensor}, str(f))
    with pytest.raises(ValueError, match=r"e.safetensors emb_params: the learned vectors are (bool|int64) values"):
        read_concept(f)
    pt = tmp_path / "e.pt"
    torch.save({"string_to_param": {"*": tensor}}, pt)
    with pytest.raises(ValueError, match=r"not floating point"):
        read_concept(pt)


# -- the model concept.json records ---------------------------------------------------------------------


def test_concept_json_records_a_relative_model_as_its_absolute_path(eval_sd_model, tmp_path, monkeypatch):
    from dti_fast.data import Concept
    from dti_fast.demo import demo_images_dir
    from dti_fast.train import TrainConfig, train

    root = tmp_path / "work"
    shutil.copytree(eval_sd_model, root / "tiny")
    monkeypatch.chdir(root)
    cfg = TrainConfig(
        model="tiny",
        output_dir=Path("out"),
        concepts=[Concept(name="dog", images=demo_images_dir() / "dog", init="dog")],
        steps=1,
        batch_size=1,
        resolution=64,
        progress=False,
    )
    train(cfg)
    info = json.loads((root / "out" / "dog" / "concept.json").read_text())
    assert info["model"] == str(root / "tiny")
    # From another folder that holds an unrelated model of the same name, the recorded model is still used.
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(eval_sd_model, elsewhere / "tiny")
    monkeypatch.chdir(elsewhere)
    assert read_concept(root / "out" / "dog").info["model"] == str(root / "tiny")


def test_an_old_relative_model_is_found_above_the_concept_folder(trained_sd, eval_sd_model, tmp_path, monkeypatch):
    root = tmp_path / "work"
    shutil.copytree(eval_sd_model, root / "tiny")
    c = root / "out" / "dog"
    shutil.copytree(trained_sd["dti"].concept_dirs["dog"], c)
    _edit_json(c / "concept.json", model="tiny")  # as concept.json files written before recorded it
    other = tmp_path / "other"
    shutil.copytree(eval_sd_model, other / "tiny")  # another model called tiny in the current folder
    monkeypatch.chdir(other)
    assert read_concept(c).info["model"] == str(root / "tiny")
    assert read_concept(c / "learned_embeds.safetensors").info["model"] == str(root / "tiny")
    _edit_json(c / "concept.json", model="org/some-model")  # a hub id found nowhere stays as it is
    assert read_concept(c).info["model"] == "org/some-model"

"""The concept files: names and triggers checked before training, the files written, read back and loaded."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from dti_fast.concept_files import (
    NAME_MAX_BYTES,
    client_info,
    concept_trigger,
    default_trigger,
    read_concept,
    summary_lines,
    validate_export_names,
    validate_trigger,
    write_concept_files,
)
from dti_fast.data import Concept
from dti_fast.io import load_safetensors, load_torch

pytestmark = pytest.mark.usefixtures("one_thread")


def _concept(name="dog", **kw) -> Concept:
    return Concept(name=name, images=Path("photos") / name, init="dog", **kw)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    from dti_fast.testing import tiny_model_path

    return CLIPTokenizer.from_pretrained(tiny_model_path("sd") / "tokenizer")


# -- triggers ------------------------------------------------------------------------------------


def test_default_trigger_is_the_placeholder_plus_the_method():
    assert default_trigger("<dog>", "dti") == "dog-dti"
    assert default_trigger("<My Dog!>", "ti") == "my-dog-ti"
    assert default_trigger("<>") == "concept"
    assert concept_trigger(_concept(), "dti") == "dog-dti"
    assert concept_trigger(_concept(trigger="rex-emb"), "dti") == "rex-emb"
    assert concept_trigger(_concept(placeholder="sksdog"), "ti") == "sksdog-ti"


def test_validate_trigger_refuses_vocabulary_words(tokenizer):
    assert validate_trigger(tokenizer, _concept(), "dti") == "dog-dti"
    for word in ("dog", "backpack", "sks"):  # "backpack" is one piece (backpack</w>) without being a literal entry
        with pytest.raises(
            ValueError,
            match=rf"^concept 'dog': trigger '{word}' is a word of the model's vocabulary.*"
            rf"trigger = '{word}-emb'",
        ):
            validate_trigger(tokenizer, _concept(trigger=word), "dti")


@pytest.mark.parametrize(
    "trigger, why",
    [
        ("Dog-DTI", "lower case"),
        ("my dog", "lower case"),
        ("dog/x", "lower case"),
        ("dog.", "lower case"),
        ("-dog", "lower case"),
        ("learned_embeds", "overwrite the export's own file"),
        ("learned_embeds_2", "overwrite"),
        ("concept", "overwrite"),
        ("rescaled", "overwrite"),
    ],
)
def test_unusable_triggers_are_refused_before_training(trigger, why):
    with pytest.raises(ValueError, match=why) as err:
        validate_export_names([_concept(trigger=trigger)], "dti")
    assert "\n" not in str(err.value) and repr(trigger) in str(err.value)


def test_names_and_triggers_that_collide_are_refused():
    with pytest.raises(ValueError, match=r"'checkpoints' is the output folder's own checkpoints/ folder; rename"):
        validate_export_names([_concept("checkpoints")], "dti")
    with pytest.raises(ValueError, match=r"trigger 'x-emb' is also the trigger of concept 'a'"):
        validate_export_names([_concept("a", trigger="x-emb"), _concept("b", trigger="X-emb".lower())], "dti")
    with pytest.raises(ValueError, match=r"trigger 'b-emb' is the placeholder of concept 'b'"):
        validate_export_names([_concept("a", trigger="b-emb"), _concept("b", placeholder="b-emb")], "dti")
    # The plain and rescaled triggers are distinct, and an SDXL concept may be named learned_embeds.
    validate_export_names([_concept("learned_embeds"), _concept("b")], "ti", rescaled=True)


def test_long_names_are_refused_before_training_and_the_longest_allowed_fits_on_disk(tmp_path):
    long = "a" * 240
    with pytest.raises(
        ValueError,
        match=r"trigger made from its placeholder 'a{40}\.\.\.' is 244 bytes.*at most "
        r"229 characters",
    ):
        validate_export_names([_concept(long)], "dti")
    with pytest.raises(ValueError, match="at most 220 characters"):
        validate_export_names([_concept("a", trigger="b" * 221)], "ti", rescaled=True)
    # A long name with a short trigger is fine; so is the longest trigger, and its files really fit.
    validate_export_names([_concept(long, trigger="dog-emb")], "dti")
    longest = "t" * (NAME_MAX_BYTES - 26)
    validate_export_names([_concept("x", trigger=longest)], "dti")
    with pytest.raises(ValueError, match="too long"):
        validate_export_names([_concept("x", trigger=longest + "t")], "dti")
    for family, vectors in (("sd", [torch.randn(2, 8)]), ("sdxl", [torch.randn(2, 8), torch.randn(2, 16)])):
        written = write_concept_files(tmp_path / family, "x", "<x>", vectors, family, steps=1, trigger=longest)
        assert all(p.is_file() for p in written) and max(len(p.name) for p in written) == len(longest) + 12


def test_train_refuses_bad_names_before_loading_the_model(tmp_path):
    from dti_fast.train import TrainConfig, train

    for concept, message in (
        (_concept("checkpoints"), "checkpoints/ folder"),
        (_concept("a" * 240), "too long"),
        (_concept("dog", trigger="learned_embeds"), "overwrite"),
    ):
        cfg = TrainConfig(model=str(tmp_path / "no-such-model"), output_dir=tmp_path / "out", concepts=[concept])
        with pytest.raises(ValueError, match=message):
            train(cfg)
    assert not (tmp_path / "out").exists()


def test_train_refuses_a_vocabulary_trigger_before_any_step(eval_sd_model, tmp_path):
    from dti_fast.demo import demo_images_dir
    from dti_fast.train import TrainConfig, train

    c = Concept("dog", demo_images_dir() / "dog", "dog", trigger="dog")
    cfg = TrainConfig(
        model=str(eval_sd_model),
        output_dir=tmp_path / "out",
        concepts=[c],
        steps=1,
        batch_size=1,
        resolution=64,
        progress=False,
    )
    with pytest.raises(ValueError, match="trigger 'dog' is a word of the model's vocabulary"):
        train(cfg)
    assert not (tmp_path / "out" / "dog").exists()


def test_cli_refuses_with_exit_2_and_one_line(eval_sd_model, tmp_path, capsys):
    from dti_fast.cli import main
    from dti_fast.demo import demo_images_dir

    photos = demo_images_dir() / "dog"
    for concept, message in (
        (f"dog:{photos}:dog::dog", "trigger 'dog' is a word of the model's vocabulary"),
        (f"checkpoints:{photos}:dog", "checkpoints/ folder"),
        (f"dog:{photos}:dog:dog:Learned_Embeds", "lower case"),
    ):
        rc = main(
            [
                "train",
                "--model",
                str(eval_sd_model),
                "--output",
                str(tmp_path / "o"),
                "--concept",
                concept,
                "--steps",
                "1",
                "--batch-size",
                "1",
                "--resolution",
                "64",
                "--no-progress",
            ]
        )
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error:" in line]
        assert rc == 2 and len(errors) == 1 and message in errors[0], err


def test_cli_trigger_from_flag_and_job_file_and_the_summary(eval_sd_model, tmp_path, capsys):
    from dti_fast.cli import main
    from dti_fast.demo import demo_images_dir

    photos = demo_images_dir()
    job = tmp_path / "job.toml"
    job.write_text(
        f'[[concept]]\nname = "bag"\nimages = "{photos / "backpack"}"\ninit = "red backpack"\ntrigger = "my-bag"\n',
        encoding="utf-8",
    )
    rc = main(
        [
            "train",
            "--config",
            str(job),
            "--model",
            str(eval_sd_model),
            "--output",
            str(tmp_path / "o"),
            "--concept",
            f"dog:{photos / 'dog'}:dog::rex-emb",
            "--steps",
            "1",
            "--batch-size",
            "1",
            "--resolution",
            "64",
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    for trigger, folder, placeholder in (("my-bag", "bag", "<bag>"), ("rex-emb", "dog", "<dog>")):
        d = tmp_path / "o" / folder
        assert sorted(p.name for p in d.iterdir() if p.suffix in (".pt", ".safetensors")) == [
            "learned_embeds.safetensors",
            f"{trigger}.pt",
            f"{trigger}.safetensors",
        ]
        info = json.loads((d / "concept.json").read_text())
        assert info["trigger"] == trigger and info["clients"]["ComfyUI"]["type"] == f"embedding:{trigger}"
        assert info["clients"]["AUTOMATIC1111"]["type"] == trigger
        assert info["clients"]["InvokeAI"]["type"] == f"<{trigger}>"
        assert info["clients"]["diffusers"]["type"] == placeholder
        assert f"type embedding:{trigger}" in out and f"and type {trigger}" in out and f"type <{trigger}>" in out


def test_cli_help_names_the_trigger(capsys):
    from dti_fast.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "NAME:IMAGES_DIR:INIT[:CLASS[:TRIGGER]]" in capsys.readouterr().out


# -- files ---------------------------------------------------------------------------------------


def test_sd_files_legacy_pt_and_emb_params(tmp_path):
    table = torch.randn(1000, 8)
    v = table[3:5]  # a view into a bigger table, as the trainer's rows are
    written = write_concept_files(tmp_path, "dog", "<dog>", [v], "sd", steps=7, trigger="dog-dti")
    assert sorted(p.name for p in written) == ["dog-dti.pt", "dog-dti.safetensors", "learned_embeds.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)  # no temporary files left
    pt = tmp_path / "dog-dti.pt"
    assert not zipfile.is_zipfile(pt)  # legacy stream: no .format_version / .storage_alignment / byteorder
    data = load_torch(pt)  # weights_only=True
    assert data["name"] == "dog-dti" and data["step"] == 7 and data["string_to_token"] == {"*": 265}
    assert torch.equal(data["string_to_param"]["*"], v)
    assert pt.stat().st_size < 2000  # the two rows, not the whole table they were sliced from
    assert list(load_safetensors(tmp_path / "dog-dti.safetensors")) == ["emb_params"]
    assert torch.equal(load_safetensors(tmp_path / "dog-dti.safetensors")["emb_params"], v)
    assert torch.equal(load_safetensors(tmp_path / "learned_embeds.safetensors")["<dog>"], v)


def test_sdxl_concept_named_learned_embeds_keeps_its_diffusers_file(tmp_path):
    v1, v2 = torch.randn(2, 8), torch.randn(2, 16)
    trigger = concept_trigger(_concept("learned_embeds"), "dti")
    write_concept_files(tmp_path, "learned_embeds", "<learned_embeds>", [v1, v2], "sdxl", steps=1, trigger=trigger)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "learned_embeds-dti.safetensors",
        "learned_embeds.safetensors",
        "learned_embeds_2.safetensors",
    ]
    assert torch.equal(load_safetensors(tmp_path / "learned_embeds.safetensors")["<learned_embeds>"], v1)
    xl = load_safetensors(tmp_path / "learned_embeds-dti.safetensors")
    assert torch.equal(xl["clip_l"], v1) and torch.equal(xl["clip_g"], v2)
    with pytest.raises(ValueError, match="overwrite"):
        write_concept_files(tmp_path, "x", "<x>", [v1, v2], "sdxl", steps=1, trigger="learned_embeds")


def test_read_concept_reads_every_file_with_the_file_name_as_word(tmp_path):
    v = torch.randn(2, 8)
    write_concept_files(tmp_path / "dog", "dog", "<dog>", [v], "sd", steps=1, trigger="dog-dti")
    info = {
        "name": "dog",
        "placeholder": "<dog>",
        "class_noun": "dog",
        "family": "sd",
        "method": "dti",
        **client_info("dog-dti", "<dog>", "sd"),
    }
    (tmp_path / "dog" / "concept.json").write_text(json.dumps(info))
    folder = read_concept(tmp_path / "dog")
    assert folder.placeholder == "<dog>" and folder.trigger == "dog-dti"
    for f in ("dog-dti.pt", "dog-dti.safetensors"):
        c = read_concept(tmp_path / "dog" / f)
        assert c.placeholder == "dog-dti" and c.class_noun == "dog" and torch.equal(c.vectors[0], v)
    assert read_concept(tmp_path / "dog" / "learned_embeds.safetensors").placeholder == "<dog>"
    assert read_concept(tmp_path / "dog" / "dog-dti.pt", token="<x>").placeholder == "<x>"


def test_summary_lines_and_missing_concept_json(tmp_path):
    assert summary_lines(tmp_path) == []
    (tmp_path / "concept.json").write_text(json.dumps(client_info("dog-dti", "<dog>", "sdxl")))
    text = "\n".join(summary_lines(tmp_path))
    assert "type dog-dti" in text and "embedding:dog-dti" in text and "<dog-dti>" in text and "<dog>" in text
    assert "dog-dti.pt" not in text  # SDXL writes no .pt


def test_load_concepts_refuses_a_file_named_like_a_vocabulary_word(eval_sd_model, tmp_path):
    from dti_fast.concept_files import load_concepts
    from dti_fast.generate import load_pipeline

    pipe = load_pipeline(str(eval_sd_model), device="cpu")
    write_concept_files(tmp_path, "dog", "<dog>", [torch.randn(1, 32)], "sd", steps=1, trigger="dog")
    before = len(pipe.tokenizer)
    with pytest.raises(
        ValueError,
        match=r"the word 'dog' is already in the model's tokenizer vocabulary.*rename the "
        r"file \(e.g. dog-emb.pt\)",
    ):
        load_concepts(pipe, tmp_path / "dog.pt")
    assert len(pipe.tokenizer) == before
    assert load_concepts(pipe, read_concept(tmp_path / "dog.pt", token="<dog>")) == ["<dog>"]


def test_import_dti_fast_stays_free_of_diffusers():
    code = (
        "import sys, dti_fast; assert 'diffusers' not in sys.modules and 'transformers' not in sys.modules; "
        "f = dti_fast.load_concepts; assert 'diffusers' not in sys.modules; print(f.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "dti_fast.concept_files"

"""dti_fast.settings: one declaration per setting gives its flag, job-file key, check and fingerprint role."""

from __future__ import annotations

import argparse
import math
from dataclasses import fields
from pathlib import Path

import pytest

from dti_fast import settings as S
from dti_fast.data import Concept
from dti_fast.demo import demo_images_dir
from dti_fast.suite import SuiteConfig
from dti_fast.train import TrainConfig, validate_config
from dti_fast.train.config import read_job_file


def _cfg(tmp_path: Path, **kw) -> TrainConfig:
    concept = Concept(name="dog", images=demo_images_dir() / "dog", init="dog")
    return TrainConfig(model="m", output_dir=tmp_path / "out", concepts=[concept], **kw)


@pytest.mark.parametrize(
    "kind, text, value",
    [
        (S.POSITIVE_INT, "3", 3),
        (S.INT, "-2", -2),
        (S.POSITIVE_FLOAT, "1e-3", 1e-3),
        (S.NONNEG_FLOAT, "0", 0.0),
        (S.UNIT_INTERVAL, "0.9", 0.9),
        (S.BOOL, "false", False),
        (S.choice("a", "b"), "b", "b"),
        (S.either(S.literal("auto"), S.POSITIVE_INT), "auto", "auto"),
        (S.either(S.literal("auto"), S.POSITIVE_INT), "8", 8),
    ],
)
def test_kinds_read_flag_text(kind, text, value):
    assert kind(text, from_text=True) == value


@pytest.mark.parametrize(
    "kind, value, message",
    [
        (S.POSITIVE_INT, 0, "positive integer"),
        (S.POSITIVE_INT, 2.5, "integer"),
        (S.POSITIVE_INT, True, "number"),
        (S.POSITIVE_INT, "3", "number"),
        (S.INT, 10**20, "2\\*\\*63"),
        (S.POSITIVE_FLOAT, math.inf, "finite"),
        (S.POSITIVE_FLOAT, math.nan, "finite"),
        (S.POSITIVE_FLOAT, -1.0, "positive"),
        (S.NONNEG_FLOAT, math.inf, "finite"),
        (S.UNIT_INTERVAL, 1.0, r"\[0, 1\)"),
        (S.BOOL, "yes", "true or false"),
        (S.TEXT, 5, "string"),
        (S.PATH, 5, "path"),
        (S.PATH, "", "path"),
        (S.TEXTS, [1, 2], "list of strings"),
        (S.choice("a", "b"), "c", "one of a, b"),
    ],
)
def test_kinds_refuse_wrong_types_and_ranges(kind, value, message):
    with pytest.raises(ValueError, match=message):
        kind(value)


def test_text_that_is_not_a_number_is_named():
    with pytest.raises(ValueError, match="1e20"):
        S.INT("1e20", from_text=True)
    with pytest.raises(ValueError, match="inf"):
        S.POSITIVE_FLOAT("inf", from_text=True)


def test_every_train_setting_has_a_flag_with_help_and_its_default():
    parser = argparse.ArgumentParser()
    S.add_arguments(parser, TrainConfig)
    by_dest = {a.dest: a for a in parser._actions}
    for f in fields(TrainConfig):
        spec = S.spec(f)
        if spec is None:
            continue
        assert f.name in by_dest, f.name
        assert by_dest[f.name].help, f.name
    assert "(default 400)" in by_dest["steps"].help
    assert "(default 4)" in by_dest["batch_size"].help


def test_unset_flags_do_not_override_a_job_file(tmp_path):
    parser = argparse.ArgumentParser()
    S.add_arguments(parser, TrainConfig)
    assert S.flag_values(parser.parse_args([]), TrainConfig) == {}
    got = S.flag_values(parser.parse_args(["--steps", "7", "--no-scale-lr", "--text-cache"]), TrainConfig)
    assert got == {"steps": 7, "scale_lr": False, "text_cache": True}


def test_fingerprint_settings_are_those_that_shape_the_vectors():
    assert set(S.fingerprint_fields(TrainConfig)) == {
        "model",
        "method",
        "batch_size",
        "resolution",
        "lr",
        "scale_lr",
        "kappa",
        "beta",
        "norm_scale",
        "init",
        "weight_decay",
        "seed",
        "latent_cache",
        "optim_bits",
    }


def test_fingerprint_ignores_output_options_and_follows_the_math(tmp_path):
    a = _cfg(tmp_path)
    c = a.concepts[0]
    assert a.concept_fingerprint(c) == _cfg(tmp_path, steps=9, progress=False, keep_checkpoints=5).concept_fingerprint(
        c
    )
    assert a.concept_fingerprint(c) != _cfg(tmp_path, kappa=2e-4).concept_fingerprint(c)
    assert a.concept_fingerprint(c) != _cfg(tmp_path, latent_cache_crops=4).concept_fingerprint(c)
    assert _cfg(tmp_path, latent_cache=False).concept_fingerprint(c) == _cfg(
        tmp_path, latent_cache=False, latent_cache_crops=4
    ).concept_fingerprint(c)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"lr": math.inf}, "lr must be positive and finite"),
        ({"lr": 1e400}, "lr must be positive and finite"),
        ({"kappa": math.inf}, "kappa must be a finite number >= 0"),
        ({"kappa": math.nan}, "kappa must be"),
        ({"beta": 1.0}, "beta must be a number in"),
        ({"norm_scale": math.inf}, "norm_scale must be mean, min, max or a positive finite number"),
        ({"norm_scale": "median"}, "norm_scale must be"),
        ({"steps": 0}, "steps must be a positive integer"),
        ({"seed": 10**20}, "seed must be below"),
        ({"max_batch": "many"}, "max_batch must be"),
        ({"method": "lora"}, "method must be one of dti, ti"),
        ({"optim_bits": 16}, "optim_bits must be 32 or 8"),
        ({"validation_prompts": [1, 2]}, "validation_prompts must be a list of strings"),
        ({"device": 5}, "device must be a string"),
    ],
)
def test_python_configs_are_checked_by_the_same_schema(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        validate_config(_cfg(tmp_path, **kw))


def test_config_paths_are_normalized(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = _cfg(tmp_path)
    cfg.output_dir = "~/runs/x"
    validate_config(cfg)
    assert cfg.output_dir == tmp_path / "runs" / "x"


@pytest.mark.parametrize(
    "line, message",
    [
        ("steps = 1.5", "steps must be an integer"),
        ("lr = inf", "lr must be positive and finite"),
        ("kappa = nan", "kappa must be"),
        ("output_dir = 5", "output_dir must be a non-empty path"),
        ("validation_prompts = [1, 2]", "validation_prompts must be a list of strings"),
        ('text_cache = "sometimes"', "text_cache must be"),
    ],
)
def test_job_file_values_are_checked_with_the_key_named(tmp_path, line, message):
    from dti_fast.train import JobError

    job = tmp_path / "job.toml"
    job.write_text(line + "\n")
    with pytest.raises(JobError, match=f"job file {job}: {message}"):
        read_job_file(job)


@pytest.mark.parametrize(
    "entry, message",
    [
        ('name = "x"\nimages = 5\ninit = "dog"', "images must be a folder path"),
        ('name = "x"\nimages = "y"\ninit = 7', "init must be a string"),
        ('name = "x"\nimages = "y"\ninit = "dog"\nplaceholder = 5', "placeholder must be a string"),
        ('name = 5\nimages = "y"\ninit = "dog"', "name must be a string"),
        ('name = "x"\nimages = "y"\ninit = "dog"\nsteps = "3"', "steps must be an integer"),
    ],
)
def test_wrong_types_in_concepts_are_named(tmp_path, entry, message):
    from dti_fast.train import JobError

    job = tmp_path / "job.toml"
    job.write_text(f"[[concept]]\n{entry}\n")
    with pytest.raises(JobError, match=f"concept #1: {message}"):
        read_job_file(job)


def test_concept_table_that_is_not_a_table_is_named(tmp_path):
    from dti_fast.train import JobError

    job = tmp_path / "job.toml"
    job.write_text("concept = [1, 2]\n")
    with pytest.raises(JobError, match=r"\[\[concept\]\] tables"):
        read_job_file(job)


def test_job_file_paths_expand_home_and_model_resolves_beside_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    job = tmp_path / "job.toml"
    job.write_text(
        'model = "models/tiny"\noutput_dir = "~/x"\n[[concept]]\nname = "a"\nimages = "~/photos"\ninit = "dog"\n'
    )
    got = read_job_file(job)
    assert got["model"] == str(tmp_path / "models" / "tiny")
    assert got["output_dir"] == tmp_path / "home" / "x"
    assert got["concepts"][0].images == tmp_path / "home" / "photos"
    job.write_text('model = "org/name"\n')
    assert read_job_file(job)["model"] == "org/name"  # a hub id stays a hub id


def test_job_file_that_is_not_utf8_is_named(tmp_path):
    from dti_fast.train import JobError

    job = tmp_path / "job.toml"
    job.write_bytes("steps = 3\n".encode("utf-16"))
    with pytest.raises(JobError, match=f"job file {job} is not UTF-8"):
        read_job_file(job)


def test_suite_settings_share_the_schema(tmp_path):
    parser = argparse.ArgumentParser()
    S.add_arguments(parser, SuiteConfig)
    args = parser.parse_args(["--seeds", "0-2", "--methods", "dti,ti", "--slerp-pair", "dog,cat2", "--max-batch", "0"])
    cfg = SuiteConfig(**S.flag_values(args, SuiteConfig))
    assert cfg.seeds == [0, 1, 2] and cfg.methods == ["dti", "ti"] and cfg.slerp_pair == ("dog", "cat2")
    cfg.model, cfg.data_dir = "m", tmp_path
    cfg.validate()
    assert cfg.max_batch is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--methods", "dreambooth"])

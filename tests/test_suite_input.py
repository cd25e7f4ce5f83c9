"""`dti-fast suite` on bad input: every flag and JSON field is checked before the first stage.

Each refusal goes through the real command (``dti_fast.cli.main``): exit status 2, one line that
names the flag or the file and key, and nothing trained (no ``train/`` folder, no state file).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from dti_fast.demo import demo_images_dir

pytestmark = pytest.mark.usefixtures("one_thread")


def _suite(capsys, out: Path, *args: str) -> tuple[int, str]:
    from dti_fast.cli import main

    rc = main(["suite", "--output", str(out), "--no-progress", *args])
    return rc, capsys.readouterr().err


def _base(model, tiny_metrics, **metric_models) -> list[str]:
    """A small run on the tiny SD model and the shipped photos, with the tiny metric models unless replaced."""
    metric = {k: str(v) for k, v in tiny_metrics.items()} | {k: str(v) for k, v in metric_models.items()}
    return [
        "--model",
        str(model),
        "--data",
        str(demo_images_dir()),
        "--methods",
        "dti",
        "--steps",
        "2",
        "--batch-size",
        "1",
        "--resolution",
        "64",
        "--max-prompts",
        "1",
        "--seeds",
        "0",
        "--inference-steps",
        "2",
        "--dino-model",
        metric["dino"],
        "--siglip-model",
        metric["siglip"],
        "--clip-model",
        metric["clip"],
    ]


def _refused(rc: int, err: str, out: Path, *words: str) -> None:
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, (w, err)
    assert not (out / "train").exists() and not (out / "suite_state.json").exists(), sorted(out.rglob("*"))


# -- F1: --subject / --style ---------------------------------------------------------------------


def test_subject_and_style_flags_are_repeatable_and_take_comma_lists(tmp_path):
    import dti_fast.settings as S
    from dti_fast.cli import build_parser
    from dti_fast.suite import SuiteConfig

    args = build_parser().parse_args(
        ["suite", "--subject", "dog", "--subject", "cat2, clock", "--style", "pointillism", "--style", "a,b"]
    )
    cfg = SuiteConfig(**S.flag_values(args, SuiteConfig))
    cfg.model, cfg.data_dir, cfg.style_data = "m", tmp_path, tmp_path
    cfg.validate()
    assert cfg.subjects == ["dog", "cat2", "clock"] and cfg.styles == ["pointillism", "a", "b"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["suite", "--subject", "dog,,cat2"])


def test_one_subject_and_one_style_chosen_on_the_command_line_run_alone(eval_sd_model, tiny_metrics, tmp_path, capsys):
    out = tmp_path / "one"
    args = _base(eval_sd_model, tiny_metrics) + ["--quick", "--subject", "dog", "--style", "pointillism"]
    rc, err = _suite(capsys, out, *args, "--metrics", "image")
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["subjects"]] == ["dog"]
    assert [s["name"] for s in report["styles"]] == ["pointillism"]
    assert report["images"] == {"dti": 1}
    trained = sorted(p.name for p in (out / "train" / "dti").iterdir() if (p / "concept.json").is_file())
    assert trained == ["dog", "pointillism"]


# -- F2: metric models, --slerp-pair, --masks: refused before the first stage --------------------


def test_a_metric_model_folder_of_another_kind_is_refused_before_training(
    eval_sd_model, tiny_metrics, tmp_path, capsys
):
    out = tmp_path / "o"
    rc, err = _suite(capsys, out, *_base(eval_sd_model, tiny_metrics, dino=tiny_metrics["clip"]))
    _refused(rc, err, out, "--dino-model", "CLIPModel", "pass a DINOv2 model")
    rc, err = _suite(capsys, out, *_base(eval_sd_model, tiny_metrics, clip=tiny_metrics["dino"]))
    _refused(rc, err, out, "--clip-model", "not a CLIP model", "pass e.g. openai/clip-vit-base-patch32")
    rc, err = _suite(capsys, out, *_base(eval_sd_model, tiny_metrics, siglip=tiny_metrics["clip"]))
    _refused(rc, err, out, "--siglip-model", "not a SigLIP model")


def test_a_metric_model_that_is_a_file_or_an_incomplete_folder_is_refused_before_training(
    eval_sd_model, tiny_metrics, tmp_path, capsys
):
    out = tmp_path / "o"
    afile = tmp_path / "clip.txt"
    afile.write_text("not a model")
    rc, err = _suite(capsys, out, *_base(eval_sd_model, tiny_metrics, clip=afile))
    _refused(rc, err, out, "--clip-model", "is a file", "pass a model folder or a hub id")
    half = tmp_path / "half-dino"
    shutil.copytree(tiny_metrics["dino"], half)
    (half / "model.safetensors").unlink()
    rc, err = _suite(capsys, out, *_base(eval_sd_model, tiny_metrics, dino=half))
    _refused(rc, err, out, "--dino-model", "no weights", "save_pretrained")
    cut = tmp_path / "cut-siglip"  # a download cut short: the header promises more bytes than the file has
    shutil.copytree(tiny_metrics["siglip"], cut)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    rc, err = _suite(capsys, out, *_base(eval_sd_model, tiny_metrics, siglip=cut))
    _refused(rc, err, out, "--siglip-model", "model.safetensors is not a readable safetensors file", "re-save")
    bare = tmp_path / "bare"
    bare.mkdir()
    rc, err = _suite(capsys, out, *_base(eval_sd_model, tiny_metrics, siglip=bare))
    _refused(rc, err, out, "--siglip-model", "has no config.json")


def test_an_uncached_hub_id_offline_is_refused_before_training(
    eval_sd_model, tiny_metrics, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "o"
    rc, err = _suite(capsys, out, *_base(eval_sd_model, tiny_metrics, dino="dti-fast-tests/no-such-dino"))
    _refused(
        rc, err, out, "--dino-model", "dti-fast-tests/no-such-dino", "not in the Hugging Face cache", "hf download"
    )


def test_a_metric_model_of_an_unused_metric_is_not_checked(eval_sd_model, tiny_metrics, tmp_path):
    from dti_fast.suite import check_metric_models

    check_metric_models(tiny_metrics["dino"], None, tmp_path / "nothing-here", ["image"])
    with pytest.raises(FileNotFoundError, match="--clip-model"):
        check_metric_models(tiny_metrics["dino"], None, tmp_path / "nothing-here", ["image", "clip_i"])


def test_a_bad_slerp_pair_is_refused_before_training(eval_sd_model, tiny_metrics, tmp_path, capsys):
    out = tmp_path / "o"
    base = _base(eval_sd_model, tiny_metrics)
    for pair in ("dog,zebra", "dog,dog"):
        rc, err = _suite(capsys, out, *base, "--slerp-pair", pair)
        _refused(rc, err, out, f"--slerp-pair {pair}", "give two different subjects this run trains")
    rc, err = _suite(capsys, out, *base, "--subject", "dog", "--subject", "cat2", "--slerp-pair", "dog,clock")
    _refused(rc, err, out, "--slerp-pair dog,clock", "(dog, cat2)")
    # 'red backpack' gives 2 vectors, 'dog' 1: slerp cannot pair them.
    rc, err = _suite(capsys, out, *base, "--slerp-pair", "dog,backpack")
    _refused(rc, err, out, "--slerp-pair dog,backpack", "gives 2", "same count")


def test_masks_missing_for_a_reference_photo_are_refused_before_training(eval_sd_model, tiny_metrics, tmp_path, capsys):
    masks = tmp_path / "masks"
    (masks / "dog").mkdir(parents=True)
    out = tmp_path / "o"
    rc, err = _suite(capsys, out, *_base(eval_sd_model, tiny_metrics), "--subject", "dog", "--masks", str(masks))
    _refused(rc, err, out, "no mask for reference", "run without masks")


# -- F8: the JSON inputs, field by field ----------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (
            {"prompt_sets": {"simple": {"object_prompts": [1, 2], "live_prompts": ["a {}"]}}},
            ["object_prompts[0]", "the number 1"],
        ),
        (
            {"prompt_sets": {"simple": {"object_prompts": "a {} here", "live_prompts": ["a {}"]}}},
            ["object_prompts must be a list", "a string"],
        ),
        (
            {"prompt_sets": {"simple": {"object_prompts": ["a {}"], "live_prompts": ["a {}", None]}}},
            ["live_prompts[1]", "null"],
        ),
        (
            {"prompt_sets": {"simple": {"object_prompts": ["a {}"], "live_prompts": [""]}}},
            ["live_prompts[0]", "non-empty"],
        ),
        ({"prompt_sets": ["simple"]}, ['"prompt_sets" must be an object', "a list"]),
        ({"prompt_sets": {"simple": "a {}"}}, ["prompt set 'simple' must be an object", "a string"]),
    ],
)
def test_prompts_file_fields_are_type_checked(eval_sd_model, tiny_metrics, tmp_path, capsys, content, words):
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(content))
    out = tmp_path / "o"
    rc, err = _suite(capsys, out, *_base(eval_sd_model, tiny_metrics), "--prompts-file", str(prompts))
    _refused(rc, err, out, str(prompts), "fix the file", *words)


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ({"class": 5, "initialization": "dog"}, ['"class" must be a non-empty string', "5"]),
        ({"class": "dog", "initialization": ["dog"]}, ['"initialization" must be a non-empty string']),
        ({"class": "dog", "initialization": "dog", "kind": "alien"}, ['"kind" must be "live" or "object"']),
        ("dog", ["must be an object", "a string"]),
    ],
)
def test_subjects_file_fields_are_type_checked(eval_sd_model, tiny_metrics, tmp_path, capsys, entry, words):
    subjects = tmp_path / "s.json"
    subjects.write_text(json.dumps({"subjects": {"dog": entry}}))
    out = tmp_path / "o"
    rc, err = _suite(capsys, out, *_base(eval_sd_model, tiny_metrics), "--subjects-file", str(subjects))
    _refused(rc, err, out, "subject 'dog'", str(subjects), "fix the file", *words)


def test_a_subject_name_that_is_no_folder_name_is_refused(tmp_path):
    from dti_fast.suite import load_subjects

    data = tmp_path / "data"
    (data / "dog").mkdir(parents=True)
    subjects = tmp_path / "s.json"
    subjects.write_text(json.dumps({"subjects": {"../data/dog": {"class": "dog", "initialization": "dog"}}}))
    with pytest.raises(ValueError, match="the name must start with a letter or digit.*rename it in the file"):
        load_subjects(data, subjects, names=["../data/dog"])


def test_styles_file_fields_are_type_checked(tmp_path):
    from dti_fast.suite import load_styles

    (tmp_path / "ink").mkdir()
    (tmp_path / "styles.json").write_text(json.dumps({"styles": {"ink": {"class": ["ink"], "initialization": "ink"}}}))
    with pytest.raises(ValueError, match=r"style 'ink' in .*styles.json: \"class\" must be a non-empty string"):
        load_styles(tmp_path)


def test_a_model_index_that_is_a_json_list_is_refused_before_any_stage(eval_sd_model, tiny_metrics, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(eval_sd_model, model)
    (model / "model_index.json").write_text("[]")
    out = tmp_path / "o"
    rc, err = _suite(capsys, out, *_base(model, tiny_metrics))
    _refused(rc, err, out, "model_index.json")


def test_damaged_state_and_cache_files_of_the_suite_are_read_as_absent(tmp_path):
    from types import SimpleNamespace

    from dti_fast.suite import STATE_FILE, _local_index, _norm_lists, _State

    for text in ("[]", '{"version": 1, "stages": []}', '{"version": 1, "stages": {"train:dti": 5}}', "{"):
        (tmp_path / STATE_FILE).write_text(text)
        state = _State(tmp_path, force=False)
        assert not state.done("train:dti", "x") and state.previous("train:dti") is None
    (tmp_path / "model_index.json").write_text("[1]")
    assert _local_index(SimpleNamespace(local=True, source=str(tmp_path))) == {}
    assert _norm_lists([[1.0, 2.0]]) and not _norm_lists([]) and not _norm_lists({"a": 1}) and not _norm_lists([["x"]])


# -- F3: unbounded counts -------------------------------------------------------------------------


def test_a_huge_seed_range_is_refused_as_the_flags_are_parsed(tmp_path, capsys):
    from dti_fast.cli import main

    out = tmp_path / "o"
    for bad, words in (
        ("0-100000000", "more than 10000 seeds"),
        ("1,1", "given more than once"),
        ("3-0", "runs backwards"),
        (str(2**64), "outside 0 to 2**63 - 1"),
    ):
        t0 = time.perf_counter()
        with pytest.raises(SystemExit) as stop:
            main(["suite", "--output", str(out), "--model", "m", "--data", str(tmp_path), "--seeds", bad])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and "argument --seeds" in err and words in err, err
        assert time.perf_counter() - t0 < 5 and not out.exists()


def test_a_run_of_too_many_images_is_refused_before_any_work(eval_sd_model, tiny_metrics, tmp_path, capsys):
    out = tmp_path / "o"
    args = _base(eval_sd_model, tiny_metrics)
    args[args.index("--max-prompts") + 1] = "41"
    args[args.index("--seeds") + 1] = "0-9999"
    t0 = time.perf_counter()
    rc, err = _suite(capsys, out, *args)
    _refused(rc, err, out, "would generate 1640005 images", "more than 100000", "give fewer --seeds")
    assert time.perf_counter() - t0 < 30


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [("--slerp-steps", "5000", "at most 1001 images"), ("--inference-steps", "5000", "more than 1000")],
)
def test_huge_strip_and_sampling_step_counts_are_refused_before_any_work(
    eval_sd_model, tiny_metrics, tmp_path, capsys, flag, value, words
):
    out = tmp_path / "o"
    rc, err = _suite(capsys, out, *_base(eval_sd_model, tiny_metrics), flag, value)
    _refused(rc, err, out, f"{flag} {value}", words)


# -- other settings that failed only at a later stage ---------------------------------------------


@pytest.mark.parametrize("flag", ["--guidance", "--max-batch"])
def test_a_negative_guidance_or_max_batch_is_refused_as_the_flags_are_parsed(tmp_path, capsys, flag):
    """generate refuses a negative guidance, but in the suite only after every method trained; a negative
    --max-batch was silently read as --batch-size."""
    from dti_fast.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["suite", "--output", str(tmp_path / "o"), "--model", "m", flag, "-5"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"argument {flag}" in err and ">= 0" in err, err


def test_a_scheduler_a_flow_model_cannot_use_is_refused_before_training(tiny_metrics, tmp_path, capsys):
    from dti_fast.testing.tiny_flow import make_tiny_flow_model

    sana = make_tiny_flow_model(tmp_path / "sana", "sana")
    capsys.readouterr()  # the builder's progress bars
    out = tmp_path / "o"
    rc, err = _suite(capsys, out, *_base(sana, tiny_metrics), "--scheduler", "ddim")
    _refused(rc, err, out, "--scheduler ddim", "flow-matching", "use auto or model")


def test_an_output_folder_under_a_file_is_refused_naming_the_flag(eval_sd_model, tiny_metrics, tmp_path, capsys):
    afile = tmp_path / "afile.txt"
    afile.write_text("mine")
    rc, err = _suite(capsys, afile / "run", *_base(eval_sd_model, tiny_metrics))
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "--output" in err and "which is a file" in err, err
    assert afile.read_text() == "mine"

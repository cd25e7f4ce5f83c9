"""The benchmark runner: a reduced --quick run end to end, resuming, the report, input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dti_fast.demo import demo_images_dir
from dti_fast.suite import SuiteConfig, load_subjects, prompt_sets, run_suite

STAGES = [
    "train:dti",
    "train:ti",
    "generate:dti",
    "generate:ti",
    "generate:ti-rescaled",
    "score:dti",
    "score:ti",
    "score:ti-rescaled",
    "slerp:dti",
    "slerp:ti",
]


def _reduced(out: Path, eval_sd_model, tiny_metrics, **kw) -> SuiteConfig:
    """--quick, made smaller: two subjects, 2 steps, 1 prompt, 2 denoising steps, a 3-image strip."""
    base = dict(
        output_dir=out,
        quick=True,
        model=str(eval_sd_model),
        subjects=["cat2", "dog"],
        steps=2,
        max_prompts=1,
        inference_steps=2,
        slerp_steps=3,
        dino_model=str(tiny_metrics["dino"]),
        siglip_model=str(tiny_metrics["siglip"]),
        clip_model=str(tiny_metrics["clip"]),
        progress=False,
    )
    base.update(kw)
    return SuiteConfig(**base)


@pytest.fixture(scope="module")
def suite_run(eval_sd_model, tiny_metrics, tmp_path_factory):
    out = tmp_path_factory.mktemp("suite") / "run"
    first = run_suite(_reduced(out, eval_sd_model, tiny_metrics))
    return out, first


def test_reduced_quick_suite_runs_every_stage_and_writes_the_report(suite_run):
    out, result = suite_run
    assert result.ran == STAGES and result.skipped == []
    report = json.loads(result.report_json.read_text())
    assert report["smoke_test"] and report["quick"] and all(report["random_weight_metric_models"].values())
    assert set(report["table"]) == {"dti", "ti", "ti-rescaled"}
    for row in report["table"].values():
        assert set(row) == {"image", "text", "clip_i", "clip_t"}
        assert all(isinstance(v, float) for v in row.values())
    assert set(report["per_subject"]["dti"]) == {"cat2", "dog"}
    # cats and dogs get the live prompts; 1 prompt x 1 seed each.
    assert report["images"] == {"dti": 2, "ti": 2, "ti-rescaled": 2}
    assert report["settings"]["resolution"] == 64 and report["settings"]["steps"] == 2
    # DTI at m*, TI-rescaled at m*, TI free.
    m_star = report["vocab_scale"][0]
    for subject in ("cat2", "dog"):
        assert report["norms"]["dti"][subject][0][0] == pytest.approx(m_star, rel=1e-5)
        assert report["norms"]["ti-rescaled"][subject][0][0] == pytest.approx(m_star, rel=1e-5)
        assert report["norms"]["ti"][subject][0][0] != pytest.approx(m_star, rel=1e-3)
    md = result.report_md.read_text()
    assert "Smoke test" in md and "RANDOM-WEIGHT" in md
    assert "| Method | Image (DINOv2) | Text (SigLIP) | CLIP-I | CLIP-T | images |" in md
    for label in ("| DTI |", "| TI |", "| TI-rescaled |", "## Appendix: per subject", "| cat2 |", "| dog |"):
        assert label in md, label
    for rel in list(report["plots"].values()) + [report["strips"]["dti"]["slerp"], report["strips"]["ti"]["all"]]:
        assert (out / rel).is_file() and f"]({rel})" in md, rel
    assert {"tradeoff", "norms_encoder1"} <= set(report["plots"])
    # One training job per method holds every subject.
    assert sorted(p.name for p in (out / "train" / "dti").iterdir() if (p / "concept.json").is_file()) == [
        "cat2",
        "dog",
    ]
    assert (out / "train" / "ti" / "dog" / "rescaled" / "learned_embeds.safetensors").is_file()


def test_rerun_skips_finished_work_and_a_changed_setting_redoes_only_what_depends_on_it(
    suite_run, eval_sd_model, tiny_metrics
):
    out, _ = suite_run
    image = out / "images" / "dti" / "dog" / "p000_s0.png"
    mtime = image.stat().st_mtime_ns
    again = run_suite(_reduced(out, eval_sd_model, tiny_metrics))
    assert again.ran == [] and again.skipped == STAGES
    assert image.stat().st_mtime_ns == mtime
    changed = run_suite(_reduced(out, eval_sd_model, tiny_metrics, inference_steps=3, methods=["dti"]))
    assert changed.ran == ["generate:dti", "score:dti", "slerp:dti"]
    assert changed.skipped == ["train:dti"]
    assert image.stat().st_mtime_ns != mtime
    assert set(json.loads(changed.report_json.read_text())["table"]) == {"dti"}


def test_an_interrupted_run_resumes_after_the_last_finished_stage(eval_sd_model, tiny_metrics, tmp_path, monkeypatch):
    import dti_fast.evaluate as evaluate

    def boom(*a, **k):
        raise RuntimeError("killed while scoring")

    monkeypatch.setattr(evaluate, "evaluate_generated", boom)
    cfg = dict(methods=["dti"], metrics=["image"])
    with pytest.raises(RuntimeError, match="killed"):
        run_suite(_reduced(tmp_path / "r", eval_sd_model, tiny_metrics, **cfg))
    state = json.loads((tmp_path / "r" / "suite_state.json").read_text())["stages"]
    assert state["train:dti"]["done"] and state["generate:dti"]["done"] and not state["score:dti"]["done"]
    monkeypatch.undo()
    result = run_suite(_reduced(tmp_path / "r", eval_sd_model, tiny_metrics, **cfg))
    assert result.skipped == ["train:dti", "generate:dti"] and result.ran == ["score:dti", "slerp:dti"]
    assert "| Method | Image (DINOv2) | images |" in result.report_md.read_text()


def test_subjects_and_prompts(tmp_path):
    subjects = load_subjects(demo_images_dir())
    assert [s.name for s in subjects] == ["backpack", "cat2", "clock", "dog"]
    by = {s.name: s for s in subjects}
    assert by["cat2"].live and by["dog"].live and not by["clock"].live
    assert by["backpack"].init == "red backpack" and by["clock"].class_noun == "clock"
    sets = prompt_sets()
    assert len(sets["object"]) == 41 and len(sets["live"]) == 41
    assert any("wearing" in p for p in sets["live"]) and not any("wearing" in p for p in sets["object"])
    with pytest.raises(ValueError, match="not in .*dreambooth_subjects.json"):
        load_subjects(demo_images_dir(), names=["unicorn"])
    with pytest.raises(FileNotFoundError, match="data folder .* does not exist"):
        load_subjects(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="none of the 30 subjects"):
        load_subjects(tmp_path / "empty")
    with pytest.raises(ValueError, match="prompt set 'fancy'"):
        prompt_sets(prompt_set="fancy")


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="give --model"):
        run_suite(SuiteConfig(output_dir=tmp_path, data_dir=demo_images_dir()))
    with pytest.raises(ValueError, match="methods must be"):
        run_suite(SuiteConfig(output_dir=tmp_path, model="m", data_dir=demo_images_dir(), methods=["dreambooth"]))


def test_cli_suite_flags_are_documented_and_errors_are_one_line(capsys, tmp_path):
    from dti_fast.cli import build_parser, main

    parser = build_parser()
    suite = parser._subparsers._group_actions[0].choices["suite"]
    for action in suite._actions:
        assert action.help, action.option_strings
    text = suite.format_help()
    for flag in ("--quick", "--methods", "--masks", "--siglip-model", "--max-prompts", "--seeds", "--force"):
        assert flag in text
    rc = main(["suite", "--output", str(tmp_path / "o"), "--data", str(tmp_path / "missing"), "--model", "x/y"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "does not exist" in err


@pytest.mark.slow
def test_quick_mode_end_to_end_through_the_command(tmp_path, monkeypatch, capsys):
    """`dti-fast suite --quick` as shipped: tiny SD model and tiny metric models built into the cache."""
    from dti_fast.cli import main

    monkeypatch.setenv("DTI_FAST_CACHE", str(tmp_path / "cache"))
    rc = main(["suite", "--quick", "--output", str(tmp_path / "q"), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "ti-rescaled" in out and "report:" in out
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    assert report["settings"]["steps"] == 20 and report["settings"]["resolution"] == 64
    assert [s["name"] for s in report["subjects"]] == ["backpack", "cat2", "clock", "dog"]
    assert report["images"] == {"dti": 12, "ti": 12, "ti-rescaled": 12}  # 4 subjects x 3 prompts x 1 seed
    assert report["tiny_diffusion_model"] and all(report["random_weight_metric_models"].values())
    assert (tmp_path / "cache" / "tiny-metrics-v1" / "siglip" / "README.txt").is_file()

"""The benchmark runner: a reduced --quick run end to end, resuming, the report, input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dti_fast.demo import demo_images_dir
from dti_fast.suite import SuiteConfig, load_styles, load_subjects, prompt_sets, run_suite, style_prompts

STAGES = [
    "train:dti",
    "train:ti",
    "generate:dti",
    "generate:ti",
    "generate:ti-rescaled",
    "score:dti",
    "score:ti",
    "score:ti-rescaled",
    "score-style:dti",
    "score-style:ti",
    "score-style:ti-rescaled",
    "slerp:dti",
    "slerp:ti",
]


def _reduced(out: Path, eval_sd_model, tiny_metrics, **kw) -> SuiteConfig:
    """--quick, made smaller: two subjects and one style, 2 steps, 1 prompt, 2 denoising steps, a 3-image strip."""
    base = dict(
        output_dir=out,
        quick=True,
        model=str(eval_sd_model),
        subjects=["cat2", "dog"],
        styles=["pointillism"],
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
    # One training job per method holds every subject and style.
    assert sorted(p.name for p in (out / "train" / "dti").iterdir() if (p / "concept.json").is_file()) == [
        "cat2",
        "dog",
        "pointillism",
    ]
    assert (out / "train" / "ti" / "dog" / "rescaled" / "learned_embeds.safetensors").is_file()


def test_style_concepts_train_with_style_templates_and_are_scored_against_the_style_images(suite_run, tiny_metrics):
    from PIL import Image

    from dti_fast.evaluate import Evaluator, load_references
    from dti_fast.testing import tiny_styles_path

    out, result = suite_run
    report = json.loads(result.report_json.read_text())
    # The object table holds the subjects only; the style has its own table with Content.
    assert set(report["per_subject"]["dti"]) == {"cat2", "dog"}
    assert [s["name"] for s in report["styles"]] == ["pointillism"]
    assert report["style_metrics"] == ["image", "text", "content", "clip_i", "clip_t"]
    assert set(report["style_table"]) == {"dti", "ti", "ti-rescaled"}
    assert result.style_table == report["style_table"]
    for row in report["style_table"].values():
        assert all(isinstance(v, float) for v in row.values()), row
    assert report["style_images"] == {"dti": 1, "ti": 1, "ti-rescaled": 1}
    info = json.loads((out / "train" / "dti" / "pointillism" / "concept.json").read_text())
    assert info["kind"] == "style" and info["class_noun"] == "pointillism painting"
    assert report["norms"]["dti"]["pointillism"][0][0] == pytest.approx(report["vocab_scale"][0], rel=1e-5)
    # The scores are the metric models' own, by hand: DINOv2 against the style images, SigLIP of the
    # prompt with the class words and of the subject alone.
    scored = json.loads((out / "scores" / "dti-style.json").read_text())
    (row,) = scored["per_image"]
    prompt, content = next(iter(style_prompts().items()))
    assert row["prompt"] == prompt and row["scored_text"] == prompt.replace("{}", "pointillism painting")
    assert row["content_text"] == content
    ev = Evaluator(dino=tiny_metrics["dino"], siglip=tiny_metrics["siglip"], clip=tiny_metrics["clip"], device="cpu")
    image = Image.open(out / "images" / "dti" / row["file"]).convert("RGB")
    refs = load_references(tiny_styles_path() / "pointillism")
    by_hand = ev.score([image], [row["scored_text"]], refs, content=[content])
    for k in ("image", "text", "content", "clip_i", "clip_t"):
        assert row[k] == pytest.approx(by_hand[k][0], rel=1e-5, abs=1e-6), k
    assert row["content"] != pytest.approx(row["text"], rel=1e-6)  # a different text was scored
    md = result.report_md.read_text()
    assert "## Style concepts" in md and "| Method | Style (DINOv2) | Text (SigLIP) | Content (SigLIP) |" in md
    assert "| pointillism |" in md


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
    assert changed.ran == ["generate:dti", "score:dti", "score-style:dti", "slerp:dti"]
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
    assert result.skipped == ["train:dti", "generate:dti"]
    assert result.ran == ["score:dti", "score-style:dti", "slerp:dti"]
    assert "| Method | Image (DINOv2) | images |" in result.report_md.read_text()


def test_crossinit_is_a_method_of_its_own(eval_sd_model, tiny_metrics, tmp_path):
    """dti-xinit trains a job of its own, DTI started from CrossInit: the same norm m*, another direction."""
    import torch

    from dti_fast.concept_files import read_concept

    cfg = dict(methods=["dti", "dti-xinit"], metrics=["image"], subjects=["dog"], styles=None)
    result = run_suite(_reduced(tmp_path / "x", eval_sd_model, tiny_metrics, **cfg))
    assert "train:dti" in result.ran and "train:dti-xinit" in result.ran
    plain = read_concept(tmp_path / "x" / "train" / "dti" / "dog").vectors[0].float()
    xinit = read_concept(tmp_path / "x" / "train" / "dti-xinit" / "dog").vectors[0].float()
    assert torch.allclose(plain.norm(dim=-1), xinit.norm(dim=-1), rtol=1e-3)
    cos = torch.nn.functional.cosine_similarity(plain, xinit, dim=-1)
    assert (cos < 0.99).all(), cos  # after 2 steps each is still near its own start
    assert "| DTI + CrossInit |" in result.report_md.read_text()


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


def test_style_prompts_and_style_lists(tmp_path):
    from dti_fast.testing import tiny_styles_path

    prompts = style_prompts()
    assert len(prompts) == 40 and len(set(prompts.values())) == 40
    for prompt, content in prompts.items():
        assert prompt == f"{content} in {{}} style"
    styles = load_styles(tiny_styles_path())
    assert [(s.name, s.style, s.live) for s in styles] == [("pointillism", True, False), ("stained_glass", True, False)]
    assert styles[1].init == "stained glass" and styles[0].class_noun == "pointillism painting"
    with pytest.raises(FileNotFoundError, match="style folder .* does not exist"):
        load_styles(tmp_path / "none")
    (tmp_path / "s").mkdir()
    with pytest.raises(FileNotFoundError, match="styles file .*styles.json does not exist"):
        load_styles(tmp_path / "s")
    with pytest.raises(ValueError, match="style\\(s\\) cubism are not in"):
        load_styles(tiny_styles_path(), names=["cubism"])
    (tmp_path / "s" / "styles.json").write_text(
        '{"styles": {"ink": {"class": "ink drawing", "initialization": "ink"}}}'
    )
    with pytest.raises(FileNotFoundError, match="each style of"):
        load_styles(tmp_path / "s")
    bad = tmp_path / "p.json"
    bad.write_text('{"template": "a {} painting", "subjects": ["a cat"]}')
    with pytest.raises(ValueError, match='needs a "template" with \\{subject\\}'):
        style_prompts(bad)


def test_an_output_folder_holding_other_files_is_refused_before_any_work_and_left_alone(
    eval_sd_model, tiny_metrics, tmp_path
):
    mine = tmp_path / "mine" / "train" / "dti" / "notes.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("mine")
    with pytest.raises(ValueError, match="not a suite's output"):
        run_suite(_reduced(tmp_path / "mine", eval_sd_model, tiny_metrics, force=True))
    assert mine.read_text() == "mine" and not (tmp_path / "mine" / "suite_config.json").exists()


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="give --model"):
        run_suite(SuiteConfig(output_dir=tmp_path, data_dir=demo_images_dir()))
    with pytest.raises(ValueError, match="methods must be"):
        run_suite(SuiteConfig(output_dir=tmp_path, model="m", data_dir=demo_images_dir(), methods=["dreambooth"]))
    with pytest.raises(ValueError, match="need --style-data"):
        run_suite(SuiteConfig(output_dir=tmp_path, model="m", data_dir=demo_images_dir(), styles=["ink"]))


def test_cli_suite_flags_are_documented_and_errors_are_one_line(capsys, tmp_path):
    from dti_fast.cli import build_parser, main

    parser = build_parser()
    suite = parser._subparsers._group_actions[0].choices["suite"]
    for action in suite._actions:
        assert action.help, action.option_strings
    text = suite.format_help()
    for flag in (
        "--quick",
        "--methods",
        "--masks",
        "--siglip-model",
        "--max-prompts",
        "--seeds",
        "--force",
        "--style-data",
    ):
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
    assert [s["name"] for s in report["styles"]] == ["pointillism", "stained_glass"]
    assert report["style_images"] == {"dti": 6, "ti": 6, "ti-rescaled": 6}  # 2 styles x 3 prompts x 1 seed
    assert report["tiny_diffusion_model"] and all(report["random_weight_metric_models"].values())
    assert (tmp_path / "cache" / "tiny-metrics-v1" / "siglip" / "README.txt").is_file()


def test_a_damaged_output_of_a_finished_stage_is_made_again_not_read(eval_sd_model, tiny_metrics, tmp_path):
    cfg = dict(methods=["dti"], metrics=["image"])
    run_suite(_reduced(tmp_path / "r", eval_sd_model, tiny_metrics, **cfg))
    scores = tmp_path / "r" / "scores" / "dti.json"
    manifest = tmp_path / "r" / "images" / "dti" / "images.json"
    good = json.loads(scores.read_text())
    scores.write_text(scores.read_text()[:40])  # cut short, as a failing disk leaves a file
    manifest.write_text("[]")
    again = run_suite(_reduced(tmp_path / "r", eval_sd_model, tiny_metrics, **cfg))
    # the damaged stages run again; what did not read them (seeded images come out the same) stays done
    assert again.ran == ["generate:dti", "score:dti"]
    assert again.skipped == ["train:dti", "score-style:dti", "slerp:dti"]
    assert json.loads(scores.read_text())["mean"] == good["mean"]  # the same images, scored again
    assert isinstance(json.loads(manifest.read_text())["records"], list)

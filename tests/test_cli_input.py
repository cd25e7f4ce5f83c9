"""Bad input to generate, interpolate, make-tiny-model and world gate: one line naming the input and
the fix, before any model loads; what a user already has is never written over.

Each refusal runs the real command (``dti_fast.cli.main``) with ``--model`` pointing at a folder that
does not exist where the check must come before the model loads: the message seen is then the
check's, not the model's.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _shared import small_tmpfs

from dti_fast import settings as S


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Commands run in this process set torch's thread count (world gate, the toy suite): restored after,
    so that later tests comparing this process's arithmetic with a subprocess's see the usual count."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run(argv: list[str], capsys) -> tuple[int, str]:
    from dti_fast.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:  # argparse's refusals
        code = stop.code
    err = capsys.readouterr().err
    return code, err


def last_line(err: str) -> str:
    return err.strip().splitlines()[-1] if err.strip() else ""


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--steps", "x"], "dti-fast train: error: argument --steps: must be a positive integer, got 'x'"),
        (["world", "build-base", "--ema", "2"], "dti-fast world build-base: error: argument --ema: must be a number"),
        (["make-tiny-model"], "dti-fast make-tiny-model: error: the following arguments are required: dir"),
        (["train", "--no-such-flag"], "dti-fast: error: unrecognized arguments: --no-such-flag"),
        (["bogus"], "dti-fast: error: argument command: invalid choice: 'bogus'"),
    ],
)
def test_a_bad_flag_is_refused_in_one_line_without_the_usage_block(argv, message, capsys):
    code, err = run(argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and "usage:" not in err, err
    assert err.startswith(message) and err.rstrip().endswith("--help)"), err


# ---------------------------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [("0-3", [0, 1, 2, 3]), ("0,2-4", [0, 2, 3, 4]), ("7", [7]), (" 1 , 2 ", [1, 2]), ("0-9999", list(range(10000)))],
)
def test_seed_lists_read_as_written(text, expected):
    assert S.SEEDS(text, from_text=True) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("0-100000000", "gives more than 10000 seeds"),  # measured before it is expanded: no 800 MB list
        ("0-9999,5", "gives more than 10000 seeds"),
        ("1,1", "seed 1 is given more than once"),
        ("0-3,2", "seed 2 is given more than once"),
        ("-1", "outside 0 to 2**63 - 1"),
        (str(2**64), "outside 0 to 2**63 - 1"),
        ("5-2", "runs backwards"),
        ("a", "must be seeds like"),
        (",", "at least one seed"),
    ],
)
def test_bad_seed_lists_are_refused_with_the_reason(text, message):
    with pytest.raises(ValueError, match=message.replace("*", r"\*")):
        S.SEEDS(text, from_text=True)


# ---------------------------------------------------------------------------------------------
# generate: refused before the model loads
# ---------------------------------------------------------------------------------------------


def concept_dir(trained_sd) -> Path:
    return trained_sd["dti"].concept_dirs["dog"]


def test_generate_refuses_bad_flags_and_files_before_the_model_loads(trained_sd, tmp_path, capsys):
    concept = concept_dir(trained_sd)
    base = ["generate", "--concept", concept, "--model", tmp_path / "no-such-model", "--steps", "1"]
    out = tmp_path / "g"
    binary = tmp_path / "prompts.bin"
    binary.write_bytes(b"\xff\xfe\x00a photo")
    comments = tmp_path / "comments.txt"
    comments.write_text("# only a comment\n\n   \n")
    cases = [
        (["--output", ""], "argument --output: must be a non-empty path, got ''"),
        (["--output", out, "--seeds", "0-100000000"], "gives more than 10000 seeds"),
        (["--output", out, "--seeds", "3,3"], "seed 3 is given more than once"),
        (["--output", out, "--seeds", str(2**64)], "outside 0 to 2**63 - 1"),
        (["--output", out, "--guidance", "nan"], "argument --guidance: must be a finite number >= 0"),
        (["--output", out, "--guidance", "-5"], "argument --guidance: must be a finite number >= 0"),
        (["--output", out, "--height", "1000000"], "1000000 px is above the largest side dti-fast samples, 4096 px"),
        (["--output", out, "--width", "100"], "--width must be a positive multiple of 8, got 100"),
        (["--output", out, "--prompt", ""], "--prompt is empty"),
        (["--output", out, "--prompt-file", binary], f"--prompt-file {binary} is not UTF-8 text"),
        (["--output", out, "--prompt-file", tmp_path], f"--prompt-file {tmp_path} is a folder"),
        (["--output", out, "--prompt-file", tmp_path / "none.txt"], "does not exist"),
        (["--output", out, "--prompt-file", comments], "holds no prompts"),
    ]
    for extra, message in cases:
        code, err = run(base + extra, capsys)
        assert code == 2, (extra, err)
        assert message in last_line(err), (extra, err)
        assert "Traceback" not in err and "no-such-model" not in last_line(err)
    assert not out.exists() or not any(out.iterdir())


def test_generate_refuses_an_output_it_cannot_use_and_leaves_other_files_alone(trained_sd, tmp_path, capsys):
    concept = concept_dir(trained_sd)
    base = ["generate", "--concept", concept, "--model", tmp_path / "no-such-model", "--steps", "1", "--output"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "images.txt").write_text("my notes")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for output, message in [
        (mine, f"--output {mine} holds files that dti-fast generate did not write (images.txt)"),
        (a_file, f"--output {a_file} is a file"),
        (a_file / "under", f"lies under {a_file}, which is a file"),
    ]:
        code, err = run(base + [output], capsys)
        assert code == 2 and message in last_line(err), err
    assert (mine / "images.txt").read_text() == "my notes" and sorted(p.name for p in mine.iterdir()) == ["images.txt"]


def test_generate_refuses_a_read_only_output_in_one_line(trained_sd, tmp_path, capsys):
    with small_tmpfs(tmp_path, "1m") as disk:
        assert subprocess.run(["mount", "-o", "remount,ro", str(disk)]).returncode == 0
        args = ["generate", "--concept", concept_dir(trained_sd), "--model", tmp_path / "none", "--output", disk / "g"]
        code, err = run(args, capsys)
        assert code == 2 and f"--output {disk / 'g'} is not writable (Read-only file system)" in last_line(err)


# ---------------------------------------------------------------------------------------------
# generate: images kept on disk belong to the run that asks for them
# ---------------------------------------------------------------------------------------------


def test_kept_images_must_come_from_the_same_run(trained_sd, eval_sd_model, tmp_path, capsys):
    out = tmp_path / "g"
    base = ["generate", "--model", eval_sd_model, "--output", out, "--steps", "2", "--no-grid", "--no-progress"]
    dog, cat = trained_sd["dti"].concept_dirs["dog"], trained_sd["ti"].concept_dirs["dog"]
    assert run(base + ["--concept", dog, "--seeds", "0,1"], capsys)[0] == 0
    first = (out / "dog" / "p000_s0.png").read_bytes()
    manifest = json.loads((out / "images.json").read_text())
    assert manifest["run"]["steps"] == 2 and manifest["run"]["model"] == str(Path(eval_sd_model).resolve())

    # another concept of the same name (TI's dog), other settings: refused, nothing written over
    for extra, why in [
        (["--concept", cat], "concept 'dog' has other vectors"),
        (["--concept", dog, "--guidance", "1"], "guidance 7.5 -> 1.0"),
        (["--concept", dog, "--negative-prompt", "blurry"], "negative_prompt None -> 'blurry'"),
    ]:
        code, err = run(base + extra + ["--seeds", "0,1"], capsys)
        assert code == 2 and "holds images of another run" in last_line(err) and why in last_line(err), err
        assert "--overwrite" in last_line(err)
    assert (out / "dog" / "p000_s0.png").read_bytes() == first
    assert json.loads((out / "images.json").read_text()) == manifest

    # the same run again: kept; an image lost (a run stopped part way) is made again, the rest kept
    (out / "dog" / "p000_s1.png").unlink()
    capsys.readouterr()
    assert run(base + ["--concept", dog, "--seeds", "0,1"], capsys)[0] == 0
    assert (out / "dog" / "p000_s0.png").read_bytes() == first and (out / "dog" / "p000_s1.png").is_file()
    # --overwrite makes them again with the new settings
    assert run(base + ["--concept", cat, "--seeds", "0,1", "--overwrite"], capsys)[0] == 0
    assert json.loads((out / "images.json").read_text())["concepts"]["dog"] == str(cat)


def test_a_prompt_that_shows_no_concept_is_warned_about_in_one_line(trained_sd, eval_sd_model, tmp_path, capsys):
    args = ["generate", "--model", eval_sd_model, "--concept", concept_dir(trained_sd), "--output", tmp_path / "g"]
    code, err = run(args + ["--prompt", "a photo of a cat", "--steps", "1", "--no-grid", "--no-progress"], capsys)
    assert code == 0
    lines = [line for line in err.splitlines() if "warning" in line]
    assert lines == [
        "dti-fast generate: warning: prompt 'a photo of a cat' has no {} and names no loaded concept: it is drawn "
        "without any (write {} where the concept goes)"
    ], err


def test_sigterm_during_generate_says_what_is_kept_and_the_same_command_makes_the_rest(
    trained_sd, eval_sd_model, tmp_path
):
    out = tmp_path / "g"

    def command(seeds: str) -> list[str]:
        return [
            *(sys.executable, "-m", "dti_fast.cli", "generate", "--model", str(eval_sd_model)),
            *("--concept", str(concept_dir(trained_sd)), "--output", str(out), "--seeds", seeds),
            *("--steps", "8", "--batch-size", "1", "--no-grid", "--no-progress"),
        ]

    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(command("0-199"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    start = time.monotonic()
    while not (out / "dog" / "p000_s0.png").is_file():  # the first image is written
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - start < 300
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert last_line(err) == (
        "dti-fast generate: stopped by SIGTERM; the images made so far are kept: the same command makes the rest"
    )
    assert 0 < len(list((out / "dog").glob("*.png"))) < 200
    # the same run goes on from there (shown on its first two seeds: the same settings)
    again = subprocess.run(command("0-1"), capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr
    kept = re.search(r"\((\d+) generated now, (\d+) already there\)", again.stdout)
    assert kept and int(kept.group(2)) >= 1 and int(kept.group(1)) + int(kept.group(2)) == 2, again.stdout


# ---------------------------------------------------------------------------------------------
# interpolate
# ---------------------------------------------------------------------------------------------


def test_interpolate_refuses_bad_input_before_writing_anything(trained_sd, eval_sdxl_model, tmp_path, capsys):
    dog, cat = trained_sd["dti"].concept_dirs["dog"], trained_sd["dti"].concept_dirs["cat2"]
    out = tmp_path / "i"
    cases = [
        (["interpolate", dog, dog, "--output", out, "--no-images"], f"A and B are the same concept ({dog})"),
        (["interpolate", dog, cat, "--output", out, "--steps", "100000000"], "expected 2 to 1001 t values"),
        (["interpolate", dog, cat, "--output", out, "--seed", str(2**64)], "must be below 2**63"),
        (["interpolate", dog, cat, "--output", out, "--guidance", "nan"], "must be a finite number >= 0"),
        (["interpolate", dog, cat, "--output", out, "--resolution", "65"], "--resolution must be a positive multiple"),
        (["interpolate", dog, cat, "--output", ""], "must be a non-empty path"),
        (
            ["interpolate", dog, cat, "--output", out, "--model", eval_sdxl_model],
            f"--model {eval_sdxl_model} is a sdxl model but {dog} was trained on a sd model",
        ),
    ]
    for argv, message in cases:
        code, err = run(argv, capsys)
        assert code == 2 and message in last_line(err), (argv, err)
    assert not out.exists() or not any(out.iterdir())


def test_a_second_interpolation_into_the_same_folder_leaves_nothing_of_the_first(trained_sd, tmp_path, capsys):
    dti = trained_sd["dti"].concept_dirs
    out = tmp_path / "i"
    assert run(["interpolate", dti["dog"], dti["cat2"], "--output", out, "--steps", "5", "--no-images"], capsys)[0] == 0
    assert len(list((out / "slerp").iterdir())) == 5
    assert run(["interpolate", dti["dog"], dti["cat2"], "--output", out, "--steps", "3", "--no-images"], capsys)[0] == 0
    assert sorted(p.name for p in (out / "slerp").iterdir()) == ["t0", "t0.5", "t1"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "strip_slerp.png").write_bytes(b"my picture")
    code, err = run(["interpolate", dti["dog"], dti["cat2"], "--output", mine, "--no-images"], capsys)
    assert code == 2 and "holds files that dti-fast interpolate did not write" in last_line(err)
    assert (mine / "strip_slerp.png").read_bytes() == b"my picture"


# ---------------------------------------------------------------------------------------------
# make-tiny-model and world gate
# ---------------------------------------------------------------------------------------------


def test_make_tiny_model_never_writes_over_other_files_or_another_family(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    code, err = run(["make-tiny-model", mine], capsys)
    assert code == 2 and "holds files that dti-fast make-tiny-model did not write (notes.txt)" in last_line(err)
    code, err = run(["make-tiny-model", ""], capsys)
    assert code == 2 and "must be a non-empty path" in last_line(err)

    old = os.umask(0o022)
    try:
        model = tmp_path / "tiny"
        assert run(["make-tiny-model", model], capsys)[0] == 0
        modes = {oct(p.stat().st_mode & 0o777) for p in model.rglob("*") if p.is_file()}
        assert modes == {"0o644"}, modes  # as the umask gives, weights included
        assert run(["make-tiny-model", model, "--seed", "1"], capsys)[0] == 0  # the same family: replaced
        code, err = run(["make-tiny-model", model, "--family", "sdxl"], capsys)
        assert code == 2 and f"DIR {model} holds a tiny sd model" in last_line(err)
        assert json.loads((model / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    finally:
        os.umask(old)
    code, err = run(["make-tiny-model", tmp_path / "x", "--seed", str(2**64)], capsys)
    assert code == 2 and "must be below 2**63" in last_line(err)


def test_world_gate_refuses_a_damaged_scorer_and_too_many_prompts(tmp_path, capsys):
    from dti_fast.world.base import world_model_path

    code, err = run(["world", "gate", "--prompts", "100000000"], capsys)
    assert code == 2 and "argument --prompts: at most 10000 captions" in last_line(err)
    model = tmp_path / "model"
    (model / "world_scorer").mkdir(parents=True)
    shipped = world_model_path()
    data = (shipped / "world_scorer" / "scorer.safetensors").read_bytes()
    (model / "world_scorer" / "scorer.safetensors").write_bytes(data[: len(data) // 2])
    code, err = run(["world", "gate", "--model", model], capsys)
    assert code == 2 and f"{model / 'world_scorer'} is damaged" in last_line(err) and "Traceback" not in err
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    code, err = run(["world", "gate", "--output", a_file], capsys)
    assert code == 2 and f"--output {a_file} is a file" in last_line(err)


def test_a_toy_suite_rerun_with_other_settings_draws_its_own_images(tmp_path, capsys):
    from dti_fast.concept_files import read_concept
    from dti_fast.generate import concept_digest

    out = tmp_path / "s"
    assert run(["suite", "--world", "toy", "--quick", "--output", out], capsys)[0] == 0
    # other training steps: other vectors, so every image must be drawn again (none kept from the first run)
    assert run(["suite", "--world", "toy", "--quick", "--output", out, "--steps", "3"], capsys)[0] == 0
    manifest = json.loads((out / "images" / "dti" / "images.json").read_text())
    for name, digest in manifest["run"]["concepts"].items():
        assert digest == concept_digest(read_concept(out / "train" / "dti" / name))


def test_generate_names_a_unet_config_that_does_not_fit_its_weights(trained_sd, eval_sd_model, tmp_path, capsys):
    import shutil

    model = tmp_path / "mixed"
    shutil.copytree(eval_sd_model, model)
    config = json.loads((model / "unet" / "config.json").read_text())
    config["block_out_channels"] = [2 * c for c in config["block_out_channels"]]
    (model / "unet" / "config.json").write_text(json.dumps(config))
    args = ["generate", "--model", model, "--concept", concept_dir(trained_sd), "--output", tmp_path / "g"]
    code, err = run(args + ["--steps", "1", "--no-progress"], capsys)
    assert code == 2, err
    assert f"model '{model}': the config of unet/ does not match its weights" in last_line(err)
    assert "low_cpu_mem_usage" not in err


def test_resume_trains_again_a_concept_whose_concept_json_is_not_an_object(tmp_path):
    from dti_fast.data import Concept
    from dti_fast.demo import demo_images_dir
    from dti_fast.train import TrainConfig
    from dti_fast.train.checkpoint import finished_concepts

    cfg = TrainConfig(
        model="unused",
        output_dir=tmp_path,
        concepts=[Concept(name="dog", images=demo_images_dir() / "dog", init="dog")],
    )
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "concept.json").write_text('["a list, not what train writes"]')
    assert finished_concepts(cfg, 1) == set()


def test_generate_warns_when_a_concept_was_trained_on_another_model(trained_sd, eval_sd_model, tmp_path, capsys):
    import shutil

    other = tmp_path / "other-sd"
    shutil.copytree(eval_sd_model, other)  # the same family and widths: it loads
    args = ["generate", "--model", other, "--concept", concept_dir(trained_sd), "--output", tmp_path / "g"]
    code, err = run(args + ["--steps", "1", "--no-grid", "--no-progress"], capsys)
    assert code == 0, err
    warned = [line for line in err.splitlines() if "warning" in line]
    assert len(warned) == 1 and f"was trained on {Path(eval_sd_model).resolve()}, not on {other}" in warned[0], err
    capsys.readouterr()
    code, err = run(
        ["generate", "--model", eval_sd_model, "--concept", concept_dir(trained_sd), "--output", tmp_path / "h"]
        + ["--steps", "1", "--no-grid", "--no-progress"],
        capsys,
    )
    assert code == 0 and "warning" not in err, err

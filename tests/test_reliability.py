"""Bad input refused clearly, nothing learned lost, no code run from untrusted files."""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _shared import train_cmd, wait_for_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from dti_fast.data import Concept, load_concept_images
from dti_fast.demo import demo_images_dir
from dti_fast.io import load_safetensors, load_torch, save_safetensors
from dti_fast.train import OutputBusyError, TrainConfig, train
from dti_fast.train.run import OutputLock

# The fuzz tests run in CI: keep each bounded in examples and time.
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    from dti_fast.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "sd", family="sd")


def _cfg(model: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        model=str(model),
        output_dir=out,
        steps=3,
        batch_size=1,
        resolution=64,
        progress=False,
        concepts=[
            Concept("dog", demo_images_dir() / "dog", "dog"),
            Concept("clock", demo_images_dir() / "clock", "clock"),
        ],
    )
    base.update(kw)
    return TrainConfig(**base)


# -- images ------------------------------------------------------------------------------


def _gradient(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.full_like(x, 128)], -1).astype(np.uint8)


def test_valid_unusual_images_load_right(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rgb = Image.fromarray(_gradient(80, 120))
    rgb.convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    rgb.convert("P").save(folder / "palette.png")
    grey16 = Image.fromarray((np.linspace(0, 65535, 80 * 120).reshape(80, 120)).astype(np.uint16))
    grey16.save(folder / "grey16.png")
    rgba = rgb.convert("RGBA")
    alpha = np.array(rgba)
    alpha[:, :60, 3] = 0  # left half transparent: must become white, not black
    Image.fromarray(alpha).save(folder / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise on display
    rgb.save(folder / "rotated.jpg", exif=exif, quality=95)
    rgb.save(folder / "plain.webp")
    data = load_concept_images(Concept("x", folder, "dog"), 64)
    by_name = {p.name: a for p, a in zip(data.files, data.arrays)}
    assert set(by_name) == {"cmyk.jpg", "palette.png", "grey16.png", "alpha.png", "rotated.jpg", "plain.webp"}
    for name, arr in by_name.items():
        assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3, name
        assert min(arr.shape[:2]) == 64, name
    assert by_name["rotated.jpg"].shape[:2] == (96, 64)  # portrait after applying EXIF orientation
    assert by_name["plain.webp"].shape[:2] == (64, 96)
    assert by_name["alpha.png"][:, :20].min() > 240  # transparent part composited on white
    grey = by_name["grey16.png"]
    # The 16-bit ramp runs top (0) to bottom (65535): scaled to 8 bits, not clipped to white.
    assert grey[0].mean() < 10 and grey[-1].mean() > 240 and 100 < grey[32].mean() < 160


@pytest.mark.parametrize("kind", ["jpg", "png"])
def test_truncated_images_refused_with_file_name(tmp_path, kind):
    folder = tmp_path / "imgs"
    folder.mkdir()
    buf = io.BytesIO()
    Image.fromarray(_gradient(128, 128)).save(buf, format="JPEG" if kind == "jpg" else "PNG")
    (folder / f"cut.{kind}").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ValueError, match=f"cut.{kind} could not be read"):
        load_concept_images(Concept("x", folder, "dog"), 64)


def test_image_smaller_than_resolution_refused(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(_gradient(40, 60)).save(folder / "small.png")
    with pytest.raises(ValueError, match="small.png is 60x40 px, smaller than the training resolution 64"):
        load_concept_images(Concept("x", folder, "dog"), 64)


def test_initializer_that_tokenizes_to_nothing(tiny_sd):
    from transformers import CLIPTokenizer

    from dti_fast.embedding import initializer_ids

    tok = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        initializer_ids(tok, "\u3000", "x")
    with pytest.raises(ValueError, match="initializer word"):
        Concept("x", "somewhere", " ")


def test_initializer_longer_than_the_prompt_window_is_refused_before_training(tiny_sd, tmp_path):
    long = Concept("x", demo_images_dir() / "dog", " ".join(["dog"] * 100))
    with pytest.raises(ValueError, match=r"concept 'x': initializer .* gives 100 vectors.*window of 77"):
        train(_cfg(tiny_sd, tmp_path / "out", concepts=[long]))
    assert not (tmp_path / "out" / "checkpoints").exists()


# -- output folder -------------------------------------------------------------------------


def test_second_job_on_same_output_refused(tiny_sd, tmp_path):
    out = tmp_path / "out"
    with OutputLock(out):
        with pytest.raises(OutputBusyError, match=f"pid {os.getpid()}"):
            train(_cfg(tiny_sd, out))
    train(_cfg(tiny_sd, out, steps=1))  # free again once the holder is gone


def test_output_under_a_file_refused(tiny_sd, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="is not a folder"):
        train(_cfg(tiny_sd, blocker / "out"))


# -- numerical faults -----------------------------------------------------------------------


def test_nan_concept_is_skipped_then_stopped_others_finish(tiny_sd, tmp_path, monkeypatch):
    from dti_fast.train import TrainingJob

    original = TrainingJob.make_batch

    def poisoned(self, chosen):
        batch = original(self, chosen)
        clock = [c.name for c in self.cfg.concepts].index("clock")
        for k, owner in enumerate(batch["owners"]):
            if owner == clock:
                key = "latents" if "latents" in batch else "pixels"
                batch[key][k] = float("nan")  # a broken image: NaN loss and gradient for the clock only
        return batch

    monkeypatch.setattr(TrainingJob, "make_batch", poisoned)
    result = train(_cfg(tiny_sd, tmp_path / "out", steps=5, max_bad_steps=3))
    assert "clock" in result.stopped and "non-finite" in result.stopped["clock"]
    assert "dog" not in result.stopped
    assert result.skipped_steps == 3
    # The clock's rows never moved: still m* times its initializer's direction, on the sphere.
    from dti_fast.models import load_model_parts

    parts = load_model_parts(str(tiny_sd))
    w = parts.text_encoders[0].get_input_embeddings().weight.detach()
    init = w[parts.tokenizers[0]("clock", add_special_tokens=False)["input_ids"]]
    expected = init / init.norm(dim=-1, keepdim=True) * result.scales[0]
    torch.testing.assert_close(result.vectors["clock"][0], expected, rtol=1e-6, atol=1e-7)
    assert torch.isfinite(result.vectors["dog"][0]).all()
    info = (result.concept_dirs["clock"] / "concept.json").read_text()
    assert '"status": "stopped:' in info


@pytest.mark.parametrize("method", ["ti", "dti"])
def test_an_absurd_learning_rate_never_exports_nan_and_exits_non_zero(tiny_sd, tmp_path, capsys, method):
    from dti_fast.cli import main
    from dti_fast.concept_files import read_concept

    out = tmp_path / "out"
    code = main(
        [
            "train",
            "--model",
            str(tiny_sd),
            "--output",
            str(out),
            "--method",
            method,
            "--lr",
            "1e30",
            "--concept",
            f"dog:{demo_images_dir() / 'dog'}:dog",
            "--steps",
            "6",
            "--batch-size",
            "1",
            "--resolution",
            "64",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "every concept was stopped early" in err
    info = json.loads((out / "dog" / "concept.json").read_text())
    assert info["status"].startswith("stopped:") or info["status"].startswith("failed:")
    for f in (out / "dog").glob("*.safetensors"):
        for t in load_safetensors(f).values():
            assert torch.isfinite(t).all(), f
    if (out / "dog" / "learned_embeds.safetensors").exists():
        v = read_concept(out / "dog").vectors[0]  # refuses NaN/inf itself
        if method == "dti":  # undone updates leave the rows on the sphere at m*
            assert torch.allclose(v.norm(dim=-1), torch.full((v.shape[0],), info["encoders"][0]["scale"]), rtol=1e-4)


# -- untrusted files -------------------------------------------------------------------------


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    _Evil.marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"string_to_param": {"*": _Evil()}}, fh)
    with pytest.raises(ValueError, match="was not loaded: it holds Python objects .* no code from it ran"):
        load_torch(path)
    assert not _Evil.marker.exists()


def _two_checkpoints(tiny_sd, out: Path) -> list[Path]:
    """A finished 2-step job with a checkpoint after each step; returns them, oldest first."""
    train(_cfg(tiny_sd, out, steps=2, checkpoint_every=1))
    return sorted((out / "checkpoints").glob("step-*.safetensors"))


def _resume_to_4(tiny_sd, out: Path) -> dict:
    return train(_cfg(tiny_sd, out, steps=4, checkpoint_every=1, resume=True)).vectors


def _flip_bits(path: Path, offset_from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def uninterrupted_4(tiny_sd, tmp_path_factory) -> dict:
    return train(_cfg(tiny_sd, tmp_path_factory.mktemp("ref") / "out", steps=4, checkpoint_every=1)).vectors


@pytest.mark.parametrize("damage", ["bit flip", "truncation", "bad rng state"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_intact_one(
    tiny_sd, tmp_path, capsys, damage, uninterrupted_4
):
    out = tmp_path / "out"
    older, newest = _two_checkpoints(tiny_sd, out)
    if damage == "bit flip":
        _flip_bits(newest, 5)  # inside the last tensor's bytes: the file still parses
    elif damage == "truncation":
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    else:
        from safetensors import safe_open

        with safe_open(str(newest), framework="pt") as fh:
            meta = fh.metadata()
        tensors = load_safetensors(newest)
        for name in ("dog", "clock"):  # both fall back: the same schedule as no interruption, bit for bit
            tensors[f"rng/{name}"] = torch.zeros(7, dtype=torch.uint8)
        meta.pop("checksum")  # as a checkpoint of the previous format would be: no checksum to catch it
        save_safetensors(tensors, newest, metadata=meta)
    vectors = _resume_to_4(tiny_sd, out)
    err = capsys.readouterr().err
    assert str(newest) in err and "warning" in err
    for name in ("dog", "clock"):  # resumed from the older checkpoint: the same vectors as no interruption
        assert torch.equal(vectors[name][0], uninterrupted_4[name][0]), name


def test_dti_rows_off_the_sphere_are_not_restored(tiny_sd, tmp_path, capsys, uninterrupted_4):
    from safetensors import safe_open

    out = tmp_path / "out"
    older, newest = _two_checkpoints(tiny_sd, out)
    with safe_open(str(newest), framework="pt") as fh:
        meta = fh.metadata()
    tensors = load_safetensors(newest)
    for name in ("dog", "clock"):
        tensors[f"rows/0/{name}"] = tensors[f"rows/0/{name}"] * 48.0
    meta["checksum"] = __import__("dti_fast.train.checkpoint", fromlist=["_checksum"])._checksum(tensors)
    save_safetensors(tensors, newest, metadata=meta)  # a consistent file with absurd rows
    vectors = _resume_to_4(tiny_sd, out)
    assert "not unit vectors" in capsys.readouterr().err
    for name in ("dog", "clock"):
        assert torch.equal(vectors[name][0], uninterrupted_4[name][0]), name


def test_no_intact_checkpoint_is_a_clear_error(tiny_sd, tmp_path):
    out = tmp_path / "out"
    for path in _two_checkpoints(tiny_sd, out):
        _flip_bits(path, 5)
    with pytest.raises(ValueError, match="no intact checkpoint of concept .* delete the damaged files"):
        _resume_to_4(tiny_sd, out)


def test_tampered_checkpoint_shapes_refused(tiny_sd, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "out"
    train(_cfg(tiny_sd, out, steps=2, checkpoint_every=2))
    ckpt = sorted((out / "checkpoints").glob("step-*.safetensors"))[-1]
    with safe_open(str(ckpt), framework="pt") as fh:
        meta = fh.metadata()
    tensors = load_safetensors(ckpt)
    tensors["rows/0/dog"] = torch.zeros(3, 5)
    save_safetensors(tensors, ckpt, metadata=meta)
    with pytest.raises(ValueError, match="no intact checkpoint of concept 'dog'"):
        train(_cfg(tiny_sd, out, steps=4, checkpoint_every=1, resume=True))


# -- kill -9 and SIGTERM -------------------------------------------------------------------


def test_kill_9_at_random_points_then_resume_matches_uninterrupted(tiny_sd, tmp_path):
    steps = 12
    reference = train(
        _cfg(
            tiny_sd,
            tmp_path / "ref",
            steps=steps,
            checkpoint_every=1,
            concepts=[
                Concept("dog", demo_images_dir() / "dog", "dog"),
                Concept("bag", demo_images_dir() / "backpack", "red backpack"),
            ],
        )
    )
    out = tmp_path / "killed"
    rng = random.Random(1234)
    kills = 0
    for trial in range(3):
        proc = subprocess.Popen(
            train_cmd(tiny_sd, out, steps, resume=trial > 0), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        wait_for_checkpoint(out, proc)
        time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is None:
            proc.kill()  # SIGKILL: no handler runs
            kills += 1
        proc.wait(timeout=60)
    assert kills >= 1
    done = subprocess.run(train_cmd(tiny_sd, out, steps, resume=True), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for name in ("dog", "bag"):
        got = load_safetensors(out / name / "learned_embeds.safetensors")[f"<{name}>"]
        torch.testing.assert_close(got, reference.vectors[name][0], rtol=0, atol=0)


def test_sigterm_writes_checkpoint_and_exits_cleanly(tiny_sd, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        train_cmd(tiny_sd, out, 400, resume=False), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    wait_for_checkpoint(out, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "--resume" in err
    assert list((out / "checkpoints").glob("step-*.safetensors"))


# A real SIGINT, sent by the process to itself at a chosen point of a phase (decoding photos, sampling the
# validation grid), so the test does not depend on timing on a busy machine.
_SIGNAL_SCRIPT = """
import os, signal, sys
import dti_fast.data as data
import dti_fast.models as models
from dti_fast.cli import main

phase, times = sys.argv[1], int(sys.argv[2])
if phase == "decode":
    real = data.load_rgb
    def load_rgb(path):
        os.kill(os.getpid(), signal.SIGINT)
        return real(path)
    data.load_rgb = load_rgb
else:
    real = models.pipeline_from_parts
    def pipeline_from_parts(parts, scheduler=None):
        pipe = real(parts, scheduler)
        call = type(pipe).__call__
        class Interrupted(type(pipe)):
            def __call__(self, *a, **k):
                for _ in range(times):
                    os.kill(os.getpid(), signal.SIGINT)
                return call(self, *a, **k)
        pipe.__class__ = Interrupted
        return pipe
    models.pipeline_from_parts = pipeline_from_parts
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("phase, times", [("decode", 1), ("validation", 1), ("validation", 2)])
def test_ctrl_c_in_every_phase_exits_130_without_a_traceback(tiny_sd, tmp_path, phase, times):
    script = tmp_path / "sig.py"
    script.write_text(_SIGNAL_SCRIPT)
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(script),
        phase,
        str(times),
        "train",
        "--model",
        str(tiny_sd),
        "--output",
        str(out),
        "--concept",
        f"dog:{demo_images_dir() / 'dog'}:dog",
        "--steps",
        "2",
        "--batch-size",
        "1",
        "--resolution",
        "64",
        "--no-progress",
        "--validation-prompt",
        "a photo of {}",
        "--validation-inference-steps",
        "2",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 130, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("dti-fast train: interrupted")
    if phase == "validation":  # interrupted after the final checkpoint: nothing learned is lost
        assert list((out / "checkpoints").glob("step-*.safetensors"))
        assert (out / "dog" / "learned_embeds.safetensors").is_file()


# -- fuzzing the loaders ----------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_embedding_files_never_crash_or_run_code(tmp_path_factory, blob):
    folder = tmp_path_factory.mktemp("fuzz")
    for name in ("x.safetensors", "x.pt"):
        path = folder / name
        path.write_bytes(blob)
        try:
            obj = load_safetensors(path) if name.endswith("safetensors") else load_torch(path)
        except ValueError:
            continue
        assert isinstance(obj, (dict, list, tuple, torch.Tensor, int, float, str, bytes, type(None)))


@FUZZ
@given(st.text(max_size=400))
def test_fuzz_job_files_give_a_message_or_a_job(tmp_path_factory, text):
    from dti_fast.cli import load_job_file

    path = tmp_path_factory.mktemp("job") / "job.toml"
    path.write_text(text, encoding="utf-8")
    try:
        job = load_job_file(path)
    except SystemExit as exit_:
        assert str(exit_.code).startswith("dti-fast: job file")
        return
    assert isinstance(job["concepts"], list)


@FUZZ
@given(st.binary(min_size=0, max_size=4096), st.sampled_from([".jpg", ".png", ".webp"]))
def test_fuzz_images_load_or_are_refused_by_name(tmp_path_factory, blob, suffix):
    folder = tmp_path_factory.mktemp("img")
    (folder / f"f{suffix}").write_bytes(blob)
    try:
        data = load_concept_images(Concept("x", folder, "dog"), 16)
    except ValueError as err:
        assert f"f{suffix}" in str(err)
        return
    assert data.arrays[0].dtype == np.uint8


# -- the environment -----------------------------------------------------------------------

_OOM_SCRIPT = """
import resource, sys
from pathlib import Path
from dti_fast.cli import main
model, out, photos = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
common = ["train", "--model", model, "--concept", f"dog:{photos}:dog", "--resolution", "320", "--no-progress",
          "--no-latent-cache", "--steps", "1"]
assert main(common + ["--output", str(out / "warm"), "--batch-size", "1"]) == 0
# Cap the address space a little above what one image per step needed: 48 images per step cannot fit.
peak = int([l for l in open("/proc/self/status") if l.startswith("VmPeak")][0].split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (peak + (256 << 20), resource.RLIM_INFINITY))
sys.exit(main(common + ["--output", str(out / "big"), "--batch-size", "48"]))
"""


@pytest.mark.slow
def test_running_out_of_memory_names_the_fix_and_saves_progress(tiny_sd, tmp_path):
    """A real allocator failure (an address-space limit), not a raised exception."""
    script = tmp_path / "oom.py"
    script.write_text(_OOM_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(tiny_sd), str(tmp_path / "out"), str(demo_images_dir() / "dog")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "out of memory on cpu" in last and "--batch-size" in last and "--resume" in last
    assert "Traceback" not in done.stderr
    assert list((tmp_path / "out" / "big" / "checkpoints").glob("step-*.safetensors"))

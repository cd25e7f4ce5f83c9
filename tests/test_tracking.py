"""dti_fast.train.tracking: plain progress lines in logs, curves.png, trackers, validation during training."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from dti_fast.data import Concept
from dti_fast.demo import demo_images_dir
from dti_fast.train import TrainConfig, train
from dti_fast.train.tracking import Progress, check_report_to


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    p = Progress(total=10, initial=0, enabled=True, interval=0.0, stream=out)
    for done in range(1, 11):
        p.update(done, 0.25, 12.5)
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in out.getvalue()
    assert lines[-1].startswith("dti-fast: training 10/10 concept-steps (100%), 12.5 samples/s, loss 0.2500")
    assert "left 0:00:00" in lines[-1]


def test_a_long_interval_prints_only_the_end():
    out = io.StringIO()
    p = Progress(total=1000, initial=0, enabled=True, interval=3600.0, stream=out)
    for done in range(1, 1001):
        p.update(done, 0.1, 1.0)
    assert len(out.getvalue().splitlines()) == 1


def test_disabled_progress_prints_nothing():
    out = io.StringIO()
    p = Progress(total=3, initial=0, enabled=False, interval=0.0, stream=out)
    p.update(3, 0.1, 1.0)
    assert out.getvalue() == ""


def _cfg(model: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        model=str(model),
        output_dir=out,
        steps=4,
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


def test_curves_samples_during_training_and_log_lines(eval_sd_model, tmp_path, capsys):
    out = tmp_path / "out"
    train(
        _cfg(
            eval_sd_model,
            out,
            log_every=2,
            validation_every=2,
            validation_prompts=["a photo of {}"],
            validation_inference_steps=2,
            progress=True,
            progress_interval=0.0,
        )
    )
    assert (out / "curves.png").is_file()
    for name in ("dog", "clock"):
        assert (out / name / "samples" / "step-000002.png").is_file()
        assert (out / name / "samples" / "step-000004.png").is_file()
        assert (out / name / "samples.png").is_file()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("dti-fast: training ")]
    assert lines and lines[-1].startswith("dti-fast: training 8/8 concept-steps (100%)")


def test_validation_every_needs_prompts(eval_sd_model, tmp_path):
    with pytest.raises(ValueError, match="validation_every needs validation prompts"):
        train(_cfg(eval_sd_model, tmp_path / "o", validation_every=2))


def test_tensorboard_tracker_writes_events(eval_sd_model, tmp_path):
    pytest.importorskip("accelerate")
    pytest.importorskip("tensorboard")
    out = tmp_path / "out"
    train(_cfg(eval_sd_model, out, log_every=1, report_to="tensorboard"))
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/dog", "norm/clock", "angle_deg/dog", "lr"} <= tags
    assert len(acc.Scalars("loss/dog")) == 4


def test_a_missing_tracker_package_is_named_with_the_pip_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("wandb",) else real(name, *a))
    with pytest.raises(ValueError, match="--report-to wandb needs .*wandb.*pip install"):
        check_report_to("wandb")
    check_report_to("none")

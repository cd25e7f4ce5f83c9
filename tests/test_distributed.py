"""Sharding and data parallel under the real launcher (torchrun, gloo on CPU)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dti_fast.data import Concept
from dti_fast.demo import demo_images_dir
from dti_fast.distributed import shard_concepts
from dti_fast.io import load_safetensors
from dti_fast.train import TrainConfig, train

# Batch composition changes float rounding in the UNet (a concept's samples are
# the same whatever its batch-mates; see test_concept_in_a_mixed_job_trains_as_alone).
ATOL = 1e-4
CONCEPTS = [("dog", "dog", "dog"), ("clock", "clock", "clock"), ("bag", "backpack", "red backpack")]


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    from dti_fast.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "sd", family="sd")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_train(nproc: int) -> list[str]:
    """``torchrun --nproc-per-node N -m dti_fast.cli train`` on a free local port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        "-m",
        "dti_fast.cli",
        "train",
    ]


def _torchrun(nproc: int, model: Path, out: Path, *extra: str, steps: int = 3) -> list[str]:
    cmd = _launch_train(nproc) + [
        "--model",
        str(model),
        "--output",
        str(out),
        "--steps",
        str(steps),
        "--resolution",
        "64",
        "--no-progress",
        "--checkpoint-every",
        "1",
    ]
    for name, folder, init in CONCEPTS:
        cmd += ["--concept", f"{name}:{demo_images_dir() / folder}:{init}"]
    return cmd + list(extra)


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def _single(model: Path, out: Path, **kw) -> dict:
    cfg = TrainConfig(
        model=str(model),
        output_dir=out,
        resolution=64,
        progress=False,
        steps=kw.pop("steps", 3),
        concepts=[Concept(n, demo_images_dir() / f, i) for n, f, i in CONCEPTS],
        **kw,
    )
    return train(cfg).vectors


def _exported(out: Path, name: str) -> torch.Tensor:
    return load_safetensors(out / name / "learned_embeds.safetensors")[f"<{name}>"]


def test_shard_balances_by_steps():
    assert shard_concepts([10, 10, 10], 2) == [[0, 2], [1]]
    assert shard_concepts([400, 100, 100, 100, 100], 2) == [[0], [1, 2, 3, 4]]
    assert shard_concepts([5], 3) == [[0], [], []]
    assert sorted(i for s in shard_concepts([3, 1, 4, 1, 5, 9, 2, 6], 3) for i in s) == list(range(8))


@pytest.mark.parametrize("nproc", [2, 3])
def test_sharded_results_equal_single_process(tiny_sd, tmp_path, nproc):
    ref = _single(tiny_sd, tmp_path / "single", batch_size=1)
    out = tmp_path / "sharded"
    run = subprocess.run(
        _torchrun(nproc, tiny_sd, out, "--batch-size", "1"),
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for name, _, _ in CONCEPTS:
        torch.testing.assert_close(_exported(out, name), ref[name][0], rtol=0, atol=ATOL)
    statuses = [json.loads(p.read_text()) for p in sorted((out / ".ranks").glob("rank-*.json"))]
    assert [s["status"] for s in statuses] == ["done"] * nproc
    assert sorted(c for s in statuses for c in s["concepts"]) == sorted(n for n, _, _ in CONCEPTS)


def test_data_parallel_equals_one_rank_with_w_times_the_batch(tiny_sd, tmp_path):
    ref = _single(tiny_sd, tmp_path / "single", batch_size=2)
    out = tmp_path / "dp"
    run = subprocess.run(
        _torchrun(2, tiny_sd, out, "--batch-size", "1", "--parallel", "data"),
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for name, _, _ in CONCEPTS:
        torch.testing.assert_close(_exported(out, name), ref[name][0], rtol=0, atol=ATOL)
    # Only the main rank writes: one checkpoint folder, no per-rank copies.
    assert not list((out / "checkpoints").glob("rank*"))


def test_killed_rank_is_reported_and_resume_reruns_only_the_unfinished(tiny_sd, tmp_path):
    # The clock trains 60 steps, the others 6: balanced by steps, rank 0 holds the clock and
    # rank 1 the two short concepts. Rank 1 finishes; rank 0 is killed mid-job.
    steps = {"dog": 6, "clock": 60, "bag": 6}
    job = _job_file(tmp_path, steps)
    ref = train(
        TrainConfig(
            model=str(tiny_sd),
            output_dir=tmp_path / "single",
            resolution=64,
            progress=False,
            batch_size=1,
            concepts=[Concept(n, demo_images_dir() / f, i, steps=steps[n]) for n, f, i in CONCEPTS],
        )
    ).vectors
    out = tmp_path / "out"

    def command(*extra: str) -> list[str]:
        return _torchrun_job(job, tiny_sd, out, "--checkpoint-every", "1", *extra)

    proc = subprocess.Popen(
        command(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path
    )
    status0 = out / ".ranks" / "rank-0.json"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (
        (out / "dog" / "concept.json").exists()
        and (out / "bag" / "concept.json").exists()
        and list((out / "checkpoints" / "rank0-of-2").glob("step-*.safetensors"))
    ):
        time.sleep(0.05)
    victim = json.loads(status0.read_text())
    assert victim["concepts"] == ["clock"]
    os.kill(victim["pid"], signal.SIGKILL)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0
    assert not (out / "clock" / "concept.json").exists()
    run = subprocess.run(command("--resume"), capture_output=True, text=True, timeout=300, env=_env(), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    # The failure is reported with the concepts the dead rank held; only the clock is trained again.
    assert f"rank 0 (pid {victim['pid']}) running, holding concepts clock" in run.stderr
    assert "2 concept(s) finished, 1 to train" in run.stderr
    for name, _, _ in CONCEPTS:
        torch.testing.assert_close(_exported(out, name), ref[name][0], rtol=0, atol=ATOL)


def _torchrun_job(job: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return _launch_train(2) + [
        "--config",
        str(job),
        "--model",
        str(model),
        "--output",
        str(out),
        "--resolution",
        "64",
        "--batch-size",
        "1",
        "--no-progress",
        *extra,
    ]


def _job_file(tmp_path: Path, steps: dict[str, int]) -> Path:
    job = tmp_path / "job.toml"
    job.write_text(
        "".join(
            f'[[concept]]\nname = "{n}"\nimages = "{demo_images_dir() / f}"\ninit = "{i}"\nsteps = {steps[n]}\n'
            for n, f, i in CONCEPTS
            if n in steps
        )
    )
    return job


def test_a_rank_that_finishes_early_outwaits_a_short_process_group_timeout(tiny_sd, tmp_path):
    """Shards finish far apart: the early rank waits on the long-timeout gloo group, not the default one."""
    job = _job_file(tmp_path, {"dog": 2, "clock": 150})
    out = tmp_path / "out"
    env = dict(_env(), DTI_FAST_PG_TIMEOUT_S="2")
    started = time.monotonic()
    run = subprocess.run(
        _torchrun_job(job, tiny_sd, out, "--checkpoint-every", "50"),
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert time.monotonic() - started > 2  # the wait outlasted the configured timeout
    for name in ("dog", "clock"):
        assert json.loads((out / name / "concept.json").read_text())["status"] == "complete"


def test_sigterm_to_one_data_parallel_rank_stops_every_rank_with_a_checkpoint(tiny_sd, tmp_path):
    job = _job_file(tmp_path, {"dog": 400, "clock": 400})
    out = tmp_path / "out"
    proc = subprocess.Popen(
        _torchrun_job(job, tiny_sd, out, "--parallel", "data", "--checkpoint-every", "1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=tmp_path,
    )
    deadline = time.monotonic() + 300
    status1 = out / ".ranks" / "rank-1.json"
    while (
        time.monotonic() < deadline
        and proc.poll() is None
        and not (status1.exists() and list((out / "checkpoints").glob("step-*.safetensors")))
    ):
        time.sleep(0.05)
    os.kill(json.loads(status1.read_text())["pid"], signal.SIGTERM)  # one rank only, not the launcher
    _, err = proc.communicate(timeout=180)  # no rank is left hanging in a collective
    assert proc.returncode != 0
    statuses = [json.loads((out / ".ranks" / f"rank-{r}.json").read_text())["status"] for r in (0, 1)]
    assert statuses == ["interrupted by SIGTERM", "interrupted by SIGTERM"], (statuses, err[-6000:])
    assert "stopped by SIGTERM" in err
    assert list((out / "checkpoints").glob("step-*.safetensors"))


def test_a_signal_during_the_stop_agreement_waits_for_the_next_one():
    """Data parallel: a SIGTERM that lands while the ranks agree is not acted on alone (the other ranks voted
    "go on" and would wait in the next step's all-reduce); every rank stops at the next agreement."""
    from types import SimpleNamespace

    from dti_fast.train.run import StopSignals, _stopping

    votes = []

    class Ctx:
        def agree(self, ok: bool) -> bool:
            votes.append(ok)
            if len(votes) == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # arrives during the collective, after this rank voted
                return True  # every rank voted "go on"
            return ok  # the other rank votes "go on" again; this one now votes "stop"

    job = SimpleNamespace(data_world=2, ctx=Ctx())
    with StopSignals() as stop:
        assert _stopping(stop, job) is False  # agreed: one more step on every rank
        assert stop.signum == signal.SIGTERM  # the signal is kept for the next agreement
        assert _stopping(stop, job) is True
    assert votes == [True, False]

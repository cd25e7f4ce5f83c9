"""The toy world's commands lose nothing learned and refuse bad input before any work.

``dti-fast world build-base`` under kill -9, SIGTERM, Ctrl-C, a real full disk and a damaged
checkpoint: each case runs the real command in its own process on a tiny build (64 renders, a few
steps) with a checkpoint after every step, and checks what a user sees and that the finished
model's weights equal those of a build that was never interrupted. Then bad settings of
``build-base``, ``world gate`` and ``suite --world toy``: one line naming the flag, nothing written.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from _shared import small_tmpfs
from safetensors.torch import load_file

TINY = [
    "--images",
    "64",
    "--vae-steps",
    "6",
    "--steps",
    "10",
    "--batch",
    "4",
    "--scorer-steps",
    "2",
    "--unet-threads",
    "1",
    "--device",
    "cpu",
]


def build_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dti_fast.cli", "world", "build-base", "--output", str(out), *TINY, *extra]


def partial(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    start = time.monotonic()
    while not path.is_file():
        if proc.poll() is not None:
            raise AssertionError(f"the build ended (exit {proc.returncode}) before {path} was written")
        if time.monotonic() - start > timeout:
            proc.kill()
            raise AssertionError(f"no {path} within {timeout:.0f} s")
        time.sleep(0.02)


def scorer_processes(pid: int) -> list[int]:
    """The live scorer processes the build ``pid`` spawned (from /proc; zombies count as ended)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and b"spawn_main" in cmdline:
            found.append(int(d.name))
    return found


def ended(pids: list[int], timeout: float = 10.0) -> bool:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        alive = []
        for p in pids:
            try:
                if (Path("/proc") / str(p) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.append(p)
            except OSError:
                pass
        if not alive:
            return True
        time.sleep(0.1)
    return False


def started(out: Path, stage: str, *extra: str, **popen) -> subprocess.Popen:
    """The build of ``out`` (a checkpoint every step, ``extra`` flags) once ``stage`` wrote its first checkpoint."""
    popen.setdefault("stdout", subprocess.DEVNULL)
    proc = subprocess.Popen(build_cmd(out, "--checkpoint-minutes", "0", *extra), **popen)
    wait_for(partial(out) / "checkpoints" / f"{stage}.safetensors", proc)
    return proc


def weights(folder: Path) -> dict:
    out = {}
    for part in ("vae", "text_encoder", "unet", "world_scorer"):
        for f in sorted((folder / part).glob("*.safetensors")):
            out.update({f"{part}/{f.name}/{k}": v for k, v in load_file(str(f)).items()})
    return out


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and len(wa) > 100
    different = [k for k in wa if not (wa[k].dtype == wb[k].dtype and bool((wa[k] == wb[k]).all()))]
    assert not different, different[:5]


def saved_step(checkpoint: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(checkpoint), "pt") as fh:
        return json.loads(fh.metadata()["state"])["step"]


def test_kill_9_in_each_stage_then_the_same_command_ends_with_the_uninterrupted_weights(tmp_path):
    ref = tmp_path / "ref"
    done = subprocess.run(build_cmd(ref), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    out = tmp_path / "model"
    ck = partial(out) / "checkpoints"
    for stage in ("vae", "unet"):  # SIGKILL: no handler, no finally block runs
        proc = started(out, stage)
        proc.kill()
        proc.wait(timeout=60)
        assert not out.exists()  # nothing half-built where the model goes
    killed_at = saved_step(ck / "unet.safetensors")
    assert 0 < killed_at < 10

    done = subprocess.run(build_cmd(out, "--checkpoint-minutes", "0"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"continuing the unfinished build in {partial(out)}" in done.stdout
    assert "vae: trained before" in done.stdout and "unet: resuming at step" in done.stdout
    assert "object masks" not in done.stdout  # the finished VAE stage needs no masks: none are made
    assert_same_weights(ref, out)
    summary = json.loads((out / "world_build.json").read_text())
    unet_resumed = [r["step"] for r in summary["resumed"] if r["stage"] == "unet"]
    assert summary["steps_done"] == 10 and len(unet_resumed) == 1 and unet_resumed[0] >= killed_at
    assert not partial(out).exists() and not (out / "checkpoints").exists() and not (out / ".dti_fast.lock").exists()


def test_the_scorer_process_ends_with_a_killed_build_instead_of_writing_into_its_folder_later(tmp_path):
    out = tmp_path / "model"
    # a scorer that would train for minutes beside the VAE stage
    proc = started(out, "vae", "--scorer-steps", "100000", stdout=None)
    scorers = scorer_processes(proc.pid)
    assert scorers
    proc.kill()
    proc.wait(timeout=60)
    assert ended(scorers, timeout=5.0), scorers


def test_sigterm_keeps_the_build_and_a_changed_or_damaged_one_is_refused_until_force(tmp_path):
    out = tmp_path / "model"
    ck = partial(out) / "checkpoints"
    proc = started(out, "unet", "--steps", "400", stderr=subprocess.PIPE, text=True)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "run the same command again" in err and "Traceback" not in err
    assert 0 < saved_step(ck / "unet.safetensors") < 400 and not out.exists()

    # other settings: refused before any work, naming what changed and the fix
    other = subprocess.run(build_cmd(out, "--steps", "400", "--lr", "1e-3"), capture_output=True, text=True)
    assert other.returncode == 2 and "other settings" in other.stderr and "lr 0.002 -> 0.001" in other.stderr
    assert "--force" in other.stderr and "Traceback" not in other.stderr
    # the threads, device and checkpoint interval are not settings of what is learned
    assert json.loads((ck / "build.json").read_text()).keys().isdisjoint({"threads", "unet_threads", "device"})

    # a record from a version before --epsilon-fraction: the missing setting counts as its default, so the
    # command gets past the settings check to the checkpoints
    record = json.loads((ck / "build.json").read_text())
    assert record.pop("epsilon_fraction") == 0
    (ck / "build.json").write_text(json.dumps(record))

    # a damaged checkpoint (cut short, as a failing disk would leave it): named, with the fix
    data = (ck / "unet.safetensors").read_bytes()
    (ck / "unet.safetensors").write_bytes(data[: len(data) // 2])
    damaged = subprocess.run(build_cmd(out, "--steps", "400"), capture_output=True, text=True, timeout=600)
    assert damaged.returncode == 2 and "unet.safetensors is damaged" in damaged.stderr, damaged.stderr[-2000:]
    assert "--force" in damaged.stderr and "Traceback" not in damaged.stderr

    # damaged settings record (cut short): named as damaged, not as every setting changed
    record = (ck / "build.json").read_bytes()
    (ck / "build.json").write_bytes(record[: len(record) // 3])
    unreadable = subprocess.run(build_cmd(out, "--steps", "400"), capture_output=True, text=True, timeout=600)
    assert unreadable.returncode == 2 and "build.json" in unreadable.stderr and "damaged" in unreadable.stderr
    assert "other settings" not in unreadable.stderr and "--force" in unreadable.stderr

    forced = subprocess.run(build_cmd(out, "--force"), capture_output=True, text=True, timeout=600)
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert "continuing" not in forced.stdout and json.loads((out / "world_build.json").read_text())["resumed"] == []


def test_a_real_full_disk_stops_the_build_with_the_fix_and_the_same_command_continues_it(tmp_path):
    with small_tmpfs(tmp_path, "40m") as disk:
        out = disk / "model"
        full = subprocess.run(build_cmd(out, "--checkpoint-minutes", "0"), capture_output=True, text=True, timeout=600)
        assert full.returncode == 2, (full.stdout[-1000:], full.stderr[-2000:])
        assert "disk full" in full.stderr and "run the same command again" in full.stderr
        assert "Traceback" not in full.stderr
        ck = partial(out) / "checkpoints"
        assert saved_step(ck / "vae.safetensors") == 6  # the finished VAE stage is kept
        # free space (the same filesystem, made larger), then the same command
        grown = subprocess.run(["mount", "-o", "remount,size=400m", str(disk)], capture_output=True, text=True)
        assert grown.returncode == 0, grown.stderr
        done = subprocess.run(build_cmd(out, "--checkpoint-minutes", "0"), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "vae: trained before" in done.stdout
        assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file() and not partial(out).exists()


def test_ctrl_c_to_the_whole_process_group_in_the_vae_stage_keeps_it_and_prints_no_traceback(tmp_path):
    import os

    out = tmp_path / "model"
    ck = partial(out) / "checkpoints"
    # as a terminal's Ctrl-C: SIGINT to the build and the scorer's process beside it, twice
    proc = started(out, "vae", "--vae-steps", "400", stderr=subprocess.PIPE, text=True, start_new_session=True)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "run the same command again" in err and "Traceback" not in err, err
    assert 0 < saved_step(ck / "vae.safetensors") < 400


def _interrupt_after(out: Path, line: str, *extra: str) -> tuple[int, str, str]:
    """Run the build of ``out``; at the first stdout line starting with ``line``, Ctrl-C its process
    group (as a terminal does); its exit status, stdout and stderr."""
    import os

    proc = subprocess.Popen(
        build_cmd(out, "--checkpoint-minutes", "0", *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    seen = []
    for got in proc.stdout:
        seen.append(got)
        if got.startswith(line):
            os.killpg(proc.pid, signal.SIGINT)
            break
    else:
        proc.wait(timeout=60)
        raise AssertionError(f"the build ended (exit {proc.returncode}) before logging {line!r}: {seen[-5:]}")
    rest, err = proc.communicate(timeout=300)
    return proc.returncode, "".join(seen) + rest, err


def test_ctrl_c_while_the_object_masks_are_made_stops_there_and_the_same_command_builds_it(tmp_path):
    # 3000 scenes: rendering them, and making their object masks, each take seconds; before the
    # signal was checked there, the build went on through the masks to its first VAE checkpoint
    out = tmp_path / "model"
    code, log, err = _interrupt_after(out, "rendered ", "--images", "3000", "--vae-object-weight", "3")
    assert code == 130, err[-2000:]
    assert "run the same command again" in err and "Traceback" not in err, err[-2000:]
    assert "object masks:" not in log and "vae step" not in log, log[-2000:]
    assert not (partial(out) / "checkpoints" / "vae.safetensors").exists()
    done = subprocess.run(
        build_cmd(out, "--checkpoint-minutes", "0", "--images", "3000"), capture_output=True, text=True
    )
    assert done.returncode == 0 and (out / "model_index.json").is_file(), done.stderr[-2000:]


def test_ctrl_c_while_a_serial_scorer_trains_stops_the_build_and_the_same_command_finishes_it(tmp_path):
    # --serial-scorer trains the scorer in the build's own process, after the base model: a Ctrl-C
    # there used to wait for the whole scorer and then end the build as if none had come
    out = tmp_path / "model"
    extra = ("--serial-scorer", "--scorer-steps", "3000")
    code, log, err = _interrupt_after(out, "scorer step 0/", *extra)
    assert code == 130, err[-2000:]
    assert "run the same command again" in err and "Traceback" not in err, err[-2000:]
    assert "scorer step 2800/" not in log and not (partial(out) / "world_scorer" / "scorer.json").exists()
    done = subprocess.run(build_cmd(out, "--checkpoint-minutes", "0", *extra), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "vae: trained before" in done.stdout and "unet: trained before" in done.stdout
    assert (out / "world_scorer" / "scorer.json").is_file()


def test_an_output_folder_holding_other_files_is_refused_before_any_work_and_left_alone(tmp_path):
    out = tmp_path / "documents"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    done = subprocess.run(build_cmd(out, "--force"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "holds files but no model" in done.stderr and "Traceback" not in done.stderr
    assert (out / "notes.txt").read_text() == "mine" and not partial(out).exists()
    (tmp_path / "a-file").write_text("x")
    done = subprocess.run(build_cmd(tmp_path / "a-file"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "is a file" in done.stderr and (tmp_path / "a-file").read_text() == "x"


BAD_FLAGS = [  # refused as they are parsed (one error line, exit 2), like train's flags
    (["--batch", "0"], "argument --batch: must be a positive integer, got 0"),
    (["--steps", "-3"], "argument --steps: must be a positive integer"),
    (["--images", "0"], "argument --images: must be a positive integer"),
    (["--vae-steps", "0"], "argument --vae-steps: must be a positive integer"),
    (["--seed", "-1"], "argument --seed: must be an integer >= 0"),
    (["--timestep-shift", "0"], "argument --timestep-shift: must be positive and finite"),
    (["--ema", "1.5"], "argument --ema: must be a number in [0, 1), got 1.5"),
    (["--lr", "nan"], "argument --lr: must be positive and finite, got nan"),
    (["--lr", "0"], "argument --lr: must be positive and finite"),
    (["--checkpoint-minutes", "-1"], "argument --checkpoint-minutes: must be a finite number >= 0"),
    (["--minutes", "0"], "argument --minutes: must be positive and finite"),
    (["--unet-threads", "0"], "argument --unet-threads: must be a positive integer"),
    (["--vae-object-weight", "-1"], "argument --vae-object-weight: must be a finite number >= 0"),
    (["--unet-object-weight", "nan"], "argument --unet-object-weight: must be a finite number >= 0"),
    (["--scorer-steps", "0"], "argument --scorer-steps: must be a positive integer"),
]
BAD_TOGETHER = [  # each flag is valid alone: refused in one line before any work
    (["--offset-noise", "0.3", "--pyramid", "0.8"], "give one of them"),
    (["--resume-from", "/nonexistent"], "not a model that dti-fast world build-base wrote"),
]


def refused(argv: list[str], capsys) -> tuple[int, str]:
    """Exit status and stderr of ``dti-fast argv``, whether argparse or the command refused it."""
    from dti_fast.cli import main

    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


def test_every_bad_setting_is_refused_naming_the_flag_before_any_work(tmp_path, capsys):
    for extra, message in BAD_FLAGS + BAD_TOGETHER:
        out = tmp_path / "m"
        code, err = refused(["world", "build-base", "--output", str(out), *TINY, *extra], capsys)
        assert code == 2 and message in err and "Traceback" not in err, (extra, err)
        if (extra, message) in BAD_TOGETHER:
            assert len(err.strip().splitlines()) == 1, err
        assert not out.exists() and not partial(out).exists(), extra


def test_a_build_config_from_python_is_checked_naming_the_setting():
    import pytest

    from dti_fast.world.base import BuildConfig

    for bad, message in [
        (dict(ema=1.5), "ema must be a number in [0, 1), got 1.5"),
        (dict(steps=0), "steps must be a positive integer, got 0"),
        (dict(lr=float("inf")), "lr must be positive and finite, got inf"),
        (dict(threads=0), "threads must be a positive integer, got 0"),
        (dict(offset_noise=0.3, pyramid=0.8), "give one of them"),
        (dict(zero_snr="yes"), "zero_snr must be true or false"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            BuildConfig(**bad).check()
    BuildConfig(lr=1, threads=None).check()  # an int learning rate is a number; no thread count: torch's


def test_world_gate_refuses_bad_settings_naming_the_flag_before_sampling(capsys):
    for extra, message in [
        (["--prompts", "0"], "argument --prompts: must be a positive integer"),
        (["--inference-steps", "0"], "argument --inference-steps: must be a positive integer"),
        (["--threads", "0"], "argument --threads: must be a positive integer"),
        (["--guidance", "nan"], "argument --guidance: must be a finite number >= 0"),
        (["--guidance", "-1"], "argument --guidance: must be a finite number >= 0"),
        (["--prompt-seed", "-2"], "argument --prompt-seed: must be an integer >= 0"),
    ]:
        code, err = refused(["world", "gate", *extra], capsys)
        assert code == 2 and message in err and "Traceback" not in err, (extra, err)


def test_the_toy_suite_refuses_bad_settings_naming_the_flag_before_any_work(tmp_path, capsys):
    for extra, message in [
        (["--world-draws", "0"], "argument --world-draws: must be a positive integer"),
        (["--slerp-steps", "1"], "--slerp-steps must be"),
        (["--slerp-pair", "dog,dog"], "--slerp-pair dog,dog: give two different toy concepts"),
    ]:
        code, err = refused(["suite", "--world", "toy", "--quick", "--output", str(tmp_path / "s"), *extra], capsys)
        assert code == 2 and message in err and "Traceback" not in err, (extra, err)
        assert not (tmp_path / "s").exists(), extra


def test_a_finished_build_killed_before_it_was_moved_into_place_is_moved_by_the_same_command(tmp_path):
    import shutil

    ref = tmp_path / "ref"
    done = subprocess.run(build_cmd(ref), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "model"
    shutil.copytree(ref, partial(out))  # as a kill between the last write and the rename leaves it
    other = subprocess.run(build_cmd(out, "--lr", "1e-3"), capture_output=True, text=True, timeout=120)
    assert other.returncode == 2 and "a finished build made with other settings (lr)" in other.stderr
    moved = subprocess.run(build_cmd(out), capture_output=True, text=True, timeout=120)
    assert moved.returncode == 0, moved.stderr[-2000:]
    assert "had finished; moving it into place" in moved.stdout and "unet step" not in moved.stdout
    assert_same_weights(ref, out)
    assert not partial(out).exists()

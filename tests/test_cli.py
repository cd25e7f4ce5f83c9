"""The dti-fast command: flags, job files, errors, the demo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from _shared import train_args

from dti_fast.cli import build_parser, load_job_file, main
from dti_fast.demo import demo_images_dir

TRAIN_FLAGS = [
    "--config",
    "--model",
    "--output",
    "--concept",
    "--method",
    "--steps",
    "--batch-size",
    "--max-batch",
    "--resolution",
    "--lr",
    "--no-scale-lr",
    "--kappa",
    "--beta",
    "--scale",
    "--init",
    "--weight-decay",
    "--seed",
    "--checkpoint-every",
    "--keep-checkpoints",
    "--resume",
    "--precision",
    "--device",
    "--validation-prompt",
    "--validation-inference-steps",
    "--export-ti-rescaled",
    "--no-progress",
    "--max-bad-steps",
    "--parallel",
    "--no-latent-cache",
    "--latent-cache-crops",
    "--text-cache",
    "--attention",
    "--gradient-checkpointing",
    "--channels-last",
    "--compile",
    "--optim-bits",
]


def test_train_help_documents_every_flag():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    text = train.format_help()
    for flag in TRAIN_FLAGS:
        assert flag in text, flag
    for action in train._actions:
        assert action.help, f"undocumented flag {action.option_strings}"


def test_console_script_help_runs():
    out = subprocess.run([sys.executable, "-m", "dti_fast.cli", "--help"], capture_output=True, text=True, check=True)
    for sub in ("train", "demo", "make-tiny-model", "optim-demo"):
        assert sub in out.stdout


def test_job_file_and_flags(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text(
        'model = "m"\noutput_dir = "out"\nsteps = 7\nscale_lr = false\n'
        '[[concept]]\nname = "dog"\nimages = "photos/dog"\ninit = "dog"\nclass = "dog"\n'
        '[[concept]]\nname = "bag"\nimages = "/abs/bag"\ninit = "red backpack"\nsteps = 3\n'
    )
    cfg = load_job_file(job)
    assert cfg["steps"] == 7 and cfg["scale_lr"] is False
    assert cfg["output_dir"] == tmp_path / "out"
    dog, bag = cfg["concepts"]
    assert dog.images == tmp_path / "photos/dog" and dog.class_noun == "dog" and dog.placeholder == "<dog>"
    assert bag.images == Path("/abs/bag") and bag.steps == 3


@pytest.mark.parametrize(
    "text, match",
    [
        ('model = "m"\nsteps = \n', "not valid TOML.*line 2"),
        ('model = "m"\nstepz = 3\n', "unknown key 'stepz'"),
        ('steps = "many"\n', "steps must be a number"),
        ('[[concept]]\nname = "x"\nimages = "y"\n', "concept #1 lacks init"),
        ('[[concept]]\nname = "x"\nimages = "y"\ninit = "dog"\ncolour = 1\n', "unknown key.*colour"),
    ],
)
def test_malformed_job_files_are_named(tmp_path, text, match):
    job = tmp_path / "job.toml"
    job.write_text(text)
    with pytest.raises(SystemExit, match=match):
        load_job_file(job)


def test_bad_flag_values_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--model", "m", "--output", "o", "--concept", "x:y:z", "--steps", "0"])
    assert "positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--concept", "only-a-name"])
    assert "NAME:IMAGES_DIR:INIT" in capsys.readouterr().err


def test_train_command_end_to_end(tmp_path, capsys):
    model = tmp_path / "tiny"
    assert main(["make-tiny-model", str(model), "--family", "sd"]) == 0
    assert (model / "model_index.json").exists()
    out = tmp_path / "out"
    code = main(train_args(model, out, 2))
    assert code == 0
    report = capsys.readouterr().out
    assert "Trained 2 concept(s) with DTI" in report and str(out / "dog") in report
    info = json.loads((out / "bag" / "concept.json").read_text())
    assert info["tokens"] == ["<bag>", "<bag>_1"] and info["steps"] == 2


def test_train_command_reports_bad_input_without_traceback(tmp_path, capsys):
    code = main(
        [
            "train",
            "--model",
            str(tmp_path / "missing-model"),
            "--output",
            str(tmp_path / "o"),
            "--concept",
            f"dog:{tmp_path / 'nowhere'}:dog",
            "--no-progress",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "dti-fast train: error:" in err and "nowhere" in err


def test_demo_runs_and_reports(tmp_path, capsys):
    from dti_fast.demo import run_demo

    results = run_demo(output=tmp_path / "demo", steps=3, progress=False)
    text = capsys.readouterr().out
    assert "Learned vector norms" in text
    assert set(results) == {"dti", "ti"}
    assert (tmp_path / "demo" / "dti" / "dog" / "samples.png").exists()
    assert (tmp_path / "demo" / "ti" / "backpack" / "learned_embeds.safetensors").exists()
    run_demo(output=tmp_path / "demo", steps=1, progress=False)  # a rerun replaces its own earlier output
    assert (tmp_path / "demo" / "dti" / "dog" / "samples.png").exists()


def test_demo_refuses_an_output_whose_method_folder_holds_other_files_and_leaves_them(tmp_path):
    from dti_fast.demo import run_demo

    mine = tmp_path / "here" / "dti" / "notes.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("mine")
    with pytest.raises(ValueError, match="holds files that the demo did not write"):
        run_demo(output=tmp_path / "here", steps=1, progress=False)
    assert mine.read_text() == "mine"


def test_demo_leaves_a_train_jobs_output_alone(tmp_path):
    """A `train` output holds the same lock file as the demo's jobs; the demo used to take that as its
    own earlier output and delete the user's trained concepts."""
    from dti_fast.demo import run_demo

    job = tmp_path / "work" / "ti"
    (job / "dog").mkdir(parents=True)
    (job / ".dti_fast.lock").write_text("")
    learned = job / "dog" / "learned_embeds.safetensors"
    learned.write_bytes(b"the user's concept")
    with pytest.raises(ValueError, match="holds files that the demo did not write"):
        run_demo(output=tmp_path / "work", steps=1, progress=False)
    assert learned.read_bytes() == b"the user's concept" and not (tmp_path / "work" / "dti").exists()


def test_throughput_flags_reach_the_config(tmp_path):
    from dti_fast.cli import _train_config

    args = build_parser().parse_args(
        [
            "train",
            "--model",
            "m",
            "--output",
            str(tmp_path),
            "--concept",
            f"dog:{demo_images_dir() / 'dog'}:dog",
            "--max-batch",
            "auto",
            "--no-latent-cache",
            "--latent-cache-crops",
            "4",
            "--text-cache",
            "--attention",
            "sdpa",
            "--gradient-checkpointing",
            "--channels-last",
            "--optim-bits",
            "8",
        ]
    )
    cfg = _train_config(args)
    assert cfg.max_batch == "auto" and cfg.latent_cache is False and cfg.latent_cache_crops == 4
    assert cfg.text_cache is True and cfg.gradient_checkpointing and cfg.channels_last and cfg.optim_bits == 8
    plain = _train_config(
        build_parser().parse_args(
            ["train", "--model", "m", "--output", str(tmp_path), "--concept", f"dog:{demo_images_dir() / 'dog'}:dog"]
        )
    )
    assert plain.latent_cache is True and plain.text_cache == "auto" and plain.max_batch is None


def test_job_file_accepts_auto_max_batch(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('model = "m"\noutput_dir = "out"\nmax_batch = "auto"\noptim_bits = 8\nlatent_cache = false\n')
    cfg = load_job_file(job)
    assert cfg["max_batch"] == "auto" and cfg["optim_bits"] == 8 and cfg["latent_cache"] is False


def test_xformers_without_the_package_exits_2_with_the_fix(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "xformers" else real(name, *a))
    code = main(
        [
            "train",
            "--model",
            "m",
            "--output",
            str(tmp_path / "o"),
            "--concept",
            f"dog:{demo_images_dir() / 'dog'}:dog",
            "--attention",
            "xformers",
            "--no-progress",
        ]
    )
    assert code == 2
    assert "pip install" in capsys.readouterr().err


@pytest.mark.parametrize(
    "device, message",
    [("gpu0", "'gpu0' is not a torch device"), ("cuda", "has no CUDA GPU that torch can use; use --device cpu")],
)
def test_a_device_this_machine_lacks_is_one_line_before_anything_loads(tmp_path, capsys, device, message):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code = main(
        [
            "train",
            "--model",
            str(tmp_path / "missing-model"),
            "--output",
            str(tmp_path / "o"),
            "--concept",
            f"dog:{demo_images_dir() / 'dog'}:dog",
            "--device",
            device,
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err


_SECOND_CTRL_C = r"""
import os, signal, sys, time
from dti_fast.train.run import StopSignals
StopSignals.process_exits_on_stop = {exits}
with StopSignals() as stop:
    os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: the command stops and writes its checkpoint
    while stop.signum is None:
        time.sleep(0.01)
print("stopped by SIGINT", flush=True)  # signals released; the process is on its way out
os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, before the exit
time.sleep(0.2)
sys.exit(130)
"""


@pytest.mark.parametrize("exits", [True, False])
def test_a_second_ctrl_c_after_the_stop_message_cannot_change_the_exit_status(exits):
    """In the dti-fast process a stopped command's release ignores further signals (exit 130, not killed by
    SIGINT); in-process callers get the default handler back, so there the same second SIGINT kills."""
    run = subprocess.run([sys.executable, "-c", _SECOND_CTRL_C.format(exits=exits)], capture_output=True, text=True)
    assert "stopped by SIGINT" in run.stdout
    assert run.returncode == (130 if exits else -signal.SIGINT), run.stderr


def test_release_without_a_stop_gives_the_handlers_back_even_in_the_dti_fast_process(monkeypatch):
    from dti_fast.train.run import StopSignals

    monkeypatch.setattr(StopSignals, "process_exits_on_stop", True)
    before = signal.getsignal(signal.SIGINT)
    with StopSignals():
        assert signal.getsignal(signal.SIGINT) is not before
    assert signal.getsignal(signal.SIGINT) is before  # a job that ended normally: exports answer Ctrl-C


def test_the_console_script_and_python_m_go_through_entry():
    """Both ways of starting the CLI mark the process as exiting with the command (see StopSignals)."""
    from importlib.metadata import entry_points

    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("dti-fast") == "dti_fast.cli:entry"
    probe = (
        "import runpy, sys; sys.argv = ['dti-fast', '--help']\n"
        "from dti_fast.train.run import StopSignals\n"
        "try:\n    runpy.run_module('dti_fast.cli', run_name='__main__')\n"
        "except SystemExit:\n    print(StopSignals.process_exits_on_stop)\n"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert run.stdout.strip().endswith("True")


_EXIT_PROBE = """
import atexit, sys, threading
{setup}
class Teardown:  # its __del__ runs only in the interpreter's teardown, which the CLI skips
    def __del__(self, write=__import__("os").write):
        write(1, b"teardown ran\\n")
keep = Teardown()
atexit.register(lambda: print("exit handler ran"))
print("buffered before the command")  # a pipe: block-buffered, so only a flush delivers it
import ctypes; ctypes.CDLL(None).printf(b"printed by C code\\n")  # the C library's own buffer, likewise
sys.argv = ["dti-fast", *{argv!r}]
from dti_fast.cli import entry
entry()
"""


@pytest.mark.parametrize(
    ("setup", "teardown"),
    [
        ("", False),
        ("sys.setprofile(lambda *a: None)", True),  # a profiler (python -m cProfile) writes its results at exit
        # a thread that lives until the main thread has ended: the usual exit joins it
        ("threading.Thread(target=lambda: (threading.main_thread().join(), print('thread done'))).start()", True),
    ],
    ids=["plain", "profiler", "running-thread"],
)
def test_the_console_script_exits_without_the_interpreter_teardown_but_keeps_what_an_exit_does(
    tmp_path, setup, teardown
):
    """``entry()`` runs the exit handlers, flushes stdout/stderr and keeps the exit status, then skips the
    interpreter's teardown (1.2-2 s after diffusers loaded), except with a profiler/tracer or a live thread."""
    for argv, status, says in [
        (["optim-demo"], 0, "unit sphere"),
        (["train", "--model", str(tmp_path / "m"), "--output", str(tmp_path / "o"),
          "--concept", f"dog:{tmp_path / 'nowhere'}:dog"], 2, "nowhere"),
    ]:  # fmt: skip
        probe = _EXIT_PROBE.format(setup=setup, argv=argv)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as in a plain shell
        run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env)
        assert run.returncode == status, run.stderr
        assert says in run.stdout + run.stderr
        assert "buffered before the command" in run.stdout and "exit handler ran" in run.stdout
        assert "printed by C code" in run.stdout
        assert ("teardown ran" in run.stdout) is teardown, run.stdout
        assert ("thread done" in run.stdout) is ("Thread" in setup)


def test_bad_input_fails_before_the_model_libraries_load_and_a_run_prints_no_library_chatter(tmp_path):
    """The CLI's quieting of diffusers/transformers (log level, weight-loading bars) does not import them:
    a command refused on bad input ends before diffusers loads; a real run's output has no library chatter."""
    probe = (
        "import sys; from dti_fast.cli import main\n"
        f"rc = main(['train', '--model', {str(tmp_path / 'm')!r}, '--output', {str(tmp_path / 'o')!r}, "
        f"'--concept', 'dog:{tmp_path / 'nowhere'}:dog'])\n"
        "print(rc, 'diffusers' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY")}
    bad = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    assert bad.stdout.split() == ["2", "False"], bad.stderr
    assert "nowhere" in bad.stderr

    model = tmp_path / "tiny"
    assert main(["make-tiny-model", str(model), "--family", "sd"]) == 0
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    run = subprocess.run(
        [sys.executable, "-m", "dti_fast.cli", *train_args(model, tmp_path / "out", 1)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    for chatter in ("Loading", "it/s]", "%|", "WARNING", "FutureWarning"):
        assert chatter not in run.stderr + run.stdout, chatter

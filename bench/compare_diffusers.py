"""dti-fast against diffusers' own ``examples/textual_inversion/textual_inversion.py``, run as a script.

A user comparing trainers runs both command lines on the same model and photos;
this does that, interleaved, and reports medians::

    python bench/compare_diffusers.py --diffusers-checkout PATH [--rounds 3] [--job-rounds 1] [--out FILE.json]
        [--model DIR|sd15] [--resolution PX] [--batch N] [--precision fp32|bf16] [--steps N] [--threads N]
        [--job-concepts N] [--job-script-runs K]

``PATH`` is a diffusers checkout (or any folder holding
``examples/textual_inversion/textual_inversion.py``); ``DTI_DIFFUSERS_CHECKOUT``
may name it instead. Nothing from it is copied: the script runs as it is, in a
subprocess (``python bench/_run_example.py SCRIPT ARGS``: the launcher only
provides the script's one torchvision transform where no torchvision imports,
see that file and bench/README.md).

Both sides, every run a fresh process (imports, model load and start-up
included, as a user sees them):

- the same model: the tiny random-weight SD model (``dti-fast
  make-tiny-model --family sd``; ``--model`` takes another folder, or
  ``sd15``: SD 1.5's architecture with random weights), 64 px
  (``--resolution``), batch 1 (``--batch``), 100 steps (``--steps``), seed 0,
  fp32 (``--precision bf16``: the script's ``--mixed_precision bf16``,
  dti-fast's ``--precision bf16``), ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` =
  ``--threads`` (default 1: the machine's other processes stall a second
  thread); on a machine with CUDA both sides train there;
- one concept: the five ``dog`` photos shipped in ``dti_fast/assets``,
  initializer ``dog``; the job: ``--job-concepts`` (default 8) concepts
  cycling through the four shipped subjects (``<c0>`` ...), single-token
  initializers, as that many sequential script runs (``--job-script-runs``
  runs only the first few and counts the rest at their mean wall clock) and
  one dti-fast job;
- the script with its defaults otherwise (AdamW over the full embedding
  table, lr 1e-4, constant schedule, DataLoader without workers, no
  checkpoint before step 500); dti-fast with its defaults (DTI).

What is measured:

- training-loop steps/s, from each side's own progress output stamped by this
  process as each line arrives: the script's tqdm bar (``TQDM_MININTERVAL=0``
  makes it print every step; tqdm reads that variable itself) and dti-fast's
  plain progress lines (``--progress-interval 0``: one line per step). The
  loop is timed from the first step's line to the last one's, so both sides'
  first (warm-up) step and everything before and after the loop are outside;
- wall clock per run (process start to exit);
- concepts per hour: N * 3600 / (the dti-fast job's wall clock) against
  N * 3600 / (the sum of the N script runs' wall clocks).

Rounds alternate which side runs first; the figures are medians over rounds
(the job comparison is one round unless ``--job-rounds`` says more). The load average is recorded with every run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPT_REL = Path("examples/textual_inversion/textual_inversion.py")
ASSETS = HERE.parent / "dti_fast" / "assets" / "dreambooth_mini"
#: The shipped subjects and single-token initializers (the script needs one token).
SUBJECTS = (("dog", "dog"), ("cat2", "cat"), ("clock", "clock"), ("backpack", "backpack"))
ONE_CONCEPT = ("dog", "dog")
GOALS = {"one_concept_loop": 1.5, "concepts_per_hour": 4.0}

_TQDM_STEP = re.compile(rb"Steps:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")
_DTI_STEP = re.compile(rb"dti-fast: training (\d+)/(\d+) concept-steps")


def find_script(checkout: str | os.PathLike | None) -> Path | None:
    """The example script in ``checkout`` (or ``$DTI_DIFFUSERS_CHECKOUT``), or None when neither is given."""
    root = checkout or os.environ.get("DTI_DIFFUSERS_CHECKOUT")
    if not root:
        return None
    script = Path(root) / SCRIPT_REL
    if not script.is_file():
        raise SystemExit(f"no {SCRIPT_REL} under {root}: give the root of a diffusers checkout")
    return script


def script_revision(script: Path) -> dict:
    """The script's sha256 and, when the checkout is a git work tree, its commit."""
    info = {"path": str(script), "sha256": hashlib.sha256(script.read_bytes()).hexdigest()}
    try:
        out = subprocess.run(
            ["git", "-C", str(script.parent), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if out.returncode == 0:
            info["git_commit"] = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


@dataclass
class RunResult:
    """One subprocess: its wall clock, the arrival time of each progress step, the load around it."""

    side: str
    argv: list[str]
    wall_seconds: float
    steps: dict[int, float] = field(default_factory=dict)  # progress count -> seconds since start
    load_before: tuple[float, ...] = ()
    load_after: tuple[float, ...] = ()
    returncode: int = 0

    def loop(self) -> tuple[int, float] | None:
        """(progress units, seconds) from the first step's line to the last one's."""
        done = sorted(n for n in self.steps if n > 0)
        if len(done) < 2:
            return None
        return done[-1] - done[0], self.steps[done[-1]] - self.steps[done[0]]

    def to_json(self) -> dict:
        loop = self.loop()
        return {
            "side": self.side,
            "wall_seconds": self.wall_seconds,
            "loop_units": loop[0] if loop else None,
            "loop_seconds": loop[1] if loop else None,
            "load_before": self.load_before,
            "load_after": self.load_after,
        }


def run_stamped(side: str, argv: list[str], env: dict, cwd: Path, pattern: re.Pattern, log: Path) -> RunResult:
    """Run ``argv``; stamp every progress line of stderr (split at ``\\r`` and ``\\n``) as it arrives."""
    load_before = os.getloadavg()
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    steps: dict[int, float] = {}
    pending = b""
    with open(log, "wb") as keep:
        while True:
            chunk = proc.stdout.read1(65536)
            now = time.perf_counter() - start
            if not chunk:
                break
            keep.write(chunk)
            pending += chunk
            *lines, pending = re.split(rb"[\r\n]", pending)
            for line in lines:
                m = pattern.search(line)
                if m:
                    steps.setdefault(int(m.group(1)), now)
    rc = proc.wait()
    wall = time.perf_counter() - start
    if rc != 0:
        tail = log.read_bytes()[-3000:].decode(errors="replace")
        raise RuntimeError(f"{side} run failed (exit {rc}): {' '.join(argv)}\n...{tail}")
    return RunResult(side, argv, wall, steps, load_before, os.getloadavg(), rc)


@dataclass
class Setup:
    script: Path
    model: Path
    python: str
    work: Path
    steps: int
    resolution: int
    threads: int
    batch: int = 1
    precision: str = "fp32"  # "fp32", or "bf16": the script's --mixed_precision bf16, dti-fast's --precision bf16

    def env(self) -> dict:
        env = dict(os.environ)
        env.update(
            OMP_NUM_THREADS=str(self.threads),
            MKL_NUM_THREADS=str(self.threads),
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            TQDM_MININTERVAL="0",
            PYTHONUNBUFFERED="1",
        )
        env.pop("PYTHONPATH", None)
        return env

    def script_run(self, tag: str, subject: str, init: str, placeholder: str) -> RunResult:
        out = self.work / f"script-{tag}"
        argv = [
            self.python,
            str(HERE / "_run_example.py"),
            str(self.script),
            "--pretrained_model_name_or_path",
            str(self.model),
            "--train_data_dir",
            str(ASSETS / subject),
            "--learnable_property",
            "object",
            "--placeholder_token",
            placeholder,
            "--initializer_token",
            init,
            "--resolution",
            str(self.resolution),
            "--train_batch_size",
            str(self.batch),
            "--mixed_precision",
            "bf16" if self.precision == "bf16" else "no",
            "--max_train_steps",
            str(self.steps),
            "--seed",
            "0",
            "--output_dir",
            str(out),
        ]
        return run_stamped("script", argv, self.env(), self.work, _TQDM_STEP, self.work / f"script-{tag}.log")

    def dti_run(self, tag: str, concepts: list[tuple[str, str, str]]) -> RunResult:
        out = self.work / f"dti-{tag}"
        cli = Path(self.python).parent / "dti-fast"  # the console script a user runs, beside this python
        start = [str(cli)] if cli.is_file() else [self.python, "-m", "dti_fast.cli"]
        argv = [*start, "train", "--model", str(self.model), "--output", str(out)]
        for name, subject, init in concepts:
            argv += ["--concept", f"{name}:{ASSETS / subject}:{init}"]
        argv += [
            "--steps",
            str(self.steps),
            "--batch-size",
            str(self.batch),
            "--precision",
            self.precision,
            "--resolution",
            str(self.resolution),
            "--seed",
            "0",
            "--progress-interval",
            "0",
        ]
        return run_stamped("dti-fast", argv, self.env(), self.work, _DTI_STEP, self.work / f"dti-{tag}.log")


def job_concepts(n: int = 8) -> list[tuple[str, str, str]]:
    """``n`` concepts ``c0``... cycling through the shipped subjects."""
    return [(f"c{i}", *SUBJECTS[i % len(SUBJECTS)]) for i in range(n)]


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def compare(
    setup: Setup,
    rounds: int,
    job_rounds: int,
    progress=print,
    *,
    job_size: int = 8,
    job_script_runs: int | None = None,
    on_update=None,
) -> dict:
    """Interleaved rounds of both sides; returns the JSON-able result.

    The job: ``job_size`` concepts as one dti-fast job against that many sequential script runs;
    ``job_script_runs`` (fewer than ``job_size``) runs only that many of them (the first ones) and
    counts the rest at their mean wall clock (the same procedure on other photos; stated in the
    result). ``on_update`` receives the result so far after every run (a JSON file rewritten
    then keeps what was measured if the comparison is stopped).
    """
    one: dict[str, list[RunResult]] = {"script": [], "dti-fast": []}
    job_script: list[list[RunResult]] = []
    job_dti: list[RunResult] = []
    concepts = job_concepts(job_size)
    measured = min(job_script_runs or job_size, job_size)

    def update() -> None:
        if on_update is not None:
            on_update(summarize(setup, one, job_script, job_dti, rounds, job_rounds, job_size))

    subject, init = ONE_CONCEPT
    for r in range(rounds):
        order = ("script", "dti-fast") if r % 2 == 0 else ("dti-fast", "script")
        for side in order:
            if side == "script":
                res = setup.script_run(f"one-{r}", subject, init, "<dog>")
            else:
                res = setup.dti_run(f"one-{r}", [("dog", subject, init)])
            one[side].append(res)
            progress(f"  one concept, round {r + 1}/{rounds}, {side}: {_describe(res)}")
            update()
    for r in range(job_rounds):
        order = ("script", "dti-fast") if r % 2 == 0 else ("dti-fast", "script")
        for side in order:
            if side == "script":
                runs = []
                for name, subj, ini in concepts[:measured]:
                    runs.append(setup.script_run(f"job-{r}-{name}", subj, ini, f"<{name}>"))
                job_script.append(runs)
                wall = sum(x.wall_seconds for x in runs)
                progress(
                    f"  {job_size} concepts, round {r + 1}/{job_rounds}, script: {measured} sequential runs, "
                    f"{wall:.1f} s wall"
                )
            else:
                res = setup.dti_run(f"job-{r}", concepts)
                job_dti.append(res)
                progress(f"  {job_size} concepts, round {r + 1}/{job_rounds}, dti-fast: one job, {_describe(res)}")
            update()
    return summarize(setup, one, job_script, job_dti, rounds, job_rounds, job_size)


def _describe(res: RunResult) -> str:
    loop = res.loop()
    unit = "concept-steps" if res.side == "dti-fast" else "steps"
    rate = f"{loop[0] / loop[1]:.1f} {unit}/s in the loop" if loop and loop[1] > 0 else "loop not seen"
    load = " ".join(f"{x:.2f}" for x in res.load_before)
    return f"{res.wall_seconds:.2f} s wall, {rate} (load {load})"


def summarize(
    setup: Setup, one: dict, job_script: list, job_dti: list, rounds: int, job_rounds: int, job_size: int = 8
) -> dict:
    def loop_rate(res: RunResult, per_unit: float = 1.0) -> float | None:
        loop = res.loop()
        return loop[0] * per_unit / loop[1] if loop and loop[1] > 0 else None

    script_rates = [x for x in map(loop_rate, one["script"]) if x]
    # dti-fast counts concept-steps; with one concept a concept-step is a step.
    dti_rates = [x for x in map(loop_rate, one["dti-fast"]) if x]
    s_rate, d_rate = _median(script_rates), _median(dti_rates)
    s_wall = _median([x.wall_seconds for x in one["script"]])
    d_wall = _median([x.wall_seconds for x in one["dti-fast"]])
    out: dict = {
        "what": "dti-fast CLI vs diffusers' examples/textual_inversion/textual_inversion.py run as a script",
        "device": _device_name(),
        "python": platform.python_version(),
        "packages": _versions(),
        "script": script_revision(setup.script),
        "torchvision": "none importable here: the script's RandomHorizontalFlip comes from bench/_torchvision_shim "
        "(PIL flip on torch.rand(1) < p), supplied by bench/_run_example.py; the script file is unchanged",
        "model": str(setup.model),
        "resolution": setup.resolution,
        "batch_size": setup.batch,
        "precision": setup.precision,
        "steps": setup.steps,
        "threads": setup.threads,
        "rounds": rounds,
        "job_rounds": job_rounds,
        "statistic": "median over rounds; rounds alternate which side runs first",
        "units": "script progress counts steps; dti-fast's counts concept-steps (= steps with one concept)",
        "loop_measure": "progress lines stamped on arrival: script tqdm (TQDM_MININTERVAL=0), dti-fast "
        "--progress-interval 0; from the first step's line to the last one's",
        "one_concept": {
            "script_loop_steps_per_second": s_rate,
            "dti_loop_steps_per_second": d_rate,
            "speedup_loop": s_rate and d_rate and d_rate / s_rate,
            "script_wall_seconds": s_wall,
            "dti_wall_seconds": d_wall,
            "speedup_wall": s_wall and d_wall and s_wall / d_wall,
            "runs": {k: [x.to_json() for x in v] for k, v in one.items()},
        },
    }
    if job_script and job_dti:
        measured = len(job_script[0])

        def per_job(values: list[float]) -> float:
            # The sequential runs of one job; with fewer measured, the rest at the measured mean.
            return sum(values) * job_size / len(values)

        s_job_wall = _median([per_job([x.wall_seconds for x in runs]) for runs in job_script])
        d_job_wall = _median([x.wall_seconds for x in job_dti])
        s_loops = [[x.loop()[1] for x in runs if x.loop()] for runs in job_script]
        s_job_loop = _median([per_job(v) for v in s_loops if v])
        d_job_loop = _median([x.loop()[1] for x in job_dti if x.loop()])
        out["job"] = {
            "concepts": job_size,
            "script_runs_measured": measured,
            "script_runs_counted_at_the_measured_mean": job_size - measured,
            "script_wall_seconds": s_job_wall,
            "dti_wall_seconds": d_job_wall,
            "script_concepts_per_hour": job_size * 3600 / s_job_wall,
            "dti_concepts_per_hour": job_size * 3600 / d_job_wall,
            "speedup_concepts_per_hour": s_job_wall / d_job_wall,
            "script_loop_seconds": s_job_loop,
            "dti_loop_seconds": d_job_loop,
            "speedup_concepts_per_hour_loop_only": s_job_loop / d_job_loop if s_job_loop and d_job_loop else None,
            "runs": {
                "script": [[x.to_json() for x in runs] for runs in job_script],
                "dti-fast": [x.to_json() for x in job_dti],
            },
        }
    out["goals"] = _goals(out, job_size)
    return out


def _goals(out: dict, job_size: int = 8) -> list[dict]:
    """The goals with the figures; each names its metric, device and case (as the GPU check's summary reads them)."""
    goals = []
    one = out["one_concept"]
    case = f"sd-{out['resolution']}px-batch{out['batch_size']}-{out['precision']}"
    common = {"device": out["device"], "case": case, "applies": True}
    for name, key, target in (
        ("one concept, training-loop steps/s >= 1.5x the script's", "speedup_loop", GOALS["one_concept_loop"]),
        ("one concept, wall clock per concept >= 1.5x the script's", "speedup_wall", GOALS["one_concept_loop"]),
    ):
        value = one.get(key)
        met = None if value is None else value >= target
        goals.append({"goal": name, "metric": f"script_{key}", "value": value, "target": target, "met": met, **common})
    job = out.get("job")
    value = job["speedup_concepts_per_hour"] if job else None
    goals.append(
        {
            "goal": f"{job_size} concepts per hour (wall clock) >= 4x the script's (one {job_size}-concept job vs "
            f"{job_size} sequential runs)",
            "metric": "script_speedup_concepts_per_hour",
            "value": value,
            "target": GOALS["concepts_per_hour"],
            "met": None if value is None else value >= GOALS["concepts_per_hour"],
            **common,
        }
    )
    return goals


def _f(x, spec: str, width: int, suffix: str = "") -> str:
    return ("-" if x is None else format(x, spec) + suffix).rjust(width)


def format_result(out: dict) -> str:
    one = out["one_concept"]
    lines = [
        f"dti-fast vs diffusers textual_inversion.py (script sha256 {out['script']['sha256'][:12]}"
        f"{', commit ' + out['script']['git_commit'][:12] if 'git_commit' in out['script'] else ''})",
        f"device: {out['device']}, {out['threads']} thread(s), {out['resolution']} px, batch {out['batch_size']}, "
        f"{out['precision']}, {out['steps']} steps, {out['rounds']} round(s) one concept, {out['job_rounds']} "
        "round(s) of the job, medians",
        f"torchvision: {out['torchvision']}",
        f"{'':<34}{'script':>12}{'dti-fast':>12}{'ratio':>9}",
        f"{'one concept: loop steps/s':<34}{_f(one['script_loop_steps_per_second'], '.1f', 12)}"
        f"{_f(one['dti_loop_steps_per_second'], '.1f', 12)}{_f(one['speedup_loop'], '.2f', 9, 'x')}",
        f"{'one concept: wall s':<34}{_f(one['script_wall_seconds'], '.2f', 12)}"
        f"{_f(one['dti_wall_seconds'], '.2f', 12)}{_f(one['speedup_wall'], '.2f', 9, 'x')}",
    ]
    job = out.get("job")
    if job:
        n = job["concepts"]
        lines += [
            f"{f'{n} concepts: wall s':<34}{job['script_wall_seconds']:>12.2f}{job['dti_wall_seconds']:>12.2f}"
            f"{job['speedup_concepts_per_hour']:>8.2f}x",
            f"{f'{n} concepts: concepts/hour':<34}{job['script_concepts_per_hour']:>12.0f}"
            f"{job['dti_concepts_per_hour']:>12.0f}{job['speedup_concepts_per_hour']:>8.2f}x",
            f"{f'{n} concepts: loop s (sum of runs)':<34}{_f(job['script_loop_seconds'], '.2f', 12)}"
            f"{_f(job['dti_loop_seconds'], '.2f', 12)}{_f(job['speedup_concepts_per_hour_loop_only'], '.2f', 9, 'x')}",
        ]
        if job["script_runs_counted_at_the_measured_mean"]:
            lines.append(
                f"  (script: {job['script_runs_measured']} of the {n} runs measured, the others counted at their mean)"
            )
    loads = [r["load_before"] for runs in one["runs"].values() for r in runs]
    lines.append("load average (1 min) before each run: " + ", ".join(f"{x[0]:.2f}" for x in loads))
    for g in out["goals"]:
        value = "n/a" if g["value"] is None else f"{g['value']:.2f}x"
        status = {True: "met", False: "missed", None: "not measured"}[g["met"]]
        lines.append(f"goal: {g['goal']}: {value} ({status})")
    return "\n".join(lines)


def _device_name() -> str:
    """The GPU both sides train on (both use CUDA when it is there), else the CPU model."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:  # pragma: no cover
        pass
    sys.path.insert(0, str(HERE))
    from _machine import cpu_model

    return cpu_model()


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "diffusers", "transformers", "accelerate", "dti-fast"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def tiny_model(folder: Path) -> Path:
    from dti_fast.testing.tiny import make_tiny_model

    if not (folder / "model_index.json").is_file():
        make_tiny_model(folder, "sd")
    return folder


def sd15_model(folder: Path) -> Path:
    """SD 1.5's architecture at full size with random weights (bf16, 2.1 GB; built on the GPU when there is one)."""
    import torch

    from dti_fast.testing.archs import make_full_size_model

    if not (folder / "model_index.json").is_file():
        device = "cuda" if torch.cuda.is_available() else "cpu"
        make_full_size_model(folder, "sd", dtype=torch.bfloat16, device=device)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--diffusers-checkout", help="root of a diffusers checkout (or $DTI_DIFFUSERS_CHECKOUT)")
    parser.add_argument(
        "--model",
        help="diffusers SD folder, or 'sd15': SD 1.5's architecture with random weights, built in the work folder "
        "(default: the tiny model, built there)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="one-concept rounds (default 3)")
    parser.add_argument("--job-rounds", type=int, default=1, help="8-concept rounds (default 1)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of both sides (default 1)")
    parser.add_argument("--batch", type=int, default=1, help="images per step, both sides (default 1)")
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="fp32, or bf16: the script's --mixed_precision bf16 against dti-fast's --precision bf16 (default fp32)",
    )
    parser.add_argument("--job-concepts", type=int, default=8, help="concepts of the job comparison (default 8)")
    parser.add_argument(
        "--job-script-runs",
        type=int,
        help="run only this many of the job's sequential script runs; the others count at their mean wall clock "
        "(default: all)",
    )
    parser.add_argument("--work", help="folder for models, outputs and logs (default: a temporary one)")
    parser.add_argument("--out", help="write the result as JSON here")
    parser.add_argument("--note", help="free text stored in the JSON (e.g. the diffusers commit of an archive)")
    args = parser.parse_args(argv)
    script = find_script(args.diffusers_checkout)
    if script is None:
        parser.error("give --diffusers-checkout PATH or set DTI_DIFFUSERS_CHECKOUT")
    with tempfile.TemporaryDirectory(prefix="dti-cmp-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.model == "sd15":
            model = sd15_model(work / "sd15")
        else:
            model = Path(args.model) if args.model else tiny_model(work / "tiny-sd")
        setup = Setup(
            script,
            model,
            sys.executable,
            work,
            args.steps,
            args.resolution,
            args.threads,
            batch=args.batch,
            precision=args.precision,
        )

        def write(result: dict) -> None:
            if args.out:
                result["note"] = args.note
                tmp_out = Path(str(args.out) + ".partial")
                tmp_out.write_text(json.dumps(result, indent=1))
                os.replace(tmp_out, args.out)

        out = compare(
            setup,
            args.rounds,
            args.job_rounds,
            progress=lambda s: print(s, flush=True),
            job_size=args.job_concepts,
            job_script_runs=args.job_script_runs,
            on_update=write,
        )
    out["note"] = args.note
    print(format_result(out))
    write(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""pytest setup of the benchmarks in bench/.

- Collects ``bench_*.py`` when pytest is pointed at the folder (``pytest bench``;
  pytest.ini only collects ``test_*.py``). A file named on the command line is
  collected by pytest itself.
- ``bench_results``: a session-wide list the benchmarks append their timings to.
- At the end of the session prints the ratio table of each benchmark that ran
  (optimizer, trainer) and, when ``DTI_BENCH_OUT`` names a file, writes it
  there as JSON (with both suites in one session: ``NAME.optimizer.json`` and
  ``NAME.trainer.json`` beside it). Ratios are
  reported against the performance goals, never asserted. ``DTI_BENCH_NOTE``
  adds a free-text note (machine state, ...) to the JSON.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import pytest
from _machine import cpu_model

_RESULTS = pytest.StashKey[list]()
_LOAD_START = pytest.StashKey[list]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_RESULTS] = []
    config.stash[_LOAD_START] = _loadavg()


def pytest_collect_file(parent: pytest.Collector, file_path: Path):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture
def bench_results(request: pytest.FixtureRequest) -> list:
    return request.config.stash[_RESULTS]


def _loadavg() -> list:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# -- the optimizer summary ------------------------------------------------------

# (description, case id, metric key, target, comparison); metric keys are those
# of a case in the summary. Goals are reported, not asserted.
_CPU_GOALS = [
    ("CPU vectorized >= 2x per-param loop at 1000 x 4 x 768", "1000x4x768-separate", "speedup_vectorized_vs_loop", 2.0),
    ("CPU vectorized >= 8x per-param loop at 1000 x 1 x 64", "1000x1x64-separate", "speedup_vectorized_vs_loop", 8.0),
]
_GPU_GOALS = [
    (
        "GPU kernel >= 90% of copy bandwidth at 1M rows x 768",
        "1000000x1x768-packed",
        "kernel_fraction_of_copy_gbps",
        0.90,
    ),
    ("GPU kernel >= 20x per-param loop at 1000 x 4 x 768", "1000x4x768-separate", "speedup_kernel_vs_loop", 20.0),
    ("GPU kernel >= 20x per-param loop at 1000 x 4 x 2048", "1000x4x2048-separate", "speedup_kernel_vs_loop", 20.0),
    ("GPU kernel >= 20x per-param loop at 1000 x 1 x 64", "1000x1x64-separate", "speedup_kernel_vs_loop", 20.0),
]


def _ratio(num, den):
    return num / den if num and den else None


def _optimizer_summary(records: list, load_start: list) -> dict:
    cases: dict[str, dict] = {}
    for r in records:
        c = cases.setdefault(
            r["case"],
            {k: r[k] for k in ("case", "concepts", "vectors", "dim", "rows", "layout")}
            | {"step_bytes": None, "median_ms": {}, "min_ms": {}, "rounds": {}, "gbps": {}},
        )
        c["median_ms"][r["path"]] = r["median_s"] * 1e3
        c["min_ms"][r["path"]] = r["min_s"] * 1e3
        c["rounds"][r["path"]] = r["rounds"]
        if r["path"] != "copy":
            c["step_bytes"] = r["bytes"]
        if r["cuda"]:
            c["gbps"][r["path"]] = r["bytes"] / r["median_s"] / 1e9
    for c in cases.values():
        med, mn = c["median_ms"], c["min_ms"]
        # Speedups: per-param-loop time over the path's time (> 1: faster than the loop).
        c["speedup_vectorized_vs_loop"] = _ratio(med.get("loop"), med.get("vectorized"))
        c["speedup_kernel_vs_loop"] = _ratio(med.get("loop"), med.get("kernel"))
        c["speedup_vectorized_vs_loop_min"] = _ratio(mn.get("loop"), mn.get("vectorized"))
        c["speedup_kernel_vs_loop_min"] = _ratio(mn.get("loop"), mn.get("kernel"))
        c["kernel_fraction_of_copy_gbps"] = _ratio(c["gbps"].get("kernel"), c["gbps"].get("copy"))
        if c["layout"] == "packed":
            # The same rows stepped the authors' way: one param per concept, in a loop.
            sep = cases.get(c["case"].replace("-packed", "-separate"))
            loop_sep = sep["median_ms"].get("loop") if sep else None
            c["speedup_vectorized_vs_separate_loop"] = _ratio(loop_sep, med.get("vectorized"))
            c["speedup_kernel_vs_separate_loop"] = _ratio(loop_sep, med.get("kernel"))
        if not c["gbps"]:
            del c["gbps"]
    cuda = any(r["cuda"] for r in records)
    goals = []
    for desc, case_id, key, target in _GPU_GOALS if cuda else _CPU_GOALS:
        value = cases.get(case_id, {}).get(key)
        goals.append(
            {
                "goal": desc,
                "case": case_id,
                "metric": key,
                "target": target,
                "value": value,
                "met": None if value is None else value >= target,
            }
        )
    try:
        import torch

        versions = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    except Exception:  # pragma: no cover
        versions = {}
    try:
        import triton

        versions["triton"] = triton.__version__
    except Exception:
        versions["triton"] = None
    return {
        "suite": "dti_fast optimizer step (bench/bench_optimizer.py)",
        "date": datetime.date.today().isoformat(),
        "device": records[0]["device"] if records else None,
        "cuda": cuda,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        **versions,
        "note": os.environ.get("DTI_BENCH_NOTE") or None,
        "loadavg_start": load_start,
        "loadavg_end": _loadavg(),
        "statistic": "median of timed rounds (min-based speedups in *_min)",
        "hyperparameters": {"lr": 0.01, "kappa": 1e-4, "beta": 0.0, "eps": 1e-8, "dtype": "float32"},
        "definitions": {
            "speedup_X_vs_loop": "per-param loop time / X time, same case and layout",
            "speedup_X_vs_separate_loop": "packed cases: per-param loop over separate params / X on the packed param",
            "gbps": "step: (param read+write, grad read, prior read, row state read+write) bytes / time; "
            "copy: 2 x bytes(param+grad) / time",
            "kernel_fraction_of_copy_gbps": "kernel GB/s / copy GB/s",
        },
        "cases": list(cases.values()),
        "goals": goals,
    }


def _round(x):
    if isinstance(x, float):
        return float(f"{x:.4g}")
    if isinstance(x, dict):
        return {k: _round(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_round(v) for v in x]
    return x


def _compact_json(summary: dict) -> str:
    """One line per top-level key, per case and per goal; floats to 4 significant digits."""
    lines = []
    for key, value in summary.items():
        if key in ("cases", "goals"):
            items = ",\n".join("  " + json.dumps(_round(v)) for v in value)
            lines.append(f" {json.dumps(key)}: [\n{items}\n ]")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(_round(value))}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _fmt(x, spec: str, width: int, suffix: str = "") -> str:
    return ("-" if x is None else format(x, spec) + suffix).rjust(width)


def _print_table(tr, summary: dict) -> None:
    tr.write_sep("=", "SphericalSGD step: ratios (median time; reported, not asserted)")
    tr.write_line(
        f"device: {summary['device']}  (torch {summary.get('torch')}, "
        f"threads {summary.get('threads')}, load {summary['loadavg_start']} -> {summary['loadavg_end']})"
    )
    tr.write_line("speedup columns: per-param loop time / path time (higher is faster)")
    cuda = summary["cuda"]
    head = f"{'case':<24}{'loop ms':>10}{'vect ms':>10}{'kern ms':>10}{'vect/loop':>11}{'kern/loop':>11}"
    if cuda:
        head += f"{'kern GB/s':>11}{'copy GB/s':>11}{'kern/copy':>11}"
    tr.write_line(head)
    for c in summary["cases"]:
        m = c["median_ms"]
        line = (
            f"{c['case']:<24}{_fmt(m.get('loop'), '.3f', 10)}{_fmt(m.get('vectorized'), '.3f', 10)}"
            f"{_fmt(m.get('kernel'), '.3f', 10)}{_fmt(c['speedup_vectorized_vs_loop'], '.2f', 11, 'x')}"
            f"{_fmt(c['speedup_kernel_vs_loop'], '.2f', 11, 'x')}"
        )
        if cuda:
            g = c.get("gbps", {})
            line += (
                f"{_fmt(g.get('kernel'), '.1f', 11)}{_fmt(g.get('copy'), '.1f', 11)}"
                f"{_fmt(c['kernel_fraction_of_copy_gbps'], '.1%', 11)}"
            )
        tr.write_line(line)
    for goal in summary["goals"]:
        status = {True: "met", False: "MISSED", None: "not measured"}[goal["met"]]
        value = "-" if goal["value"] is None else format(goal["value"], ".3g")
        tr.write_line(f"goal: {goal['goal']}: {value} (target {goal['target']}) -> {status}")


def _summaries(config: pytest.Config, final: bool) -> dict:
    """{suite: summary} of the suites with records (final, nothing ran: the empty optimizer summary)."""
    all_records = config.stash.get(_RESULTS, [])
    load_start = config.stash.get(_LOAD_START, [])
    out = {}
    records = [r for r in all_records if r.get("suite") == "optimizer"]
    trainer = [r for r in all_records if r.get("suite") == "trainer"]
    if records or (final and not trainer):
        out["optimizer"] = _optimizer_summary(records, load_start)
    if trainer:
        import _trainer_summary

        out["trainer"] = _trainer_summary.summarize(trainer, load_start, _loadavg())
    return out


def _write_summaries(summaries: dict) -> list:
    """Write to DTI_BENCH_OUT (one suite) or NAME.<suite>.json beside it (several); returns the paths."""
    path = Path(os.environ["DTI_BENCH_OUT"])
    written = []
    for suite, summary in summaries.items():
        target = path if len(summaries) == 1 else path.with_name(f"{path.stem}.{suite}{path.suffix}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(_compact_json(summary), encoding="utf-8")
        written.append(target)
    return written


def pytest_runtest_teardown(item: pytest.Item, nextitem) -> None:
    """After each trainer benchmark, rewrite the summary: a run stopped by a timeout keeps what it measured."""
    if os.environ.get("DTI_BENCH_OUT") and item.path.name == "bench_trainer.py":
        _write_summaries(_summaries(item.config, final=False))


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    out = os.environ.get("DTI_BENCH_OUT")
    summaries = _summaries(config, final=True)
    optimizer = summaries.get("optimizer")
    if not out and "trainer" not in summaries and not optimizer["cases"]:
        return
    if optimizer and optimizer["cases"]:
        _print_table(terminalreporter, optimizer)
    if "trainer" in summaries:
        import _trainer_summary

        _trainer_summary.print_table(terminalreporter, summaries["trainer"])
    if out:
        for target in _write_summaries(summaries):
            terminalreporter.write_line(f"ratio summary written to {target}")

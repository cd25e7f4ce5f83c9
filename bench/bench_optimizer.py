"""Step time of SphericalSGD: Triton kernel, vectorized torch path, per-param loop.

Run: ``python -m pytest bench/bench_optimizer.py --benchmark-only``
(``DTI_BENCH_OUT=ratios.json`` also writes the ratio summary; see bench/README.md).

Every case steps ``concepts x vectors`` rows of ``dim`` fp32 elements with the
paper's defaults (lr 0.01, kappa 1e-4 with a vMF prior, beta 0, eps 1e-8), laid
out either as one param per concept (``separate``: ``concepts`` params of shape
``(vectors, dim)``) or as one packed param of shape ``(concepts * vectors, dim)``.
Gradients are fixed random tensors set once: only the optimizer step is timed.

Paths (the ``path`` parameter):

- ``kernel``: ``SphericalSGD(fused=True)``, the Triton kernel. CUDA only.
- ``vectorized``: ``SphericalSGD(fused=False)``, the batched torch path.
- ``loop``: a Python loop over the params calling
  :func:`dti_fast.sphere.spherical_sgd_step_reference` on each and copying the
  result back, the way the DTI authors' reference code steps.
- ``lean``: the leanest per-param loop of the same step, written out in the
  fewest torch ops (tangent projection, normalisation, update, retraction),
  with beta 0, no prior and no state: the baseline of issue 11's CPU goals
  (see :func:`interleaved_ratios`, which times it against the vectorized path
  in interleaved rounds).
- ``copy``: ``dst.copy_(src)`` of as many bytes as param + grad, the bandwidth
  yardstick for the kernel. CUDA only.

Beyond pytest-benchmark's per-case timings:

- :func:`interleaved_ratios` (``test_interleaved_vectorized_vs_lean_loop``,
  or ``python bench/bench_optimizer.py``): vectorized path, lean
  loop and reference loop timed in the same run, round by round in turn,
  medians, at 1 and 2 threads; the device is named in the output.
- ``test_launch_sweep`` (CUDA only): every candidate launch configuration of
  the Triton kernel per vector size and dtype, JSON written after every case.

Each timed call ends with ``torch.cuda.synchronize()`` on CUDA. The ratios
(vectorized / loop, kernel / loop, kernel GB/s / copy GB/s) are computed at the
end of the session by ``bench/conftest.py`` from the same run; they are
reported, never asserted.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from _machine import cpu_model

from dti_fast import SphericalSGD, pack_params_, spherical_sgd_step_reference, triton_available

LR = 0.01
KAPPA = 1e-4  # the paper's default, with a prior
BETA = 0.0  # the paper's default: every step is a unit tangent move
EPS = 1e-8

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")

# Seconds of timed rounds per benchmark (after two untimed calls); bounds below.
TARGET_S = float(os.environ.get("DTI_BENCH_TARGET_S", "1.0"))
MIN_ROUNDS = 5
MAX_ROUNDS = 10_000


@dataclass(frozen=True)
class Case:
    concepts: int
    vectors: int
    dim: int
    layout: str  # "separate" (one param per concept) or "packed" (one param)
    gpu_only: bool = False

    @property
    def rows(self) -> int:
        return self.concepts * self.vectors

    @property
    def id(self) -> str:
        return f"{self.concepts}x{self.vectors}x{self.dim}-{self.layout}"


CASES = [
    Case(concepts, 4, dim, layout)
    for concepts in (1, 100, 1000)
    for dim in (768, 2048)
    for layout in ("separate", "packed")
]
CASES += [Case(1000, 1, 64, layout) for layout in ("separate", "packed")]
# The bandwidth goal: a million rows of 768 in one packed param (9 GB of fp32
# param, grad and prior). GPU only.
CASES += [Case(1_000_000, 1, 768, "packed", gpu_only=True)]

PATHS = ("kernel", "vectorized", "loop", "lean", "copy")

_NO_CUDA_KERNEL = (
    "the Triton kernel needs CUDA; on the CPU it only runs under TRITON_INTERPRET=1, "
    "which is a correctness tool, not a performance path"
)
_NO_CUDA_COPY = "the device-to-device copy is the kernel's bandwidth yardstick: CUDA only"
_GPU_ONLY_CASE = "1M rows x 768 is the GPU bandwidth case (9 GB of tensors): CUDA only"


def _params():
    out = []
    for case in CASES:
        for path in PATHS:
            marks = []
            if case.gpu_only and not CUDA:
                marks.append(pytest.mark.skip(reason=_GPU_ONLY_CASE))
            elif path == "kernel" and not CUDA:
                marks.append(pytest.mark.skip(reason=_NO_CUDA_KERNEL))
            elif path == "kernel" and not triton_available():
                marks.append(pytest.mark.skip(reason="Triton does not import here"))
            elif path == "copy" and not CUDA:
                marks.append(pytest.mark.skip(reason=_NO_CUDA_COPY))
            out.append(pytest.param(case, path, id=f"{case.id}-{path}", marks=marks))
    return out


def device_name() -> str:
    """The GPU's name on CUDA, else the CPU model from /proc/cpuinfo."""
    if CUDA:
        return torch.cuda.get_device_name(DEVICE)
    return cpu_model()


def step_bytes(case: Case, elem: int = 4) -> int:
    """Bytes one step must move: param read + write, grad read, prior read (fp32),
    row state ``s`` read + write (fp32, one per row)."""
    return case.rows * case.dim * (2 * elem + elem + 4) + case.rows * 4 * 2


def copy_bytes(case: Case, elem: int = 4) -> int:
    """Bytes a copy of a tensor the size of param + grad moves (read + write)."""
    return 2 * case.rows * case.dim * 2 * elem


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize(DEVICE)


def _unit_rows(rows: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(rows, dim, device=DEVICE, generator=gen)
    return x.div_(torch.linalg.vector_norm(x, dim=-1, keepdim=True))


def _make_problem(case: Case):
    """Unit params with fixed random grads set once, and unit vMF means."""
    gen = torch.Generator(device=DEVICE).manual_seed(20251213)
    v = _unit_rows(case.rows, case.dim, gen)
    mu = _unit_rows(case.rows, case.dim, gen)
    g = torch.randn(case.rows, case.dim, device=DEVICE, generator=gen).mul_(1e-2)
    if case.layout == "packed":
        params = [torch.nn.Parameter(v)]
        grads = [g]
        priors = [mu]
    else:
        k = case.vectors
        params = [torch.nn.Parameter(v[i * k : (i + 1) * k].clone()) for i in range(case.concepts)]
        grads = [g[i * k : (i + 1) * k].clone() for i in range(case.concepts)]
        priors = [mu[i * k : (i + 1) * k].clone() for i in range(case.concepts)]
        del v, g, mu
    for p, grad in zip(params, grads):
        p.grad = grad
    return params, priors


def _optimizer_step(case: Case, fused: bool) -> Callable[[], None]:
    params, priors = _make_problem(case)
    opt = SphericalSGD([{"params": params, "prior": priors}], lr=LR, kappa=KAPPA, beta=BETA, eps=EPS, fused=fused)
    del priors  # the optimizer keeps its own normalized fp32 copy

    def step() -> None:
        opt.step()
        _sync()

    return step


def _loop_step(case: Case) -> Callable[[], None]:
    """Param by param through the reference, as the DTI authors' code steps."""
    params, priors = _make_problem(case)
    states = [torch.zeros(p.shape[:-1], device=DEVICE) for p in params]
    t = [0]

    @torch.no_grad()
    def step() -> None:
        t[0] += 1
        for p, s, mu in zip(params, states, priors):
            new_v, new_s = spherical_sgd_step_reference(
                p, p.grad, s, t[0], lr=LR, kappa=KAPPA, mu=mu, beta=BETA, eps=EPS
            )
            p.copy_(new_v)
            s.copy_(new_s)
        _sync()

    return step


def lean_loop(params: list[torch.Tensor], lr: float = LR, eps: float = EPS) -> None:
    """The leanest per-param loop of one SphericalSGD step with beta 0, no prior, no state.

    Per param: tangent projection, normalisation by the tangent norm (beta 0
    makes s = ||g||^2), update and retraction, in six torch ops and a copy.
    """
    with torch.no_grad():
        for p in params:
            v, g = p, p.grad
            gv = torch.linalg.vecdot(g, v).unsqueeze_(-1)
            tangent = torch.addcmul(g, v, gv, value=-1.0)
            norm = torch.linalg.vector_norm(tangent, dim=-1, keepdim=True).add_(eps)
            new = torch.addcdiv(v, tangent, norm, value=-lr)
            p.copy_(new.div_(torch.linalg.vector_norm(new, dim=-1, keepdim=True)))


def plain_batched(params: list[torch.Tensor], lr: float = LR, eps: float = EPS) -> None:
    """The same step as :func:`lean_loop` written as one plain batched computation.

    Concatenate the rows and grads, the row math on the block, one
    ``torch._foreach_copy_`` back into the params: no checks, no state, no
    caching. Written after issue 11's outside measurement of such a version,
    as a yardstick for the vectorized path's own overhead (it assumes every
    param is ``(vectors, dim)`` fp32 with a grad).
    """
    with torch.no_grad():
        v = torch.cat(params)
        g = torch.cat([p.grad for p in params])
        gv = torch.linalg.vecdot(g, v).unsqueeze_(-1)
        tangent = torch.addcmul(g, v, gv, value=-1.0)
        norm = torch.linalg.vector_norm(tangent, dim=-1, keepdim=True).add_(eps)
        new = torch.addcdiv(v, tangent, norm, value=-lr)
        new.div_(torch.linalg.vector_norm(new, dim=-1, keepdim=True))
        torch._foreach_copy_(params, list(new.split([p.shape[0] for p in params])))


def _lean_step(case: Case) -> Callable[[], None]:
    params, _ = _make_problem(case)

    def step() -> None:
        lean_loop(params)
        _sync()

    return step


def _copy_step(case: Case) -> Callable[[], None]:
    n = case.rows * case.dim * 2  # fp32 elements of param + grad
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    src = torch.randn(n, device=DEVICE, generator=gen)  # never time on zeros
    dst = torch.empty_like(src)

    def step() -> None:
        dst.copy_(src)
        _sync()

    return step


def _run(benchmark, fn: Callable[[], None]) -> None:
    """Untimed calls (state init, compilation, caches; the fastest of the last
    three sizes the run), then enough timed rounds for about TARGET_S seconds
    (MIN_ROUNDS..MAX_ROUNDS)."""
    fn()
    once = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        once = min(once, time.perf_counter() - t0)
    once = max(once, 1e-7)
    rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, math.ceil(TARGET_S / once))))
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)


@pytest.fixture(autouse=True)
def _release_memory():
    yield
    import gc

    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


@pytest.mark.parametrize(("case", "path"), _params())
def test_step(benchmark, bench_results, case: Case, path: str) -> None:
    benchmark.group = case.id
    if path == "kernel":
        fn = _optimizer_step(case, fused=True)
        nbytes = step_bytes(case)
    elif path == "vectorized":
        fn = _optimizer_step(case, fused=False)
        nbytes = step_bytes(case)
    elif path == "loop":
        fn = _loop_step(case)
        nbytes = step_bytes(case)
    elif path == "lean":
        fn = _lean_step(case)
        nbytes = step_bytes(case)
    else:
        fn = _copy_step(case)
        nbytes = copy_bytes(case)
    info = benchmark.extra_info
    info.update(
        device=device_name(),
        path=path,
        concepts=case.concepts,
        vectors=case.vectors,
        dim=case.dim,
        rows=case.rows,
        layout=case.layout,
        dtype="float32",
        bytes=nbytes,
    )
    if not CUDA:
        info["threads"] = torch.get_num_threads()

    _run(benchmark, fn)

    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing timed
        return
    stats = benchmark.stats.stats
    if CUDA:
        info["gbps"] = nbytes / stats.median / 1e9
    bench_results.append(
        dict(
            suite="optimizer",
            case=case.id,
            concepts=case.concepts,
            vectors=case.vectors,
            dim=case.dim,
            rows=case.rows,
            layout=case.layout,
            path=path,
            device=info["device"],
            cuda=CUDA,
            bytes=nbytes,
            median_s=stats.median,
            min_s=stats.min,
            rounds=stats.rounds,
        )
    )


# -- interleaved: vectorized path against the lean loop, same run -----------------------------------

#: The CPU goals of issue 11, as (concepts, vectors, dim): vectorized >= 2x and >= 8x the lean loop.
INTERLEAVED_CASES = [(1000, 4, 768), (1000, 1, 64)]


def interleaved_ratios(
    cases: list[tuple[int, int, int]] = INTERLEAVED_CASES,
    rounds: int = 30,
    threads: tuple[int, ...] = (1, 2),
) -> dict:
    """Time the vectorized path, the lean loop, the reference loop and a plain batched step in interleaved rounds.

    Every case is ``concepts`` params of shape ``(vectors, dim)`` (fp32, beta 0,
    no prior, lr 0.01). Each round runs every path once, so that load from
    other processes hits all paths alike; the rounds go through every order of
    the paths in turn, so that each path follows each other one equally often
    (a path that runs right after a 30 ms loop finds colder caches). The
    medians over ``rounds`` give the ratios (lean loop time / path time,
    higher is faster). ``plain_batched`` (:func:`plain_batched`) is the
    floor of a batched step without the optimizer's checks and state.
    Returns a JSON-able dict naming the device and thread counts.
    """
    out = {
        "device": device_name(),
        "cuda": CUDA,
        "torch": torch.__version__,
        "rounds": rounds,
        "threads_note": "torch.set_num_threads per row",
        "load_average": {"start": os.getloadavg()},
        "statistic": "median over interleaved rounds",
        "step": "beta 0, no prior, lr 0.01, fp32",
        "results": [],
    }
    before = torch.get_num_threads()
    try:
        for n_threads in threads:
            if not CUDA:
                torch.set_num_threads(n_threads)
            for concepts, vectors, dim in cases:
                case = Case(concepts, vectors, dim, "separate")
                vec_params, _ = _make_problem(case)
                opt = SphericalSGD(vec_params, lr=LR, kappa=0.0, beta=0.0, eps=EPS, fused=False)
                packed_params, _ = _make_problem(case)
                pack_params_(packed_params)  # the same params, moved back to back into one tensor
                opt_packed = SphericalSGD(packed_params, lr=LR, kappa=0.0, beta=0.0, eps=EPS, fused=False)
                lean_params, _ = _make_problem(case)
                plain_params, _ = _make_problem(case)
                ref_params, _ = _make_problem(case)
                ref_states = [torch.zeros(p.shape[:-1], device=DEVICE) for p in ref_params]

                @torch.no_grad()
                def reference_loop() -> None:
                    for p, st in zip(ref_params, ref_states):
                        new_v, new_s = spherical_sgd_step_reference(p, p.grad, st, 1, lr=LR, beta=0.0, eps=EPS)
                        p.copy_(new_v)
                        st.copy_(new_s)

                fns = {
                    "vectorized": opt.step,
                    "vectorized_packed": opt_packed.step,
                    "lean_loop": lambda: lean_loop(lean_params),
                    "reference_loop": reference_loop,
                    "plain_batched": lambda: plain_batched(plain_params),
                }
                times: dict[str, list[float]] = {k: [] for k in fns}
                for fn in fns.values():  # warm-up: state, caches
                    fn()
                    _sync()
                orders = list(itertools.permutations(fns))
                for r in range(rounds):
                    for k in orders[r % len(orders)]:
                        t0 = time.perf_counter()
                        fns[k]()
                        _sync()
                        times[k].append(time.perf_counter() - t0)
                med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
                out["results"].append(
                    {
                        "case": f"{concepts}x({vectors},{dim})",
                        "threads": n_threads if not CUDA else None,
                        "median_ms": {k: v * 1e3 for k, v in med.items()},
                        "vectorized_vs_lean_loop": med["lean_loop"] / med["vectorized"],
                        "vectorized_vs_reference_loop": med["reference_loop"] / med["vectorized"],
                        "vectorized_packed_vs_lean_loop": med["lean_loop"] / med["vectorized_packed"],
                        "plain_batched_vs_lean_loop": med["lean_loop"] / med["plain_batched"],
                    }
                )
    finally:
        torch.set_num_threads(before)
    out["load_average"]["end"] = os.getloadavg()
    return out


def format_interleaved(result: dict) -> str:
    """The interleaved ratios as a small table."""
    lines = [
        f"device: {result['device']} (torch {result['torch']}, {result['rounds']} interleaved rounds, medians)",
        "load average (1, 5, 15 min): start {}, end {}".format(
            *(" ".join(f"{x:.2f}" for x in result["load_average"][k]) for k in ("start", "end"))
        ),
        f"{'case':<16}{'threads':>8}{'vect ms':>10}{'packed ms':>10}{'lean ms':>10}{'ref ms':>10}{'plain ms':>10}"
        f"{'vect/lean':>11}{'packed/lean':>12}{'vect/ref':>10}{'plain/lean':>12}",
    ]
    for r in result["results"]:
        m = r["median_ms"]
        lines.append(
            f"{r['case']:<16}{str(r['threads']):>8}{m['vectorized']:>10.2f}{m['vectorized_packed']:>10.2f}"
            f"{m['lean_loop']:>10.2f}{m['reference_loop']:>10.2f}{m['plain_batched']:>10.2f}"
            f"{r['vectorized_vs_lean_loop']:>10.2f}x{r['vectorized_packed_vs_lean_loop']:>11.2f}x"
            f"{r['vectorized_vs_reference_loop']:>9.2f}x{r['plain_batched_vs_lean_loop']:>11.2f}x"
        )
    return "\n".join(lines)


def test_interleaved_vectorized_vs_lean_loop(capsys) -> None:
    """Prints (and with ``DTI_BENCH_INTERLEAVED_OUT`` writes) the interleaved ratios; asserts nothing."""
    rounds = int(os.environ.get("DTI_BENCH_ROUNDS", "30"))
    result = interleaved_ratios(rounds=rounds)
    with capsys.disabled():
        print("\n" + format_interleaved(result))
    path = os.environ.get("DTI_BENCH_INTERLEAVED_OUT")
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


# -- GPU: launch configuration sweep ---------------------------------------------------------------

SWEEP_DIMS = (64, 768, 1280, 2048, 2304, 4096)
SWEEP_DTYPES = (torch.float32, torch.bfloat16)
#: Elements per tensor in a sweep case (256 MB of fp32 params): large enough to be bandwidth-bound.
SWEEP_ELEMENTS = 1 << 26


@pytest.mark.skipif(not CUDA or not triton_available(), reason="the launch sweep times the Triton kernel on CUDA")
def test_launch_sweep() -> None:
    """Time every :func:`~dti_fast.kernels.spherical_sgd.launch_candidates` config per (D, dtype).

    One packed param of ``SWEEP_ELEMENTS // D`` rows, the paper's step (prior,
    beta 0); CUDA-event medians of 20 launches after 3 warm-ups; GB/s over the
    bytes a step must move. The JSON (``DTI_SWEEP_OUT``, default
    ``launch_sweep.json``) is rewritten after every case, so a sweep cut short
    keeps what it measured; the fastest config per (D, dtype) is the one to put
    in ``LAUNCH_TABLE``.
    """
    from dti_fast.kernels import spherical_sgd as kmod

    path = os.environ.get("DTI_SWEEP_OUT", "launch_sweep.json")
    out = {"device": device_name(), "torch": torch.__version__, "elements": SWEEP_ELEMENTS, "cases": []}
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    for dim in SWEEP_DIMS:
        rows = SWEEP_ELEMENTS // dim
        for dtype in SWEEP_DTYPES:
            v = _unit_rows(rows, dim, gen).to(dtype)
            g = torch.randn(rows, dim, device=DEVICE, generator=gen).mul_(1e-2).to(dtype)
            mu = _unit_rows(rows, dim, gen)
            s = torch.zeros(rows, device=DEVICE)
            step = torch.ones((), device=DEVICE)
            elem = v.element_size()
            nbytes = rows * dim * (2 * elem + elem + 4) + rows * 8
            default = kmod.launch_config(dim, dtype)
            case = {
                "dim": dim,
                "dtype": str(dtype).removeprefix("torch."),
                "rows": rows,
                "default": default.__dict__,
                "configs": [],
            }
            for cfg in [default] + [c for c in kmod.launch_candidates(dim) if c != default]:

                def run(cfg=cfg, v=v, g=g, s=s, mu=mu) -> None:
                    kmod.fused_spherical_sgd(
                        [v],
                        [g],
                        [s],
                        [step],
                        [mu],
                        lr=LR,
                        kappa=KAPPA,
                        beta=0.0,
                        eps=EPS,
                        normalize=True,
                        cache=kmod.LaunchCache(),
                        config=cfg,
                    )

                try:
                    for _ in range(3):
                        run()
                    times = []
                    for _ in range(20):
                        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        start.record()
                        run()
                        end.record()
                        end.synchronize()
                        times.append(start.elapsed_time(end) / 1e3)
                    med = sorted(times)[len(times) // 2]
                    case["configs"].append({**cfg.__dict__, "median_ms": med * 1e3, "gbps": nbytes / med / 1e9})
                except Exception as exc:  # a config the compiler refuses is recorded, not fatal
                    case["configs"].append({**cfg.__dict__, "error": repr(exc)[:200]})
            timed = [c for c in case["configs"] if "gbps" in c]
            if timed:
                case["best"] = max(timed, key=lambda c: c["gbps"])
            out["cases"].append(case)
            with open(path, "w") as f:
                json.dump(out, f, indent=1)
            del v, g, mu, s
            torch.cuda.empty_cache()


if __name__ == "__main__":
    import argparse
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(
        description="SphericalSGD: vectorized path vs the lean per-param loop, interleaved rounds (medians)"
    )
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args()
    result = interleaved_ratios(rounds=args.rounds, threads=tuple(args.threads))
    print(format_interleaved(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

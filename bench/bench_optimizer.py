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
- ``copy``: ``dst.copy_(src)`` of as many bytes as param + grad, the bandwidth
  yardstick for the kernel. CUDA only.

Each timed call ends with ``torch.cuda.synchronize()`` on CUDA. The ratios
(vectorized / loop, kernel / loop, kernel GB/s / copy GB/s) are computed at the
end of the session by ``bench/conftest.py`` from the same run; they are
reported, never asserted.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from _machine import cpu_model

from dti_fast import SphericalSGD, spherical_sgd_step_reference, triton_available

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

PATHS = ("kernel", "vectorized", "loop", "copy")

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
    opt = SphericalSGD(
        [{"params": params, "prior": priors}], lr=LR, kappa=KAPPA, beta=BETA, eps=EPS, fused=fused
    )
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

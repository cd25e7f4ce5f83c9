"""Shared fixtures and helpers for the SphericalSGD tests.

Device policy: the tests run on "cuda" when a GPU is visible, else on "cpu".
Without a GPU the Triton kernel (``fused=True``) runs on CPU tensors under
Triton's interpreter, which is switched on here, at import time, before any
test module (and so before ``dti_fast.kernels``) is imported: ``triton.jit``
decides interpreter-or-compiler when the kernel is defined. On a GPU machine
the variable is left alone and the same tests launch the real kernel.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import pytest
import torch

if not torch.cuda.is_available():
    # Forced (not setdefault): a stray TRITON_INTERPRET=0 would make every
    # fused=True test fail with "needs CUDA params".
    os.environ["TRITON_INTERPRET"] = "1"

from dti_fast import SphericalSGD, pack_params_, project_to_sphere, spherical_sgd_step_reference  # noqa: E402
from dti_fast.optim import triton_available  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = triton_available()

#: Mantissa bits (without the implicit bit) of the storage formats, for ulp().
_MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module: tiny models gain nothing from threads, and on busy shared cores
    extra threads cost 10x. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def device() -> str:
    """Where the tests' tensors live: "cuda" if available, else "cpu"."""
    return DEVICE


@pytest.fixture(params=[False, True], ids=["vectorized", "kernel"])
def fused(request) -> bool:
    """Both optimizer paths: the vectorized torch path and the Triton kernel."""
    if request.param and not TRITON:
        pytest.skip("Triton does not import here; the fused path cannot run")
    return request.param


# -- helpers (plain functions; test modules get them through the fixtures below) --


def unit_rows(shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """Random fp32 CPU tensor of ``shape`` whose rows (last dim) have unit norm."""
    return project_to_sphere(torch.randn(tuple(shape), generator=generator))


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` numbers at the magnitude of ``x`` (normal range), as fp32."""
    _, exponent = torch.frexp(x.float())  # |x| = m * 2**e, m in [0.5, 1)
    spacing = torch.ldexp(torch.ones_like(x, dtype=torch.float32), exponent - 1 - _MANTISSA_BITS[dtype])
    smallest = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    return spacing.clamp_min(smallest)


def make_problem(
    shapes: Sequence[Sequence[int]],
    steps: int,
    *,
    seed: int = 0,
    with_prior: bool = False,
) -> dict:
    """Deterministic start rows, priors and per-step gradients (fp32, CPU).

    Gradients are N(0, 1/D) so the tangent gradient has norm ~1 whatever D is:
    the normalize=False runs then take steps of ~lr, not ~lr*sqrt(D).
    """
    gen = torch.Generator().manual_seed(seed)
    inits = [unit_rows(s, gen) for s in shapes]
    priors = [torch.randn(tuple(s), generator=gen) for s in shapes] if with_prior else None
    grads = [[torch.randn(tuple(s), generator=gen) / math.sqrt(s[-1]) for s in shapes] for _ in range(steps)]
    return {"inits": inits, "priors": priors, "grads": grads}


def run_reference(
    problem: dict,
    *,
    dtype: torch.dtype,
    device: str,
    lr: float,
    kappa: float = 0.0,
    beta: float = 0.0,
    eps: float = 1e-8,
    normalize: bool = True,
    active: Sequence[Sequence[bool]] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """``spherical_sgd_step_reference`` applied per param, each with its own step count.

    ``active[t][i]`` False means param i has no gradient at step t (skipped).
    Returns the final rows (``dtype``), the final fp32 row states and step counts.
    """
    vs = [x.to(device=device, dtype=dtype) for x in problem["inits"]]
    ss = [torch.zeros(x.shape[:-1], dtype=torch.float32, device=device) for x in problem["inits"]]
    counts = [0] * len(vs)
    priors = problem["priors"]
    for t, grads in enumerate(problem["grads"]):
        for i, g in enumerate(grads):
            if active is not None and not active[t][i]:
                continue
            counts[i] += 1
            mu = priors[i].to(device) if (priors is not None and kappa != 0.0) else None
            vs[i], ss[i] = spherical_sgd_step_reference(
                vs[i],
                g.to(device=device, dtype=dtype),
                ss[i],
                counts[i],
                lr=lr,
                kappa=kappa,
                mu=mu,
                beta=beta,
                eps=eps,
                normalize=normalize,
            )
    return vs, ss, counts


def run_optimizer(
    problem: dict,
    *,
    dtype: torch.dtype | Sequence[torch.dtype],
    device: str,
    fused: bool | None,
    lr: float,
    kappa: float = 0.0,
    beta: float = 0.0,
    eps: float = 1e-8,
    normalize: bool = True,
    active: Sequence[Sequence[bool]] | None = None,
    pack: bool = False,
) -> tuple[list[torch.nn.Parameter], SphericalSGD]:
    """All params of ``problem`` in ONE param group of a SphericalSGD, stepped per ``problem``.

    ``dtype`` may be one dtype or one per param (mixed-dtype groups). ``pack``
    moves the params back to back into one tensor first (``pack_params_``; one dtype).
    """
    n = len(problem["inits"])
    dtypes = [dtype] * n if isinstance(dtype, torch.dtype) else list(dtype)
    # clone(): x.to() returns x itself when nothing changes, and the optimizer
    # writes its params in place; the problem must stay reusable.
    params = [torch.nn.Parameter(x.to(device=device, dtype=d).clone()) for x, d in zip(problem["inits"], dtypes)]
    if pack:
        pack_params_(params)
    group = {"params": params}
    if problem["priors"] is not None:
        group["prior"] = [mu.to(device) for mu in problem["priors"]]
    opt = SphericalSGD([group], lr=lr, kappa=kappa, beta=beta, eps=eps, normalize=normalize, fused=fused)
    for t, grads in enumerate(problem["grads"]):
        for i, (p, g) in enumerate(zip(params, grads)):
            on = active is None or active[t][i]
            p.grad = g.to(device=device, dtype=p.dtype).clone() if on else None
        opt.step()
    return params, opt


class _Helpers:
    unit_rows = staticmethod(unit_rows)
    ulp = staticmethod(ulp)
    make_problem = staticmethod(make_problem)
    run_reference = staticmethod(run_reference)
    run_optimizer = staticmethod(run_optimizer)


@pytest.fixture
def helpers() -> type[_Helpers]:
    """The helper functions above (fixtures keep test modules independent of import mode)."""
    return _Helpers


def assert_matches_reference(
    params: Sequence[torch.Tensor],
    opt: SphericalSGD,
    reference: tuple[list[torch.Tensor], list[torch.Tensor], list[int]],
    *,
    atol: float,
    s_rtol: float,
    normalize: bool = True,
) -> None:
    """Final rows, row states and step counts of ``opt`` equal the reference run's."""
    ref_vs, ref_ss, ref_counts = reference
    for i, (p, v, s, count) in enumerate(zip(params, ref_vs, ref_ss, ref_counts)):
        assert p.dtype == v.dtype
        torch.testing.assert_close(p.detach().float(), v.float(), atol=atol, rtol=0, msg=lambda m: f"param {i}: {m}")
        if count == 0:
            assert p not in opt.state or not opt.state[p], f"param {i} never had a grad but got state"
            continue
        state = opt.state[p]
        assert state["s"].dtype == torch.float32 and state["s"].shape == p.shape[:-1]
        assert int(state["step"]) == count, f"param {i}: step {int(state['step'])} != {count}"
        if normalize:
            torch.testing.assert_close(state["s"], s, rtol=s_rtol, atol=1e-6, msg=lambda m: f"param {i} s: {m}")
        else:
            assert not state["s"].any(), "normalize=False must leave the row state untouched"
        norms = torch.linalg.vector_norm(p.detach().float(), dim=-1)
        torch.testing.assert_close(norms, torch.ones_like(norms), atol=max(atol, 1e-5), rtol=0)


_Helpers.assert_matches_reference = staticmethod(assert_matches_reference)


# -- generate / interpolate / evaluate / suite: tiny models and trained concepts, built once per session --


@pytest.fixture(scope="session")
def eval_sd_model(tmp_path_factory):
    """A tiny random-weight SD model folder (diffusers layout)."""
    from dti_fast.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("eval-models") / "sd", family="sd")


@pytest.fixture(scope="session")
def eval_sdxl_model(tmp_path_factory):
    """A tiny random-weight SDXL model folder (two text encoders of widths 32 and 64)."""
    from dti_fast.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("eval-models") / "sdxl", family="sdxl")


def _eval_concepts(*names):
    from dti_fast.data import Concept
    from dti_fast.demo import demo_images_dir

    table = {"dog": ("dog", "dog"), "cat2": ("cat", "cat"), "backpack": ("red backpack", "backpack")}
    return [Concept(name=n, images=demo_images_dir() / n, init=table[n][0], class_noun=table[n][1]) for n in names]


@pytest.fixture(scope="session")
def trained_sd(eval_sd_model, tmp_path_factory):
    """DTI and TI (with rescaled/) concepts dog, cat2 (1 vector) and backpack (2 vectors) on the tiny SD model."""
    from dti_fast.train import TrainConfig, train

    root = tmp_path_factory.mktemp("trained-sd")
    out = {}
    for method in ("dti", "ti"):
        cfg = TrainConfig(
            model=str(eval_sd_model),
            output_dir=root / method,
            concepts=_eval_concepts("dog", "cat2", "backpack"),
            method=method,
            steps=2,
            batch_size=1,
            resolution=64,
            progress=False,
            export_ti_rescaled=(method == "ti"),
        )
        out[method] = train(cfg)
    return out


@pytest.fixture(scope="session")
def trained_sdxl(eval_sdxl_model, tmp_path_factory):
    """DTI concepts dog and cat2 on the tiny SDXL model."""
    from dti_fast.train import TrainConfig, train

    cfg = TrainConfig(
        model=str(eval_sdxl_model),
        output_dir=tmp_path_factory.mktemp("trained-sdxl") / "dti",
        concepts=_eval_concepts("dog", "cat2"),
        steps=1,
        batch_size=1,
        resolution=64,
        progress=False,
    )
    return train(cfg)


@pytest.fixture(scope="session")
def tiny_metrics(tmp_path_factory):
    """Tiny random-weight DINOv2 / SigLIP / CLIP model folders: {"dino": path, "siglip": path, "clip": path}."""
    from dti_fast.testing import make_tiny_metric_models

    return make_tiny_metric_models(tmp_path_factory.mktemp("tiny-metrics"))

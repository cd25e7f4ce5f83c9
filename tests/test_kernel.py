"""The Triton kernel (``fused=True``) against the reference and the vectorized path.

On a machine without a GPU these run under Triton's interpreter on CPU tensors
(conftest.py sets TRITON_INTERPRET=1); with a GPU they launch the compiled kernel
on CUDA tensors. The interpreter is slow (~10 ms per step for small tensors,
~100 ms for the streamed multi-pass rows), so the matrix below is pruned: every
shape and every hyperparameter combination appears in fp32, and 16-bit storage is
covered by a subset plus the strict one-step ulp test.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from dti_fast.kernels import spherical_sgd as kmod  # noqa: E402

from dti_fast import SphericalSGD, project_to_sphere, spherical_sgd, spherical_sgd_step_reference  # noqa: E402
from dti_fast import optim as optim_mod  # noqa: E402
from dti_fast.optim import device_copy  # noqa: E402

# -- tolerances (see test_optim.py for the measurements behind them) -------------------------

#: fp32 after 20 steps: op-order rounding only (~1e-7 per step, observed 1.5e-7).
FP32_ATOL = 1e-5
#: bf16 after 20 steps vs the reference in bf16: per-step 1-ulp rounding
#: differences random-walk; the interpreter truncates fp32->bf16 (torch and the
#: GPU round to nearest) which makes them one-sided. Observed 1.2e-2; 2.5e-2 is
#: ~6 ulps for |x| in [0.5, 1).
BF16_ATOL = 2.5e-2
#: fp16: spacing 4.9e-4 in [0.5, 1); observed 2.4e-4.
FP16_ATOL = 2e-3
ATOL = {torch.float32: FP32_ATOL, torch.bfloat16: BF16_ATOL, torch.float16: FP16_ATOL}
#: Row state s (fp32) inherits the rows' differences in 16-bit (observed 7e-4 relative).
S_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
#: One step from the same stored state: both sides compute in fp32 and round once
#: to the storage dtype, so they can differ by at most one spacing of that dtype
#: (plus fp32 noise, far below it).
ONE_STEP_ULPS = 1.0
#: The fp32 row state after one step from identical inputs: fp32 rounding only.
ONE_STEP_S_RTOL = 1e-5
STEPS = 20
LR = 0.05

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# (beta, kappa, normalize)
PLAIN = (0.0, 0.0, True)
FULL = (0.9, 1e-2, True)  # running s with bias correction, and the vMF prior
BETA = (0.9, 0.0, True)
RSGD_PRIOR = (0.0, 1e-2, False)
RSGD = (0.0, 0.0, False)
HYPER_NAMES = {PLAIN: "plain-norm", FULL: "beta-prior", BETA: "beta", RSGD_PRIOR: "rsgd-prior", RSGD: "rsgd"}
DTYPE_NAMES = {F32: "fp32", BF16: "bf16", F16: "fp16"}


def _case(shapes, hyper, dtype, marks=()):
    shape_id = "+".join("x".join(map(str, s)) for s in shapes)
    return pytest.param(shapes, hyper, dtype, id=f"{shape_id}-{HYPER_NAMES[hyper]}-{DTYPE_NAMES[dtype]}", marks=marks)


MULTI = [(1, 77), (5, 77), (2, 3, 77), (77,)]  # one group, four row counts, 1-D/2-D/3-D
KERNEL_CASES = (
    # fp32: every hyperparameter combination on a 2-D and a 3-D param...
    [_case([(3, 77)], h, F32) for h in HYPER_NAMES]
    + [_case([(2, 3, 768)], h, F32) for h in HYPER_NAMES]
    # ...and the full and plain modes on the other vector sizes (1-D param included).
    + [_case([s], h, F32) for s in [(768,), (4, 64), (2, 1280), (2, 2048), (1, 8192)] for h in (FULL, RSGD)]
    + [_case(MULTI, h, F32) for h in (FULL, RSGD, BETA)]
    # 16-bit storage.
    + [
        _case([(4, 64)], FULL, BF16),
        _case([(2, 3, 768)], RSGD_PRIOR, BF16),
        _case([(2, 1280)], FULL, BF16),
        _case([(768,)], PLAIN, BF16),
        _case(MULTI, FULL, BF16),
        _case([(4, 64)], RSGD_PRIOR, F16),
        _case([(2, 3, 768)], FULL, F16),
        _case([(2, 2048)], FULL, F16),
        _case([(3, 77)], PLAIN, F16),
        _case(MULTI, FULL, F16),
    ]
    # Rows longer than MAX_SINGLE_PASS_DIM: the streamed multi-pass branch.
    # (3, 8200) runs two programs of BLOCK_R=2 rows, the second half masked.
    + [
        _case([(3, 8200)], FULL, F32),
        _case([(8200,)], RSGD, F32),
        _case([(1, 8200)], FULL, BF16),
    ]
)


@pytest.mark.parametrize("shapes, hyper, dtype", KERNEL_CASES)
def test_kernel_matches_reference(helpers, device, shapes, hyper, dtype):
    beta, kappa, normalize = hyper
    problem = helpers.make_problem(shapes, STEPS, seed=11, with_prior=kappa > 0)
    kw = dict(device=device, lr=LR, kappa=kappa, beta=beta, normalize=normalize)
    reference = helpers.run_reference(problem, dtype=dtype, **kw)
    params, opt = helpers.run_optimizer(problem, dtype=dtype, fused=True, **kw)
    helpers.assert_matches_reference(
        params, opt, reference, atol=ATOL[dtype], s_rtol=S_RTOL[dtype], normalize=normalize
    )


def test_multi_pass_branch_is_used_above_the_single_pass_limit():
    assert kmod.MAX_SINGLE_PASS_DIM == 8192  # the 8192/8200 cases above straddle it
    assert kmod.launch_config(8192).single_pass is True
    assert kmod.launch_config(8200).single_pass is False
    for dim in (1, 64, 77, 768, 1280, 2048, 8192, 8200, 20000):
        cfg = kmod.launch_config(dim)
        block_r, block_d, single, num_warps = cfg.rows, cfg.block, cfg.single_pass, cfg.num_warps
        assert block_r >= 1 and (block_d & (block_d - 1)) == 0  # powers of two
        assert block_d >= dim if single else block_d < dim
        assert block_r == 1 or block_r * block_d <= 4096
        assert num_warps in (4, 8)


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", [(4, 64), (2, 768)])
def test_kernel_one_step_is_within_one_ulp_of_reference(helpers, device, dtype, shape):
    # The strict 16-bit check: from the same stored state, one kernel step and one
    # reference step may differ only by the final rounding to the storage dtype.
    gen = torch.Generator().manual_seed(3)
    p = torch.nn.Parameter(helpers.unit_rows(shape, gen).to(device=device, dtype=dtype))
    mu = torch.randn(shape, generator=gen)
    kappa = 0.5  # large, so that a kernel that mishandled the prior would be off by several ulps
    opt = SphericalSGD([{"params": [p], "prior": [mu]}], lr=LR, kappa=kappa, beta=0.9, fused=True)
    s = torch.zeros(shape[:-1], device=device)
    for t in range(1, 7):
        g = (torch.randn(shape, generator=gen) / shape[-1] ** 0.5).to(device=device, dtype=dtype)
        v0, s0 = p.detach().clone(), s
        p.grad = g
        opt.step()
        ref_v, ref_s = spherical_sgd_step_reference(v0, g, s0, t, lr=LR, kappa=kappa, mu=mu.to(device), beta=0.9)
        out = p.detach()
        spacing = torch.maximum(helpers.ulp(out, dtype), helpers.ulp(ref_v, dtype))
        excess = ((out.float() - ref_v.float()).abs() / spacing).max()
        assert excess <= ONE_STEP_ULPS, f"step {t}: {float(excess):.2f} ulps apart"
        torch.testing.assert_close(opt.state[p]["s"], ref_s, rtol=ONE_STEP_S_RTOL, atol=0)
        s = opt.state[p]["s"].clone()


# -- launches ----------------------------------------------------------------------------------


class _LaunchRecorder:
    """Stands in for the jitted kernel and records every launch's grid and dtypes."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches: list[tuple] = []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.launches.append((tuple(grid), kwargs["PARAM_DTYPE"], args[9]))  # args[9] is D
            return launch(*args, **kwargs)

        return run


@pytest.fixture
def launches(monkeypatch):
    recorder = _LaunchRecorder(kmod._spherical_sgd_kernel)
    monkeypatch.setattr(kmod, "_spherical_sgd_kernel", recorder)
    return recorder.launches


def test_many_params_one_launch_equals_vectorized(helpers, device, launches):
    # 50 concept tensors of 4 rows: ONE launch of 50 programs per step (the
    # pointer table), with results equal to the vectorized path.
    n, steps = 50, 5
    problem = helpers.make_problem([(4, 64)] * n, steps, seed=12, with_prior=True)
    kw = dict(dtype=F32, device=device, lr=LR, kappa=1e-2, beta=0.9)
    fused_params, fused_opt = helpers.run_optimizer(problem, fused=True, **kw)
    assert len(launches) == steps
    assert all(grid == (n,) for grid, _, _ in launches)
    vec_params, vec_opt = helpers.run_optimizer(problem, fused=False, **kw)
    for a, b in zip(fused_params, vec_params):
        torch.testing.assert_close(a.detach(), b.detach(), atol=FP32_ATOL, rtol=0)
        torch.testing.assert_close(fused_opt.state[a]["s"], vec_opt.state[b]["s"], rtol=S_RTOL[F32], atol=0)


def test_launch_tables_are_reused_while_pointers_stay(helpers, device):
    # Grads written in place (same storage every step): the device-side pointer
    # and block tables are built once, not per step.
    problem = helpers.make_problem([(4, 64)] * 3, 4, seed=18)
    params = [torch.nn.Parameter(x.clone().to(device)) for x in problem["inits"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = SphericalSGD(params, lr=LR, fused=True)
    tables = []
    for grads in problem["grads"]:
        for p, g in zip(params, grads):
            p.grad.copy_(g)
        opt.step()
        cache = opt._cache["launch"]
        assert len(cache._meta) == 1 and len(cache._blocks) == 1
        tables.append((next(iter(cache._meta.values()))[1], next(iter(cache._blocks.values()))))
    assert all(t[0] is tables[0][0] and t[1] is tables[0][1] for t in tables)
    reference = helpers.run_reference(problem, dtype=F32, device=device, lr=LR)
    helpers.assert_matches_reference(params, opt, reference, atol=FP32_ATOL, s_rtol=S_RTOL[F32])


def test_mixed_dtypes_and_sizes_in_one_group(helpers, device, launches):
    # One group, params of two vector sizes and three dtypes: one launch per
    # (dtype, size) bucket, each param equal to the reference in its own dtype.
    shapes = [(3, 64), (2, 64), (4, 768), (1, 768), (2, 64)]
    dtypes = [F32, BF16, F32, F16, F32]
    problem = helpers.make_problem(shapes, 8, seed=13, with_prior=True)
    kw = dict(device=device, lr=LR, kappa=1e-2, beta=0.9)
    params, opt = helpers.run_optimizer(problem, dtype=dtypes, fused=True, **kw)
    buckets = {(DTYPE_NAMES[d], s[-1]) for d, s in zip(dtypes, shapes)}
    assert len(launches) == 8 * len(buckets)
    fp32_64 = [grid for grid, dt, dim in launches if dim == 64 and dt == kmod._TL_DTYPES[F32]]
    assert set(fp32_64) == {(2,)}  # (3, 64) and (2, 64) share one launch: one program each
    for i, (p, dtype) in enumerate(zip(params, dtypes)):
        single = {
            "inits": [problem["inits"][i]],
            "priors": [problem["priors"][i]],
            "grads": [[g[i]] for g in problem["grads"]],
        }
        ref = helpers.run_reference(single, dtype=dtype, **kw)
        helpers.assert_matches_reference([p], opt, ref, atol=ATOL[dtype], s_rtol=S_RTOL[dtype])


def test_pointer_tables_follow_new_storage(helpers, device):
    # The launch cache keys its pointer table on data pointers: a param whose
    # storage is swapped (p.data = ...) must be updated in its NEW storage.
    problem = helpers.make_problem([(3, 64)], 6, seed=14)
    p = torch.nn.Parameter(problem["inits"][0].clone().to(device))
    opt = SphericalSGD([p], lr=LR, beta=0.9, fused=True)
    for grads in problem["grads"][:3]:
        p.grad = grads[0].to(device)
        opt.step()
    old = p.data
    old_copy = old.clone()
    p.data = old.clone()  # same values, new storage
    for grads in problem["grads"][3:]:
        p.grad = grads[0].to(device)
        opt.step()
    assert torch.equal(old, old_copy)  # the kernel no longer writes the old storage
    ref = helpers.run_reference(problem, dtype=F32, device=device, lr=LR, beta=0.9)
    torch.testing.assert_close(p.detach(), ref[0][0], atol=FP32_ATOL, rtol=0)


def test_non_contiguous_params_and_grads(helpers, device):
    gen = torch.Generator().manual_seed(15)
    rows = helpers.unit_rows((3, 64), gen).to(device)
    strided = torch.nn.Parameter(rows.t().contiguous().t())  # shape (3, 64), not contiguous
    assert not strided.is_contiguous()
    strided.grad = torch.randn(3, 64, device=device)
    with pytest.raises(ValueError, match="contiguous"):
        SphericalSGD([strided], fused=True).step()
    # The vectorized path takes it; the kernel takes a non-contiguous GRAD (copied).
    g = torch.randn(64, 3, generator=gen).to(device).t()
    assert not g.is_contiguous()
    ref_v, _ = spherical_sgd_step_reference(rows, g, torch.zeros(3, device=device), 1, lr=LR)
    vec = torch.nn.Parameter(rows.t().contiguous().t())
    vec.grad = g
    SphericalSGD([vec], lr=LR, fused=False).step()
    ker = torch.nn.Parameter(rows.clone())
    ker.grad = g
    SphericalSGD([ker], lr=LR, fused=True).step()
    torch.testing.assert_close(vec.detach(), ref_v, atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(ker.detach(), ref_v, atol=FP32_ATOL, rtol=0)


def test_empty_param_in_a_group(helpers, device, fused):
    problem = helpers.make_problem([(0, 64), (3, 64)], 4, seed=16, with_prior=True)
    kw = dict(dtype=F32, device=device, lr=LR, kappa=1e-2, beta=0.9)
    params, opt = helpers.run_optimizer(problem, fused=fused, **kw)
    reference = helpers.run_reference(problem, **kw)
    helpers.assert_matches_reference(params, opt, reference, atol=FP32_ATOL, s_rtol=S_RTOL[F32])


def test_functional_fused_call_with_grad_scale(helpers, device):
    # The functional entry point with a GradScaler-style device scale: grads are
    # divided by it inside the kernel, as in the reference.
    gen = torch.Generator().manual_seed(17)
    v = helpers.unit_rows((5, 77), gen).to(device)
    g = torch.randn(5, 77, generator=gen).to(device)
    mu = helpers.unit_rows((5, 77), gen).to(device)
    for fused in (False, True):
        p, step = v.clone(), torch.tensor(2.0, device=device)
        s = torch.rand(5, generator=torch.Generator().manual_seed(1)).to(device)
        s0 = s.clone()
        spherical_sgd(
            [p],
            [1024.0 * g],
            [s],
            [step],
            [mu],
            lr=LR,
            kappa=0.1,
            beta=0.5,
            fused=fused,
            grad_scale=torch.tensor(1024.0, device=device),
            found_inf=torch.zeros(1, device=device),
        )
        ref_v, ref_s = spherical_sgd_step_reference(v, g, s0, 3, lr=LR, kappa=0.1, mu=mu, beta=0.5)
        torch.testing.assert_close(p, ref_v, atol=FP32_ATOL, rtol=0)
        torch.testing.assert_close(s, ref_s, rtol=1e-5, atol=0)
        assert float(step) == 3.0


# -- the aligned (vector-load) specialization and the general path -----------------------------------


class _KwargRecorder:
    """Stands in for the jitted kernel and records every launch's arguments."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.calls: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.calls.append((args, kwargs))
            return launch(*args, **kwargs)

        return run


@pytest.fixture
def kernel_calls(monkeypatch):
    recorder = _KwargRecorder(kmod._spherical_sgd_kernel)
    monkeypatch.setattr(kmod, "_spherical_sgd_kernel", recorder)
    return recorder.calls


def _param_at_offset(values: torch.Tensor, offset: int) -> torch.nn.Parameter:
    """A contiguous param whose data starts ``offset`` elements into its storage."""
    base = torch.zeros(values.numel() + offset, dtype=values.dtype, device=values.device)
    view = base[offset:].view(values.shape)
    view.copy_(values)
    return torch.nn.Parameter(view)


ALIGN_DIMS = [64, 77, 768, 1280, 2304, 8200]


@pytest.mark.parametrize("layout", ["aligned", "offset-1"])
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("dim", ALIGN_DIMS)
def test_aligned_and_general_paths_match_reference(helpers, device, kernel_calls, dim, dtype, layout):
    # Fresh tensors are 16-byte aligned: the aligned specialization runs whenever the row is a
    # whole number of 16-byte vectors. A param one element into its storage takes the general path.
    steps = 3
    problem = helpers.make_problem([(2, dim)], steps, seed=dim, with_prior=True)
    kw = dict(device=device, lr=LR, kappa=1e-2, beta=0.9)
    reference = helpers.run_reference(problem, dtype=dtype, **kw)
    values = problem["inits"][0].to(device=device, dtype=dtype)
    p = _param_at_offset(values, 0 if layout == "aligned" else 1)
    opt = SphericalSGD(
        [{"params": [p], "prior": [problem["priors"][0].to(device)]}], lr=LR, kappa=1e-2, beta=0.9, fused=True
    )
    for grads in problem["grads"]:
        p.grad = grads[0].to(device=device, dtype=dtype)
        opt.step()
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    expected = layout == "aligned" and dim % vec == 0
    assert [kw_["ALIGNED"] for _, kw_ in kernel_calls] == [expected] * steps
    helpers.assert_matches_reference([p], opt, reference, atol=ATOL[dtype], s_rtol=S_RTOL[dtype])


def test_aligned_is_chosen_on_every_pointer_and_the_row_size():
    t = torch.zeros(4, 64)
    assert kmod.aligned([t], 64) == (True, 4)
    assert kmod.aligned([t, t.to(BF16)], 64) == (True, 8)  # the narrowest dtype sets VEC
    assert kmod.aligned([t.view(-1)[1:65].view(1, 64)], 64)[0] is False  # storage offset of one element
    assert kmod.aligned([torch.zeros(4, 76)], 76) == (True, 4)
    assert kmod.aligned([torch.zeros(4, 76, dtype=BF16)], 76)[0] is False  # 152 bytes: not whole vectors
    assert kmod.aligned([torch.zeros(4, 77)], 77)[0] is False


# -- launch configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_launch_config_rule(dtype):
    for dim in (1, 64, 77, 768, 1280, 2048, 2304, 4096, 8192, 8200, 20000):
        cfg = kmod.launch_config(dim, dtype)
        assert cfg.block & (cfg.block - 1) == 0 and cfg.rows >= 1
        assert cfg.single_pass == (dim <= kmod.MAX_SINGLE_PASS_DIM)
        assert cfg.block >= dim if cfg.single_pass else cfg.block < dim
        assert cfg.rows == 1 or cfg.rows * cfg.block <= kmod.TILE_ELEMENTS
        assert cfg.num_warps in (4, 8)
    assert kmod.launch_config(768, dtype) == kmod.LaunchConfig(rows=4, block=1024, single_pass=True, num_warps=8)
    assert kmod.launch_config(64, dtype) == kmod.LaunchConfig(rows=64, block=64, single_pass=True, num_warps=8)


def test_launch_table_overrides_the_rule(monkeypatch):
    tuned = kmod.LaunchConfig(rows=8, block=256, single_pass=False, num_warps=4)
    monkeypatch.setitem(kmod.LAUNCH_TABLE, (1280, 2), tuned)
    assert kmod.launch_config(1280, BF16) == tuned
    assert kmod.launch_config(1280, F16) == tuned  # keyed on element size
    assert kmod.launch_config(1280, F32) != tuned


def test_launch_candidates_are_valid():
    for dim in (64, 768, 1280, 2048, 2304, 4096):
        candidates = kmod.launch_candidates(dim)
        assert candidates and len(set(candidates)) == len(candidates)
        assert any(c.single_pass for c in candidates) and any(not c.single_pass for c in candidates) or dim <= 128
        for c in candidates:
            assert c.block & (c.block - 1) == 0 and c.num_warps * 32 <= c.rows * c.block
            assert c.block >= dim if c.single_pass else c.block < dim


@pytest.mark.parametrize(
    "config",
    [
        kmod.LaunchConfig(rows=2, block=256, single_pass=False, num_warps=4),  # chunked: 768 = 3 x 256, no padding
        kmod.LaunchConfig(rows=8, block=1024, single_pass=True, num_warps=8),
    ],
    ids=["chunked-256", "padded-8rows"],
)
def test_an_explicit_launch_config_matches_reference(helpers, device, config):
    # What a sweep times must compute the same step.
    problem = helpers.make_problem([(5, 768)], 1, seed=21, with_prior=True)
    v, g, mu = problem["inits"][0].to(device), problem["grads"][0][0].to(device), problem["priors"][0].to(device)
    p, s, step = v.clone(), torch.zeros(5, device=device), torch.zeros((), device=device)
    kmod.fused_spherical_sgd(
        [p],
        [g],
        [s],
        [step.add_(1)],
        [project_to_sphere(mu)],
        lr=LR,
        kappa=1e-2,
        beta=0.9,
        eps=1e-8,
        normalize=True,
        cache=kmod.LaunchCache(),
        config=config,
    )
    ref_v, ref_s = spherical_sgd_step_reference(
        v, g, torch.zeros(5, device=device), 1, lr=LR, kappa=1e-2, mu=mu, beta=0.9
    )
    torch.testing.assert_close(p, ref_v, atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(s, ref_s, rtol=ONE_STEP_S_RTOL, atol=0)


# -- grad_scale / found_inf per device ----------------------------------------------------------------


def test_device_copy_is_one_copy_per_device_and_step():
    scale = torch.tensor(1024.0)
    memo: dict = {}
    assert device_copy(scale, torch.device("cpu"), memo) is scale and not memo
    meta = device_copy(scale, torch.device("meta"), memo)  # stands in for a second GPU
    assert meta.device.type == "meta" and device_copy(scale, torch.device("meta"), memo) is meta
    assert device_copy(None, torch.device("meta"), memo) is None
    other = torch.tensor([0.0])
    assert device_copy(other, torch.device("meta"), memo) is not meta  # keyed on the tensor too


def test_each_launch_reads_its_devices_copy_of_the_scaler_tensors(helpers, device, kernel_calls, monkeypatch):
    # Two buckets (vector sizes 64 and 77). The lookup is replaced by one that returns a
    # distinct copy per call: each launch must receive what the lookup gave for its
    # device, never the scaler's own tensor (a pointer on another GPU).
    given = []

    def fake_copy(t, dev, memo):
        if t is None:
            return None
        out = t.clone()
        given.append((dev, out))
        return out

    monkeypatch.setattr(optim_mod, "device_copy", fake_copy)
    gen = torch.Generator().manual_seed(5)
    params = [helpers.unit_rows((2, 64), gen).to(device), helpers.unit_rows((3, 77), gen).to(device)]
    grads = [
        1024.0 * torch.randn(2, 64, generator=gen).to(device),
        1024.0 * torch.randn(3, 77, generator=gen).to(device),
    ]
    scale, found = torch.tensor(1024.0, device=device), torch.zeros(1, device=device)
    states = [torch.zeros(2, device=device), torch.zeros(3, device=device)]
    steps = [torch.ones((), device=device), torch.ones((), device=device)]
    kmod.fused_spherical_sgd(
        params,
        grads,
        states,
        steps,
        None,
        lr=LR,
        kappa=0.0,
        beta=0.0,
        eps=1e-8,
        normalize=True,
        grad_scale=scale,
        found_inf=found,
        cache=kmod.LaunchCache(),
    )
    assert len(kernel_calls) == 2
    passed = [(args[2], args[3]) for args, _ in kernel_calls]
    copies = [t for _, t in given]
    for s_arg, f_arg in passed:
        assert s_arg is not scale and f_arg is not found
        assert any(s_arg is c for c in copies) and any(f_arg is c for c in copies)


_COMPILE_CHECK = r"""
import json, re, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dti_fast.kernels import spherical_sgd as k

names = k._spherical_sgd_kernel.arg_names
sig = {n: ("constexpr" if n.isupper() and n != "D" else "*i64" if n == "meta_ptr" else "*i32" if n == "blocks_ptr"
           else "*fp32" if n.endswith("_ptr") else "i32" if n == "D" else "fp32") for n in names}
out = []
for dtype, vec, dim, single, block_r, block_d in json.loads(sys.argv[1]):
    for aligned in (False, True):
        const = {"PARAM_DTYPE": getattr(tl, dtype), "GRAD_DTYPE": getattr(tl, dtype), "HAS_PRIOR": True,
                 "NORMALIZE": True, "BIAS_CORRECTION": False, "HAS_SCALE": False, "HAS_FOUND_INF": False,
                 "SINGLE_PASS": single, "ALIGNED": aligned, "VEC": vec, "BLOCK_R": block_r, "BLOCK_D": block_d}
        attrs = {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]}
        if dim % 16 == 0:
            attrs[(names.index("D"),)] = [["tt.divisibility", 16]]  # what Triton's launcher specializes
        src = ASTSource(fn=k._spherical_sgd_kernel, signature=sig, constexprs=const, attrs=attrs)
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ptx"]
        loads = re.findall(r"ld\.global\S*", ptx)
        out.append([dtype, dim, aligned, sum(".v" in x for x in loads)])
print(json.dumps(out))
"""


def test_aligned_specialization_compiles_to_vector_loads_for_sm90(tmp_path):
    # Compiles the kernel for an H100-class target (no GPU needed: Triton's frontend,
    # LLVM and ptxas) in a process without the interpreter, and counts vector loads
    # (ld.global.v*) in the PTX: none on the general path, some on the aligned one,
    # for a padded single pass (768) and a streamed row (8200, not a multiple of 16).
    import json
    import os
    import subprocess
    import sys

    cases = [["float32", 4, 768, True, 4, 1024], ["bfloat16", 8, 8200, False, 1, 2048]]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_CHECK, json.dumps(cases)], env=env, capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0 and ("ptxas" in proc.stderr or "backend" in proc.stderr.lower()):
        pytest.skip(f"Triton cannot compile for sm_90 here: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts = {(dtype, dim, aligned): n for dtype, dim, aligned, n in json.loads(proc.stdout.strip().splitlines()[-1])}
    for dtype, _, dim, *_ in cases:
        assert counts[(dtype, dim, False)] == 0
        assert counts[(dtype, dim, True)] > 0

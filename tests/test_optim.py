"""SphericalSGD as a torch optimizer: the vectorized path against the reference, and
drop-in behaviour (param groups, state dicts, LR schedulers, GradScaler, errors).

Tests that take the ``fused`` fixture run on both paths (vectorized torch and the
Triton kernel, the latter under the interpreter on CPU); the larger kernel-only
matrix is in test_kernel.py.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from dti_fast import (
    SphericalSGD,
    pack_params_,
    project_to_sphere,
    project_to_sphere_,
    spherical_sgd,
    spherical_sgd_step_reference,
)
from dti_fast import optim as optim_mod
from dti_fast.optim import _check_fused_possible, resolve_fused

# -- tolerances ------------------------------------------------------------------------

#: fp32 after 20 steps: every step rounds at ~1e-7 and the retraction does not
#: amplify it; observed max |diff| ~1.5e-7. 1e-5 is the issue's bound.
FP32_ATOL = 1e-5
#: bf16, against the reference run in bf16: each step stores the rows in bf16
#: (spacing 2**-8 = 3.9e-3 for |x| in [0.5, 1)); an fp32 reduction order
#: difference can round one element the other way (1 ulp) and those 1-ulp
#: differences random-walk over 20 steps. Observed: vectorized 1e-3, kernel
#: under the CPU interpreter 1.2e-2 (the interpreter truncates fp32->bf16 where
#: torch and the GPU round to nearest). 2.5e-2 ~ 6 ulps at |x| in [0.5, 1).
BF16_ATOL = 2.5e-2
#: fp16: spacing 4.9e-4 in [0.5, 1); observed max 2.4e-4; 2e-3 ~ 4 ulps.
FP16_ATOL = 2e-3
ATOL = {torch.float32: FP32_ATOL, torch.bfloat16: BF16_ATOL, torch.float16: FP16_ATOL}
#: The fp32 row state s = beta*s + (1-beta)*||g_tan||^2 depends on the rows
#: through the tangent projection: in fp32 it agrees to fp32 rounding (observed
#: 3e-7 relative); in 16-bit it inherits the rows' ulp differences (observed
#: 7e-4 relative for bf16 under the interpreter).
S_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
#: Step angles (rad) measured from fp32 rows of dim 768: ~1e-7 rounding.
ANGLE_ATOL = 1e-5
#: GradScaler vs unscaled: the scale is a power of two, so scaling and
#: unscaling are exact; only fp32 rounding differences of the op order remain.
SCALER_ATOL = 1e-6
STEPS = 20
LR = 0.05

# -- the vectorized path against the reference ---------------------------------------------

SHAPE_SETS = {
    "1d-768": [(768,)],
    "4x64": [(4, 64)],
    "3x77": [(3, 77)],
    "2x3x768": [(2, 3, 768)],
    "2x1280": [(2, 1280)],
    "2x2048": [(2, 2048)],
    "2x8200": [(2, 8200)],
    "4params-77": [(1, 77), (5, 77), (2, 3, 77), (77,)],
    "mixed-dims": [(3, 64), (2, 768), (1, 64)],
}
# (beta, kappa, normalize)
HYPERS = {
    "plain-norm": (0.0, 0.0, True),
    "beta-prior": (0.9, 1e-2, True),
    "beta": (0.9, 0.0, True),
    "rsgd-prior": (0.0, 1e-2, False),
    "rsgd": (0.0, 0.0, False),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("hyper", list(HYPERS.values()), ids=list(HYPERS))
@pytest.mark.parametrize("shapes", list(SHAPE_SETS.values()), ids=list(SHAPE_SETS))
def test_vectorized_matches_reference(helpers, device, shapes, hyper, dtype):
    beta, kappa, normalize = hyper
    problem = helpers.make_problem(shapes, STEPS, seed=1, with_prior=kappa > 0)
    kw = dict(device=device, lr=LR, kappa=kappa, beta=beta, normalize=normalize)
    reference = helpers.run_reference(problem, dtype=dtype, **kw)
    params, opt = helpers.run_optimizer(problem, dtype=dtype, fused=False, **kw)
    helpers.assert_matches_reference(
        params, opt, reference, atol=ATOL[dtype], s_rtol=S_RTOL[dtype], normalize=normalize
    )


def test_fused_none_on_cpu_is_the_vectorized_path(helpers):
    problem = helpers.make_problem([(3, 77), (2, 77)], 5, with_prior=True)
    kw = dict(dtype=torch.float32, device="cpu", lr=LR, kappa=1e-2, beta=0.9)
    auto, _ = helpers.run_optimizer(problem, fused=None, **kw)
    vec, _ = helpers.run_optimizer(problem, fused=False, **kw)
    for a, b in zip(auto, vec):
        assert torch.equal(a, b)


def test_params_with_different_step_counts(helpers, device, fused):
    # Params that miss steps (grad None) keep their own step count, so the bias
    # correction 1 - beta^t differs per param inside one batched update.
    shapes = [(3, 64), (2, 64), (64,)]
    active = [[True, t % 3 != 0, t >= 7] for t in range(STEPS)]
    problem = helpers.make_problem(shapes, STEPS, seed=2, with_prior=True)
    kw = dict(device=device, dtype=torch.float32, lr=LR, kappa=1e-2, beta=0.9, active=active)
    reference = helpers.run_reference(problem, **kw)
    assert reference[2] == [20, 13, 13]
    params, opt = helpers.run_optimizer(problem, fused=fused, **kw)
    helpers.assert_matches_reference(params, opt, reference, atol=FP32_ATOL, s_rtol=S_RTOL[torch.float32])


# -- param groups ----------------------------------------------------------------------------


def _param(helpers, shape, device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(helpers.unit_rows(shape, gen).to(device=device, dtype=dtype))


def test_param_groups_with_different_lr(helpers, device, fused):
    problem = helpers.make_problem([(3, 64), (2, 64)], STEPS, seed=3)
    params = [torch.nn.Parameter(x.clone().to(device)) for x in problem["inits"]]
    opt = SphericalSGD([{"params": [params[0]]}, {"params": [params[1]], "lr": 0.3}], lr=0.02, beta=0.9, fused=fused)
    assert [g["lr"] for g in opt.param_groups] == [0.02, 0.3]
    for grads in problem["grads"]:
        for p, g in zip(params, grads):
            p.grad = g.to(device)
        opt.step()
    for i, lr in enumerate((0.02, 0.3)):
        single = {"inits": [problem["inits"][i]], "priors": None, "grads": [[g[i]] for g in problem["grads"]]}
        ref = helpers.run_reference(single, dtype=torch.float32, device=device, lr=lr, beta=0.9)
        torch.testing.assert_close(params[i].detach(), ref[0][0], atol=FP32_ATOL, rtol=0)


def test_add_param_group_mid_run(helpers, device, fused):
    problem = helpers.make_problem([(3, 64), (4, 64)], 10, seed=4, with_prior=True)
    p0, p1 = (torch.nn.Parameter(x.clone().to(device)) for x in problem["inits"])
    opt = SphericalSGD([p0], lr=LR, beta=0.9, fused=fused)
    for t, grads in enumerate(problem["grads"]):
        if t == 4:
            opt.add_param_group({"params": [p1], "lr": 0.1, "kappa": 1e-2, "prior": [problem["priors"][1].to(device)]})
            assert set(opt.state[p1]) == {"prior"}  # the prior is state; step state comes with the first grad
        p0.grad = grads[0].to(device)
        p1.grad = grads[1].to(device) if t >= 4 else None
        opt.step()
    assert len(opt.param_groups) == 2
    assert opt.param_groups[1]["beta"] == 0.9 and opt.param_groups[1]["eps"] == 1e-8  # defaults filled in
    assert int(opt.state[p0]["step"]) == 10 and int(opt.state[p1]["step"]) == 6
    late = {
        "inits": [problem["inits"][1]],
        "priors": [problem["priors"][1]],
        "grads": [[g[1]] for g in problem["grads"][4:]],
    }
    ref = helpers.run_reference(late, dtype=torch.float32, device=device, lr=0.1, kappa=1e-2, beta=0.9)
    torch.testing.assert_close(p1.detach(), ref[0][0], atol=FP32_ATOL, rtol=0)


def test_add_param_group_validates(helpers):
    opt = SphericalSGD([_param(helpers, (2, 8), "cpu")])
    with pytest.raises(TypeError, match="dtype"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2, 8, dtype=torch.float64))]})
    with pytest.raises(ValueError, match="scalar"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.tensor(1.0))]})
    with pytest.raises(ValueError, match="some parameters appear in more than one"):
        opt.add_param_group({"params": opt.param_groups[0]["params"]})


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"lr": -0.1}, ValueError, "learning rate"),
        ({"lr": float("nan")}, ValueError, "learning rate"),
        ({"lr": torch.tensor([0.1, 0.2])}, ValueError, "one element"),
        ({"kappa": -1e-4}, ValueError, "kappa"),
        ({"beta": 1.0}, ValueError, "beta"),
        ({"beta": -0.1}, ValueError, "beta"),
        ({"eps": -1e-8}, ValueError, "eps"),
    ],
)
def test_bad_hyperparameters(helpers, kwargs, error, match):
    with pytest.raises(error, match=match):
        SphericalSGD([_param(helpers, (2, 8), "cpu")], **kwargs)


# -- priors and kappa ----------------------------------------------------------------------


def test_kappa_without_prior_raises(helpers):
    p = _param(helpers, (3, 16), "cpu")
    with pytest.raises(ValueError, match="prior"):
        SphericalSGD([p], kappa=1e-2)
    opt = SphericalSGD([p], kappa=0.0)
    with pytest.raises(ValueError, match="prior"):
        opt.add_param_group({"params": [_param(helpers, (2, 16), "cpu", seed=1)], "kappa": 0.1})
    # kappa switched on later (by hand or by a schedule) without a prior: the step says why.
    opt.param_groups[0]["kappa"] = 1e-2
    p.grad = torch.randn(3, 16)
    before = p.detach().clone()
    with pytest.raises(ValueError, match="prior"):
        opt.step()
    assert torch.equal(p.detach(), before) and p not in opt.state


def test_prior_must_match_params(helpers):
    p, q = _param(helpers, (3, 16), "cpu"), _param(helpers, (2, 16), "cpu", seed=1)
    with pytest.raises(ValueError, match="one tensor per param"):
        SphericalSGD([{"params": [p, q], "prior": [torch.randn(3, 16)]}], kappa=1e-2)
    with pytest.raises(ValueError, match="one tensor per param"):
        SphericalSGD([{"params": [p], "prior": torch.randn(3, 16)}], kappa=1e-2)  # a tensor, not a list
    with pytest.raises(ValueError, match="shape"):
        SphericalSGD([{"params": [p, q], "prior": [torch.randn(3, 16), torch.randn(3, 16)]}], kappa=1e-2)
    with pytest.raises(ValueError, match="shape"):
        SphericalSGD([{"params": [p], "prior": [torch.randn(3, 15)]}], kappa=1e-2)
    zero_row = torch.randn(3, 16)
    zero_row[1] = 0
    with pytest.raises(ValueError, match="prior 0"):
        SphericalSGD([{"params": [p], "prior": [zero_row]}], kappa=1e-2)


def test_prior_is_stored_as_fp32_unit_rows_on_the_param_device(helpers, device):
    p = _param(helpers, (3, 16), device, dtype=torch.bfloat16)
    mu = 4.0 * torch.randn(3, 16, dtype=torch.float64)  # CPU, fp64, not unit
    opt = SphericalSGD([{"params": [p], "prior": [mu]}], kappa=1e-2)
    assert "prior" not in opt.param_groups[0]  # tensors live in state, not in param_groups
    stored = opt.state[p]["prior"]
    assert stored.dtype == torch.float32 and stored.device == p.device and stored.is_contiguous()
    torch.testing.assert_close(stored.cpu(), (mu / mu.norm(dim=-1, keepdim=True)).float(), atol=1e-6, rtol=0)


# -- input checks at the step ---------------------------------------------------------------


def test_non_unit_rows_at_first_step_raise(helpers, device):
    p = torch.nn.Parameter(1.5 * _param(helpers, (3, 16), device).detach())
    opt = SphericalSGD([p], lr=0.1)
    p.grad = torch.randn(3, 16, device=device)
    before = p.detach().clone()
    with pytest.raises(ValueError, match=r"project_to_sphere_"):
        opt.step()
    assert torch.equal(p.detach(), before) and not opt.state[p]
    project_to_sphere_(p)
    opt.step()
    assert int(opt.state[p]["step"]) == 1


@pytest.mark.parametrize("dtype, off", [(torch.bfloat16, 5e-2), (torch.float16, 2e-2), (torch.float32, 5e-3)])
def test_unit_check_tolerates_storage_rounding_only(helpers, dtype, off):
    unit = _param(helpers, (2, 768), "cpu", dtype=dtype)  # projected in fp32, rounded to dtype: passes
    unit.grad = torch.randn(2, 768).to(dtype)
    SphericalSGD([unit]).step()
    off_sphere = torch.nn.Parameter((1.0 + off) * _param(helpers, (2, 768), "cpu", dtype=dtype).detach())
    off_sphere.grad = torch.randn(2, 768).to(dtype)
    with pytest.raises(ValueError, match="not unit vectors"):
        SphericalSGD([off_sphere]).step()


def test_sparse_grads_raise():
    emb = torch.nn.Embedding(10, 8, sparse=True)
    project_to_sphere_(emb.weight)
    opt = SphericalSGD(emb.parameters())
    emb(torch.tensor([1, 2, 2])).sum().backward()
    assert emb.weight.grad.is_sparse
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_params_without_grad_are_skipped(helpers, device, fused):
    p, q = _param(helpers, (3, 64), device), _param(helpers, (2, 64), device, seed=1)
    mu = [torch.randn(3, 64), torch.randn(2, 64)]
    opt = SphericalSGD([{"params": [p, q], "prior": mu}], lr=0.1, kappa=1e-2, beta=0.9, fused=fused)
    q_before, p_before = q.detach().clone(), p.detach().clone()
    for _ in range(3):
        p.grad = torch.randn(3, 64, device=device)
        opt.step()
    assert torch.equal(q.detach(), q_before)
    assert set(opt.state[q]) == {"prior"}  # no step state without a grad
    assert not torch.equal(p.detach(), p_before) and int(opt.state[p]["step"]) == 3


def test_all_grads_none_is_a_no_op(helpers, device, fused):
    p = _param(helpers, (3, 64), device)
    opt = SphericalSGD([p], fused=fused)
    before = p.detach().clone()
    assert opt.step() is None
    assert torch.equal(p.detach(), before) and len(opt.state) == 0


def test_closure_returns_loss_and_its_grads_are_used(helpers, device, fused):
    target = torch.randn(4, 32, device=device)

    def make():
        p = _param(helpers, (4, 32), device)
        return p, SphericalSGD([p], lr=0.1, fused=fused)

    p, opt = make()

    def closure():
        opt.zero_grad()
        loss = -(p * target).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad  # built with grad enabled inside step
    q, opt_q = make()
    manual_loss = -(q * target).sum()
    manual_loss.backward()
    opt_q.step()
    torch.testing.assert_close(loss.detach(), manual_loss.detach())
    assert torch.equal(p.detach(), q.detach())
    assert not torch.equal(p.detach(), make()[0].detach())  # the step did move the rows


def test_zero_grad(helpers, device, fused):
    p = _param(helpers, (3, 64), device)
    opt = SphericalSGD([p], lr=0.1, beta=0.9, fused=fused)
    p.grad = torch.randn(3, 64, device=device)
    opt.step()
    s1 = opt.state[p]["s"].clone()
    opt.zero_grad()
    assert p.grad is None
    before = p.detach().clone()
    opt.step()  # no grads: nothing happens
    assert torch.equal(p.detach(), before) and int(opt.state[p]["step"]) == 1
    p.grad = torch.randn(3, 64, device=device)
    opt.zero_grad(set_to_none=False)
    assert p.grad is not None and not p.grad.any()
    opt.step()  # zero grads: rows stay (up to the retraction's rounding), the step counts, s decays
    torch.testing.assert_close(p.detach(), before, atol=1e-6, rtol=0)
    assert int(opt.state[p]["step"]) == 2
    torch.testing.assert_close(opt.state[p]["s"], 0.9 * s1, rtol=1e-6, atol=0)


# -- fused availability checks ---------------------------------------------------------------


def test_fused_true_on_cpu_without_interpreter_raises(helpers, monkeypatch):
    p = _param(helpers, (2, 16), "cpu")
    for off in ("0", ""):
        monkeypatch.setenv("TRITON_INTERPRET", off)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET|Triton"):
            _check_fused_possible([p])
        with pytest.raises(RuntimeError):
            resolve_fused(True, [p])
        with pytest.raises(RuntimeError):
            SphericalSGD([p], fused=True)
        assert resolve_fused(False, [p]) is False
        assert resolve_fused(None, [p]) is False  # auto never picks the kernel for CPU params


@pytest.mark.skipif(not optim_mod.triton_available(), reason="needs Triton")
def test_fused_check_at_step_time(helpers, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    p = _param(helpers, (2, 16), "cpu")
    opt = SphericalSGD([p], fused=True)  # allowed: the interpreter is on
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    p.grad = torch.randn(2, 16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        opt.step()


def test_fused_true_without_triton_raises(helpers, monkeypatch):
    monkeypatch.setattr(optim_mod, "triton_available", lambda: False)
    p = _param(helpers, (2, 16), "cpu")
    with pytest.raises(RuntimeError, match="needs Triton"):
        _check_fused_possible([p])
    with pytest.raises(RuntimeError, match="needs Triton"):
        SphericalSGD([p], fused=True)
    assert resolve_fused(None, [p]) is False


# -- state dict -----------------------------------------------------------------------------


def _roundtrip_problem(helpers):
    return helpers.make_problem([(3, 64), (2, 2, 64)], 16, seed=5, with_prior=True)


def _new_opt(params, problem, fused, device):
    group = {"params": params, "prior": [mu.to(device) for mu in problem["priors"]]}
    return SphericalSGD([group], lr=LR, kappa=1e-2, beta=0.9, fused=fused)


def _feed(params, opt, grads, device):
    for p, g in zip(params, grads):
        p.grad = g.to(device=device, dtype=p.dtype)
    opt.step()


@pytest.mark.parametrize("via", ["deepcopy", "torch.save"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_state_dict_roundtrip_continues_bit_identically(helpers, device, fused, dtype, via):
    problem = _roundtrip_problem(helpers)
    params = [torch.nn.Parameter(x.clone().to(device=device, dtype=dtype)) for x in problem["inits"]]
    opt = _new_opt(params, problem, fused, device)
    for grads in problem["grads"][:7]:
        _feed(params, opt, grads, device)
    saved_params = [p.detach().clone() for p in params]
    if via == "deepcopy":
        saved = copy.deepcopy(opt.state_dict())
    else:
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)
    for grads in problem["grads"][7:]:
        _feed(params, opt, grads, device)

    # A fresh optimizer, built like the first (a prior it is built with is overwritten by the load).
    params2 = [torch.nn.Parameter(x.clone()) for x in saved_params]
    other_prior = {"inits": None, "priors": [torch.randn(x.shape) for x in problem["inits"]]}
    opt2 = _new_opt(params2, other_prior, fused, device)
    opt2.load_state_dict(saved)
    for p2, sp in zip(params2, saved_params):
        state = opt2.state[p2]
        assert state["s"].dtype == torch.float32 and state["step"].dtype == torch.float32
        assert state["s"].device == sp.device and int(state["step"]) == 7
    for grads in problem["grads"][7:]:
        _feed(params2, opt2, grads, device)
    for p, p2 in zip(params, params2):
        assert torch.equal(p.detach(), p2.detach())
        assert torch.equal(opt.state[p]["s"], opt2.state[p2]["s"])
        assert torch.equal(opt.state[p]["step"], opt2.state[p2]["step"])


def test_state_dict_keeps_fp32_row_state_for_bf16_params(helpers, device):
    p = torch.nn.Parameter(helpers.unit_rows((4, 64), torch.Generator().manual_seed(0)).to(device, torch.bfloat16))
    opt = SphericalSGD([p], beta=0.9)
    # A row state that bf16 cannot hold (1 + 2**-12 rounds to 1 in bf16).
    opt.state[p]["step"] = torch.tensor(3.0, device=device)
    opt.state[p]["s"] = torch.full((4,), 1.0 + 2.0**-12, device=device)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = SphericalSGD([q], beta=0.9)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    assert opt2.state[q]["s"].dtype == torch.float32
    assert torch.equal(opt2.state[q]["s"], opt.state[p]["s"])
    # The loaded state is the optimizer's own: stepping does not write into the dict it came from.
    saved = opt.state_dict()  # holds references to opt's own state tensors
    s_saved = saved["state"][0]["s"].clone()
    opt3 = SphericalSGD([torch.nn.Parameter(p.detach().clone())], beta=0.9)
    opt3.load_state_dict(saved)
    p3 = opt3.param_groups[0]["params"][0]
    p3.grad = torch.randn(4, 64, device=device).to(torch.bfloat16)
    opt3.step()
    assert int(opt3.state[p3]["step"]) == 4 and not torch.equal(opt3.state[p3]["s"], s_saved)
    assert int(saved["state"][0]["step"]) == 3 and torch.equal(saved["state"][0]["s"], s_saved)


# -- LR schedulers ----------------------------------------------------------------------------


def _angles_per_step(helpers, device, fused, n_steps, make_scheduler, lr0=0.1):
    # beta = 0, no prior: every step turns each row by exactly atan(lr), so the
    # measured angle shows the lr the step used.
    p = _param(helpers, (4, 768), device)
    opt = SphericalSGD([p], lr=lr0, fused=fused)
    scheduler = make_scheduler(opt)
    gen = torch.Generator().manual_seed(9)
    angles, lrs = [], []
    for _ in range(n_steps):
        before = p.detach().double().clone()
        p.grad = torch.randn(4, 768, generator=gen).to(device)
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
        after = p.detach().double()
        dot = (before * after).sum(-1)
        cross = (after - dot[:, None] * before).norm(dim=-1)
        angles.append(torch.atan2(cross, dot).cpu())
    return torch.stack(angles), lrs


def _check_angles(angles, expected_lrs):
    expected = torch.tensor([math.atan(lr) for lr in expected_lrs], dtype=torch.float64)
    torch.testing.assert_close(angles, expected[:, None].expand_as(angles), atol=ANGLE_ATOL, rtol=0)


def test_step_lr_scheduler(helpers, device, fused):
    angles, lrs = _angles_per_step(
        helpers, device, fused, 7, lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)
    )
    expected = [0.1, 0.1, 0.05, 0.05, 0.025, 0.025, 0.0125]
    assert lrs == pytest.approx(expected)
    _check_angles(angles, expected)


def test_lambda_lr_scheduler(helpers, device, fused):
    angles, lrs = _angles_per_step(
        helpers, device, fused, 5, lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1.0 / (k + 1))
    )
    expected = [0.1 / (k + 1) for k in range(5)]
    assert lrs == pytest.approx(expected)
    _check_angles(angles, expected)


def test_diffusers_cosine_schedule_with_warmup(helpers, device, fused):
    get_scheduler = pytest.importorskip("diffusers.optimization").get_scheduler
    warmup, total, lr0 = 3, 10, 0.1
    angles, lrs = _angles_per_step(
        helpers,
        device,
        fused,
        total,
        lambda o: get_scheduler("cosine", optimizer=o, num_warmup_steps=warmup, num_training_steps=total),
        lr0=lr0,
    )
    # Linear warmup from 0, then half a cosine period down to 0 (diffusers' formula, written out).
    expected = [
        lr0 * k / warmup if k < warmup else lr0 * 0.5 * (1.0 + math.cos(math.pi * (k - warmup) / (total - warmup)))
        for k in range(total)
    ]
    assert lrs == pytest.approx(expected)
    _check_angles(angles, expected)  # includes step 0 with lr 0: the rows do not move


# -- GradScaler -------------------------------------------------------------------------------


class _TinyModel(torch.nn.Module):
    """m* * rows -> frozen linear head: a directional embedding and a consumer."""

    def __init__(self, device, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.rows = torch.nn.Parameter(project_to_sphere(torch.randn(6, 64, generator=gen)).to(device))
        self.head = torch.nn.Linear(64, 8).to(device)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(8, 64, generator=gen))
            self.head.bias.copy_(torch.randn(8, generator=gen))
        self.head.requires_grad_(False)
        self.prior = project_to_sphere(torch.randn(6, 64, generator=gen)).to(device)

    def loss(self, target):
        return torch.nn.functional.mse_loss(self.head(0.387 * self.rows), target)


def _scaler_setup(device, fused):
    model = _TinyModel(device)
    opt = SphericalSGD([{"params": [model.rows], "prior": [model.prior]}], lr=LR, kappa=1e-2, beta=0.9, fused=fused)
    gen = torch.Generator().manual_seed(1)
    targets = [torch.randn(6, 8, generator=gen).to(device) for _ in range(8)]
    return model, opt, targets


def _plain_run(device, fused, targets_to_use):
    model, opt, targets = _scaler_setup(device, fused)
    for k in targets_to_use:
        opt.zero_grad()
        model.loss(targets[k]).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("explicit_unscale", [False, True], ids=["step", "unscale_-then-step"])
def test_grad_scaler_matches_unscaled_run(device, fused, explicit_unscale):
    model, opt, targets = _scaler_setup(device, fused)
    scaler = torch.amp.GradScaler(device)
    for target in targets:
        opt.zero_grad()
        scaler.scale(model.loss(target)).backward()
        assert model.rows.grad.abs().max() > 100  # the grads really are scaled (scale 2**16)
        if explicit_unscale:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_([model.rows], max_norm=1e9)  # what unscale_ is for; a no-op here
        scaler.step(opt)
        scaler.update()
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")  # the scaler cleaned up
    plain_model, plain_opt = _plain_run(device, fused, range(len(targets)))
    torch.testing.assert_close(model.rows.detach(), plain_model.rows.detach(), atol=SCALER_ATOL, rtol=0)
    torch.testing.assert_close(opt.state[model.rows]["s"], plain_opt.state[plain_model.rows]["s"], rtol=1e-5, atol=0)
    assert int(opt.state[model.rows]["step"]) == len(targets)


# The interpreter evaluates the kernel on the inf grad (then writes nothing): numpy warns.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("explicit_unscale", [False, True], ids=["step", "unscale_-then-step"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_grad_scaler_skips_step_with_non_finite_grad(device, fused, explicit_unscale, bad):
    model, opt, targets = _scaler_setup(device, fused)
    scaler = torch.amp.GradScaler(device)
    inject_at = {0, 4}  # the very first step (state just created) and one mid-run
    for k, target in enumerate(targets):
        opt.zero_grad()
        scaler.scale(model.loss(target)).backward()
        if k in inject_at:
            model.rows.grad[2, 5] = bad
            rows_before = model.rows.detach().clone()
            state_before = {key: v.clone() for key, v in opt.state[model.rows].items()}
        if explicit_unscale:
            scaler.unscale_(opt)
        scale_before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if k in inject_at:
            assert torch.equal(model.rows.detach(), rows_before)
            state = opt.state[model.rows]
            if k == 0:  # state created by the skipped step: step 0, s 0
                assert int(state["step"]) == 0 and not state["s"].any()
            else:
                assert torch.equal(state["s"], state_before["s"]) and torch.equal(state["step"], state_before["step"])
            assert scaler.get_scale() == scale_before / 2  # the scaler saw the inf too
    assert int(opt.state[model.rows]["step"]) == len(targets) - len(inject_at)
    assert torch.isfinite(model.rows).all()
    # Skipped steps leave no trace: the run equals one that never saw those batches.
    plain_model, _ = _plain_run(device, fused, [k for k in range(len(targets)) if k not in inject_at])
    torch.testing.assert_close(model.rows.detach(), plain_model.rows.detach(), atol=SCALER_ATOL, rtol=0)


def test_skipped_step_count_with_found_inf_above_one(helpers, device, fused):
    # GradScaler's found_inf is a SUM over devices: 2.0 when grads on two devices
    # overflow. The step must still count as exactly one skipped step.
    p = _param(helpers, (3, 64), device)
    s, step = torch.zeros(3, device=device), torch.tensor(5.0, device=device)
    before = p.detach().clone()
    spherical_sgd(
        [p.detach()],
        [torch.randn(3, 64, device=device)],
        [s],
        [step],
        None,
        lr=0.1,
        beta=0.9,
        fused=fused,
        found_inf=torch.tensor([2.0], device=device),
    )
    assert float(step) == 5.0
    assert torch.equal(p.detach(), before) and not s.any()


# -- plain RSGD mode against geoopt -----------------------------------------------------------


def test_geoopt_sphere_retraction_is_the_projection_retraction():
    geoopt = pytest.importorskip("geoopt")
    gen = torch.Generator().manual_seed(0)
    x = project_to_sphere(torch.randn(5, 32, generator=gen))
    u = 0.7 * torch.randn(5, 32, generator=gen)
    expected = (x + u) / (x + u).norm(dim=-1, keepdim=True)
    torch.testing.assert_close(geoopt.Sphere().retr(x, u), expected, atol=1e-7, rtol=0)
    # ...and its Riemannian gradient is the tangent projection.
    torch.testing.assert_close(
        geoopt.Sphere().egrad2rgrad(x, u), u - (u * x).sum(-1, keepdim=True) * x, atol=1e-7, rtol=0
    )


@pytest.mark.parametrize("lr", [0.05, 0.5])
def test_plain_mode_matches_geoopt_riemannian_sgd(helpers, device, fused, lr):
    geoopt = pytest.importorskip("geoopt")
    problem = helpers.make_problem([(5, 768), (3, 2, 77)], STEPS, seed=6)
    ours = [torch.nn.Parameter(x.clone().to(device)) for x in problem["inits"]]
    theirs = [geoopt.ManifoldParameter(x.clone().to(device), manifold=geoopt.Sphere()) for x in problem["inits"]]
    opt = SphericalSGD(ours, lr=lr, kappa=0.0, normalize=False, fused=fused)
    ropt = geoopt.optim.RiemannianSGD(theirs, lr=lr)
    for grads in problem["grads"]:
        for a, b, g in zip(ours, theirs, grads):
            a.grad = g.to(device).clone()
            b.grad = g.to(device).clone()
        opt.step()
        ropt.step()
    for a, b, x in zip(ours, theirs, problem["inits"]):
        torch.testing.assert_close(a.detach(), b.detach().as_subclass(torch.Tensor), atol=FP32_ATOL, rtol=0)
        assert (a.detach().cpu() - x).norm(dim=-1).min() > lr  # and every row did travel


# -- degenerate gradients -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_zero_and_parallel_gradients_give_no_nan(helpers, device, fused, dtype, beta):
    gen = torch.Generator().manual_seed(7)
    p = torch.nn.Parameter(helpers.unit_rows((6, 768), gen).to(device=device, dtype=dtype))
    start = p.detach().float().clone()
    opt = SphericalSGD([p], lr=0.1, beta=beta, fused=fused)
    for _ in range(5):
        v = p.detach().float()
        g = torch.empty(6, 768, device=device)
        g[0] = 0.0  # no gradient at all
        g[1] = 3.0 * v[1]  # parallel: no tangent part
        g[2] = -1e3 * v[2]  # anti-parallel, large
        g[3] = 1e-30 * torch.randn(768, generator=gen).to(device)  # ||g||^2 underflows fp32
        g[4] = torch.randn(768, generator=gen).to(device)  # an ordinary row
        g[5] = 0.0
        p.grad = g.to(dtype)
        opt.step()
        out = p.detach().float()
        assert torch.isfinite(out).all() and torch.isfinite(opt.state[p]["s"]).all()
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(6, device=device), atol=ATOL[dtype], rtol=0)
    # Rows with an exactly zero (or underflowing) gradient stay where they were.
    for row in (0, 3, 5):
        torch.testing.assert_close(out[row], start[row], atol=1e-6 if dtype == torch.float32 else ATOL[dtype], rtol=0)
    assert (out[4] - start[4]).norm() > 0.2  # the ordinary row moved (5 steps of ~0.1)


def test_radial_prior_only_gives_no_nan(helpers, device, fused):
    # The prior mean equal to the row: the vMF term is radial and projects to ~0.
    gen = torch.Generator().manual_seed(8)
    p = torch.nn.Parameter(helpers.unit_rows((4, 64), gen).to(device))
    opt = SphericalSGD([{"params": [p], "prior": [p.detach().clone()]}], lr=0.1, kappa=1.0, beta=0.9, fused=fused)
    for _ in range(3):
        p.grad = torch.zeros_like(p)
        opt.step()
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.detach().norm(dim=-1), torch.ones(4, device=device), atol=1e-5, rtol=0)


@pytest.mark.parametrize("eps", [1e-8, 1e-6])
def test_eps_is_added_outside_the_sqrt(helpers, device, fused, eps):
    # A tangent gradient of norm exactly 1e-8: with eps outside the root the step
    # is lr * 1e-8 / (1e-8 + eps); eps inside (sqrt(s + eps)) would give ~lr * 1e-4.
    gen = torch.Generator().manual_seed(10)
    v = helpers.unit_rows((4, 768), gen)
    u = torch.randn(4, 768, generator=gen)
    u = u - (u * v).sum(-1, keepdim=True) * v
    u = u / u.norm(dim=-1, keepdim=True)
    p = torch.nn.Parameter(v.to(device).clone())  # clone: on CPU .to() would alias v
    opt = SphericalSGD([p], lr=0.1, eps=eps, fused=fused)
    p.grad = (1e-8 * u).to(device)
    opt.step()
    after = p.detach().double().cpu()
    dot = (after * v.double()).sum(-1)
    angle = torch.atan2((after - dot[:, None] * v.double()).norm(dim=-1), dot)
    expected = math.atan(0.1 * 1e-8 / (1e-8 + eps))
    torch.testing.assert_close(angle, torch.full((4,), expected, dtype=torch.float64), atol=ANGLE_ATOL, rtol=0)


# -- the vectorized path's cached plan ----------------------------------------------------------------


def test_vectorized_plan_follows_params_that_change_shape_or_storage(helpers, device):
    # The vectorized path caches how a group's params are concatenated and written back
    # (buffers and views). A param given new data of another shape, or new storage, must
    # be stepped as it is now, not as the cached plan remembers it.
    gen = torch.Generator().manual_seed(31)
    params = [torch.nn.Parameter(helpers.unit_rows((2, 64), gen).to(device)) for _ in range(3)]
    opt = SphericalSGD(params, lr=LR, fused=False)
    for p in params:
        p.grad = torch.randn(2, 64, generator=gen).to(device)
    opt.step()
    params[1].data = helpers.unit_rows((5, 64), gen).to(device)  # new shape
    opt.state[params[1]]["s"] = torch.zeros(5, device=device)
    params[2].data = params[2].detach().clone()  # new storage, same shape
    before = [p.detach().clone() for p in params]
    grads = [torch.randn(p.shape, generator=gen).to(device) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    for p, v, g in zip(params, before, grads):
        ref, _ = spherical_sgd_step_reference(v, g, torch.zeros(v.shape[:-1], device=device), 2, lr=LR)
        torch.testing.assert_close(p.detach(), ref, atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("change", ["reshape", "dtype"])
def test_vectorized_plan_follows_a_reshape_or_a_new_dtype_of_the_same_size(helpers, device, change):
    # Changes the cached plan's cheap signature must see: (2, 1, d) -> (1, 2, d) keeps the
    # element count, rank and vector size; fp32 -> bf16 keeps every size.
    gen = torch.Generator().manual_seed(33)
    params = [torch.nn.Parameter(helpers.unit_rows((2, 1, 64), gen).to(device)) for _ in range(3)]
    opt = SphericalSGD(params, lr=LR, fused=False)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device)
    opt.step()
    if change == "reshape":
        params[1].data = params[1].detach().reshape(1, 2, 64).clone()
        opt.state[params[1]]["s"] = torch.zeros(1, 2, device=device)
    else:
        params[1].data = params[1].detach().to(torch.bfloat16)
    before = [p.detach().float().clone() for p in params]
    grads = [torch.randn(p.shape, generator=gen).to(device, p.dtype) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    for i, (p, v, g) in enumerate(zip(params, before, grads)):
        ref, _ = spherical_sgd_step_reference(v, g.float(), torch.zeros(v.shape[:-1], device=device), 2, lr=LR)
        low = p.dtype == torch.bfloat16
        assert p.shape == v.shape
        torch.testing.assert_close(p.detach().float(), ref, atol=2e-2 if low else FP32_ATOL, rtol=0, msg=str(i))


def test_functional_call_outside_no_grad(helpers, device):
    # Like torch's functional optimizers' callers, but without a no_grad block: it still steps.
    gen = torch.Generator().manual_seed(32)
    ps = [torch.nn.Parameter(helpers.unit_rows((2, 64), gen).to(device)) for _ in range(2)]
    grads = [torch.randn(2, 64, generator=gen).to(device) for _ in ps]
    refs = [
        spherical_sgd_step_reference(p.detach(), g, torch.zeros(2, device=device), 1, lr=LR)[0]
        for p, g in zip(ps, grads)
    ]
    spherical_sgd(
        ps,
        grads,
        [torch.zeros(2, device=device) for _ in ps],
        [torch.zeros((), device=device) for _ in ps],
        None,
        lr=LR,
    )
    for p, ref in zip(ps, refs):
        torch.testing.assert_close(p.detach(), ref, atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("run_elements", [130, 1 << 18], ids=["many-runs", "one-run"])
def test_vectorized_runs_share_buffers_correctly(helpers, device, monkeypatch, run_elements):
    # On the CPU a group is cut into runs (see _cpu_run_elements) that share one output
    # buffer; tiny runs (2 rows of 64) exercise many runs, a lone param bigger than a run,
    # mixed dims and 3-D params in one group. Steps with beta and a prior, against the reference.
    monkeypatch.setattr(optim_mod, "_cpu_run_elements", lambda: run_elements)
    shapes = [(1, 64), (1, 64), (2, 64), (3, 64), (1, 77), (2, 2, 64), (1, 64), (2, 77)]
    problem = helpers.make_problem(shapes, 6, seed=33, with_prior=True)
    kw = dict(dtype=torch.float32, device=device, lr=LR, kappa=1e-2, beta=0.9)
    params, opt = helpers.run_optimizer(problem, fused=False, **kw)
    if device == "cpu":
        plan = next(v for k, v in opt._cache.items() if k[0] == "plan")
        n_runs = sum(len(b.runs) for b in plan.buckets)
        assert n_runs == (7 if run_elements == 130 else 2)
    helpers.assert_matches_reference(
        params, opt, helpers.run_reference(problem, **kw), atol=FP32_ATOL, s_rtol=S_RTOL[torch.float32]
    )


def test_packed_state_is_per_param_and_follows_replacement(helpers, device, fused):
    # The optimizer keeps step and s of params that start together packed in one tensor
    # each (per-param views: one op counts every step). A state tensor the user replaces
    # (or a loaded one) must be the one the next step reads and writes.
    problem = helpers.make_problem([(3, 64), (2, 64), (4, 64)], 4, seed=34)
    params = [torch.nn.Parameter(x.clone().to(device)) for x in problem["inits"]]
    opt = SphericalSGD(params, lr=LR, beta=0.9, fused=fused)
    for p, g in zip(params, problem["grads"][0]):
        p.grad = g.to(device)
    opt.step()
    states = [opt.state[p] for p in params]
    assert states[0]["s"]._base is not None and states[0]["s"]._base is states[2]["s"]._base
    assert all(st["step"].shape == () and st["s"].shape == p.shape[:-1] for st, p in zip(states, params))
    # Replace param 1's state by tensors of other values: step 10 and s 0.5.
    states[1]["step"] = torch.tensor(10.0, device=device)
    states[1]["s"] = torch.full((2,), 0.5, device=device)
    before = [p.detach().clone() for p in params]
    s_before = [st["s"].clone() for st in states]
    for p, g in zip(params, problem["grads"][1]):
        p.grad = g.to(device)
    opt.step()
    for i, (p, g) in enumerate(zip(params, problem["grads"][1])):
        t = 11 if i == 1 else 2
        ref_v, ref_s = spherical_sgd_step_reference(before[i], g.to(device), s_before[i], t, lr=LR, beta=0.9)
        torch.testing.assert_close(p.detach(), ref_v, atol=FP32_ATOL, rtol=0)
        torch.testing.assert_close(opt.state[p]["s"], ref_s, rtol=1e-5, atol=0)
        assert int(opt.state[p]["step"]) == t


# -- the step's per-group fast path and cached plans: what invalidates them ----------------------------


def _assert_stepped_like_reference(opt, p, start, grads):
    """``p``'s rows, its ``s`` and its step count are the reference's after ``grads`` from ``start``
    (fresh state: s = 0 at step 0; beta 0.9, no prior)."""
    v, s = start, torch.zeros(start.shape[0], device=start.device)
    for k, g in enumerate(grads):
        v, s = spherical_sgd_step_reference(v, g, s, k + 1, lr=LR, beta=0.9)
    torch.testing.assert_close(p.detach(), v, atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(opt.state[p]["s"], s, rtol=1e-5, atol=0)
    assert int(opt.state[p]["step"]) == len(grads)


def test_cached_plan_follows_params_added_to_a_group(helpers, device):
    # Params appended to a group's list after steps (as a trainer adding a concept might)
    # start at step 1 with fresh state; the others keep theirs.
    gen = torch.Generator().manual_seed(41)
    params = [torch.nn.Parameter(helpers.unit_rows((1, 64), gen).to(device)) for _ in range(5)]
    opt = SphericalSGD(params, lr=LR, beta=0.9, fused=False)
    starts = [p.detach().clone() for p in params]
    grads = [[torch.randn(1, 64, generator=gen).to(device) for _ in range(3)] for _ in range(7)]
    for k in range(2):
        for p, g in zip(params, grads):
            p.grad = g[k]
        opt.step()
    extra = [torch.nn.Parameter(helpers.unit_rows((1, 64), gen).to(device)) for _ in range(2)]
    opt.param_groups[0]["params"].extend(extra)
    starts += [p.detach().clone() for p in extra]
    for p, g in zip(opt.param_groups[0]["params"], grads):
        p.grad = g[2]
    opt.step()
    for i, p in enumerate(opt.param_groups[0]["params"]):
        _assert_stepped_like_reference(opt, p, starts[i], grads[i] if i < 5 else grads[i][2:])


def test_cached_plan_follows_a_param_whose_grad_is_none(helpers, device):
    # A param without a grad at one step is left alone (rows, s and step count); the
    # others are stepped, and the next step with every grad set is right for all.
    gen = torch.Generator().manual_seed(42)
    params = [torch.nn.Parameter(helpers.unit_rows((2, 64), gen).to(device)) for _ in range(4)]
    opt = SphericalSGD(params, lr=LR, beta=0.9, fused=False)
    starts = [p.detach().clone() for p in params]
    grads = [[torch.randn(2, 64, generator=gen).to(device) for _ in range(3)] for _ in range(4)]
    for k in range(3):
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = None if (k == 1 and i == 2) else g[k]
        opt.step()
    for i, p in enumerate(params):
        _assert_stepped_like_reference(opt, p, starts[i], [grads[i][0], grads[i][2]] if i == 2 else grads[i])


def test_cached_plan_follows_load_state_dict(helpers, device):
    # After load_state_dict the step reads the loaded step counts and s (new tensors),
    # not the ones the cached plan and spans were built on.
    gen = torch.Generator().manual_seed(43)
    params = [torch.nn.Parameter(helpers.unit_rows((1, 64), gen).to(device)) for _ in range(6)]
    opt = SphericalSGD(params, lr=LR, beta=0.9, fused=False)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(1, 64, generator=gen).to(device)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    for p in params:  # the state moves on after the save
        p.grad = torch.randn(1, 64, generator=gen).to(device)
    opt.step()
    opt.load_state_dict(saved)
    before = [p.detach().clone() for p in params]
    grads = [torch.randn(1, 64, generator=gen).to(device) for _ in params]
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    for k, (p, v, g) in enumerate(zip(params, before, grads)):
        s_saved = saved["state"][k]["s"].to(device)
        ref, ref_s = spherical_sgd_step_reference(v, g, s_saved, 3, lr=LR, beta=0.9)
        torch.testing.assert_close(p.detach(), ref, atol=FP32_ATOL, rtol=0)
        torch.testing.assert_close(opt.state[p]["s"], ref_s, rtol=1e-5, atol=0)
        assert int(opt.state[p]["step"]) == 3


def test_cpu_runs_restore_the_thread_count(helpers):
    # A CPU run of several params steps on one thread (see optim._one_thread); the caller's
    # intra-op thread count is back afterwards, and the step is the reference's.
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        problem = helpers.make_problem([(4, 64)] * 6, 2, seed=44, with_prior=True)
        kw = dict(dtype=torch.float32, device="cpu", lr=LR, kappa=1e-2, beta=0.9)
        params, opt = helpers.run_optimizer(problem, fused=False, **kw)
        assert torch.get_num_threads() == 2
        helpers.assert_matches_reference(
            params, opt, helpers.run_reference(problem, **kw), atol=FP32_ATOL, s_rtol=S_RTOL[torch.float32]
        )
    finally:
        torch.set_num_threads(before)


def test_cpu_steps_in_two_threads_restore_the_thread_count(helpers):
    # Steps of two optimizers in two Python threads at once: the process-wide thread count
    # is the caller's again when both are done (each reads it outside the other's run).
    import threading

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        opts = []
        for seed in (45, 46):
            gen = torch.Generator().manual_seed(seed)
            params = [torch.nn.Parameter(helpers.unit_rows((2, 64), gen)) for _ in range(20)]
            for p in params:
                p.grad = torch.randn(2, 64, generator=gen)
            opts.append(SphericalSGD(params, lr=LR, fused=False))

        def steps(opt):
            for _ in range(50):
                opt.step()

        workers = [threading.Thread(target=steps, args=(opt,)) for opt in opts]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_cpu_runs_without_scoped_threads_are_cut_at_the_grain(helpers, monkeypatch):
    # Where torch's thread count cannot be changed during work (a non-OpenMP ATen pool),
    # runs of several params are cut below ATen's grain instead, and the step is the same.
    monkeypatch.setattr(optim_mod, "_threads_can_be_scoped", lambda: False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        problem = helpers.make_problem([(64, 768)] * 4, 2, seed=47)
        kw = dict(dtype=torch.float32, device="cpu", lr=LR, beta=0.9)
        params, opt = helpers.run_optimizer(problem, fused=False, **kw)
        plan = next(v for k, v in opt._cache.items() if k[0] == "plan")
        assert sum(len(b.runs) for b in plan.buckets) == 4  # 64 x 768 > the grain: one param per run
        helpers.assert_matches_reference(
            params, opt, helpers.run_reference(problem, **kw), atol=FP32_ATOL, s_rtol=S_RTOL[torch.float32]
        )
    finally:
        torch.set_num_threads(before)


def test_vectorized_step_leaves_normal_tensors_and_counts_versions(helpers):
    # The vectorized runs go through inference mode: params and state must stay normal
    # tensors (usable in place and by autograd afterwards) and the writes must be counted.
    gen = torch.Generator().manual_seed(48)
    params = [torch.nn.Parameter(helpers.unit_rows((2, 64), gen)) for _ in range(5)]
    priors = [helpers.unit_rows((2, 64), gen) for _ in range(5)]
    opt = SphericalSGD([{"params": params, "prior": priors}], lr=LR, kappa=1e-2, beta=0.9, fused=False)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(2, 64, generator=gen)
        versions = [p._version for p in params]
        opt.step()
        assert all(p._version > v for p, v in zip(params, versions))
    for p in params:
        st = opt.state[p]
        assert not any(t.is_inference() for t in (p, st["s"], st["step"], st["prior"]))
        st["s"].mul_(1.0)
        st["prior"].copy_(st["prior"])
    (params[0].sum() * 2).backward()  # autograd still works on the stepped params
    assert params[0].grad is not None


# -- params packed back to back (pack_params_) ------------------------------------------------


def _params_of(problem, device, dtype=torch.float32):
    return [torch.nn.Parameter(x.to(device=device, dtype=dtype).clone()) for x in problem["inits"]]


def test_pack_params_keeps_each_param_and_lays_them_back_to_back(helpers, device):
    gen = torch.Generator().manual_seed(60)
    shapes = [(2, 64), (64,), (3, 1, 64), (1, 64)]
    params = [torch.nn.Parameter(helpers.unit_rows(s, gen).to(device)) for s in shapes]
    params[3].requires_grad_(False)
    params[1].grad = torch.randn(64, generator=gen).to(device)
    grad = params[1].grad
    values = [p.detach().clone() for p in params]
    ids = [id(p) for p in params]
    flat = pack_params_(params)
    assert flat.shape == (sum(v.numel() for v in values),) and flat.dtype == torch.float32
    offset = 0
    for p, v, i, shape in zip(params, values, ids, shapes):
        assert id(p) == i and isinstance(p, torch.nn.Parameter) and p.shape == shape and p.is_contiguous()
        assert torch.equal(p.detach(), v)
        assert p.data_ptr() == flat.data_ptr() + offset * flat.element_size()
        offset += p.numel()
    assert [p.requires_grad for p in params] == [True, True, True, False]
    assert params[1].grad is grad  # grads are left as they are
    flat.zero_()  # one storage: writing the buffer writes the params
    assert all(p.abs().sum() == 0 for p in params)


def test_pack_params_refuses_what_cannot_share_one_tensor(helpers):
    gen = torch.Generator().manual_seed(61)
    a = torch.nn.Parameter(helpers.unit_rows((2, 64), gen))
    with pytest.raises(ValueError, match="param 1 is torch.bfloat16 .*pack the params of each device and dtype"):
        pack_params_([a, torch.nn.Parameter(helpers.unit_rows((2, 64), gen).bfloat16())])
    with pytest.raises(ValueError, match="param 1 is not a leaf"):
        pack_params_([a, a * 2])
    with pytest.raises(ValueError, match="param 1 is given twice"):
        pack_params_([a, a])
    with pytest.raises(ValueError, match="no params"):
        pack_params_([])
    with pytest.raises(TypeError, match="item 0 is a list"):
        pack_params_([[a]])
    before = a.data_ptr()
    with pytest.raises(ValueError):
        pack_params_([a, a])
    assert a.data_ptr() == before  # refused before anything moved


PACKED_SHAPES = {
    "4x64": [(4, 64)] * 6,
    "mixed": [(1, 64), (3, 64), (64,), (2, 2, 64), (1, 64)],
    "two-dims": [(2, 64), (3, 64), (1, 77), (2, 77)],
    "interleaved": [(2, 64), (1, 77), (3, 64), (2, 77)],  # no bucket's params are adjacent
}


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("hyper", list(HYPERS.values()), ids=list(HYPERS))
@pytest.mark.parametrize("shapes", list(PACKED_SHAPES.values()), ids=list(PACKED_SHAPES))
@pytest.mark.parametrize("run_elements", [600, 1 << 18], ids=["many-runs", "one-run"])
def test_packed_params_step_exactly_as_separate_ones(helpers, device, monkeypatch, shapes, hyper, dtype, run_elements):
    # Packed params are read and written in place (no concatenation in, no foreach copy
    # out); the rows, s and step counts must be bit for bit those of separate params,
    # which the reference tests above pin down. Runs of 600 elements cut the group so
    # that several packed runs (and lone params) share the bucket's buffers. In
    # "interleaved" a bucket's params (one per vector size) are not adjacent in the
    # buffer: they take the concatenation path.
    monkeypatch.setattr(optim_mod, "_cpu_run_elements", lambda: run_elements)
    beta, kappa, normalize = hyper
    problem = helpers.make_problem(shapes, 6, seed=62, with_prior=kappa > 0)
    kw = dict(dtype=dtype, device=device, lr=LR, kappa=kappa, beta=beta, normalize=normalize, fused=False)
    separate, opt_s = helpers.run_optimizer(problem, **kw)
    packed, opt_p = helpers.run_optimizer(problem, pack=True, **kw)
    assert packed[1].data_ptr() == packed[0].data_ptr() + packed[0].numel() * packed[0].element_size()
    for a, b in zip(separate, packed):
        assert torch.equal(a, b)
        assert torch.equal(opt_s.state[a]["s"], opt_p.state[b]["s"])
        assert torch.equal(opt_s.state[a]["step"], opt_p.state[b]["step"])
    if device == "cpu":
        spans = [v[2] for k, v in opt_p._cache.items() if k[0] == "packed"]
        assert any(span is not None for span in spans) == (shapes != PACKED_SHAPES["interleaved"])


def test_packed_params_with_grad_scaler_skip_and_missing_grads(helpers, device):
    # A skipped step (found_inf) leaves packed rows as they were; a param without a grad
    # splits the packed run in two (the rest stay packed) and keeps its rows.
    problem = helpers.make_problem([(2, 64)] * 5, 3, seed=63)
    params = _params_of(problem, device)
    pack_params_(params)
    opt = SphericalSGD(params, lr=LR, beta=0.9, fused=False)
    for p, g in zip(params, problem["grads"][0]):
        p.grad = g.to(device)
    opt.grad_scale = torch.ones((), device=device)
    opt.found_inf = torch.ones((), device=device)
    before = [p.detach().clone() for p in params]
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    opt.found_inf = torch.zeros((), device=device)
    params[2].grad = None
    opt.step()
    assert torch.equal(params[2], before[2])
    for i in (0, 1, 3, 4):
        g = problem["grads"][0][i].to(device)
        ref, _ = spherical_sgd_step_reference(before[i], g, torch.zeros(2, device=device), 1, lr=LR, beta=0.9)
        torch.testing.assert_close(params[i].detach(), ref, atol=FP32_ATOL, rtol=0)


def test_packed_params_whose_storage_is_replaced_are_written_where_they_are_now(helpers, device):
    # After a step has cached the packed layout, a param given new storage (``.data =``,
    # as module.to() does) must be written in its new storage, and the old buffer (still
    # alive here) must not be written through a stale alias.
    problem = helpers.make_problem([(2, 64)] * 4, 2, seed=64)
    params = _params_of(problem, device)
    flat = pack_params_(params)
    opt = SphericalSGD(params, lr=LR, fused=False)
    for p, g in zip(params, problem["grads"][0]):
        p.grad = g.to(device)
    opt.step()
    params[1].data = params[1].detach().clone()  # leaves the packed buffer
    old = flat.clone()
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, problem["grads"][1]):
        p.grad = g.to(device)
    opt.step()
    assert torch.equal(flat[128:256], old[128:256])  # its old place in the buffer is untouched
    for p, b, g in zip(params, before, problem["grads"][1]):
        ref, _ = spherical_sgd_step_reference(b, g.to(device), torch.zeros(2, device=device), 2, lr=LR)
        torch.testing.assert_close(p.detach(), ref, atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("pack", [False, True], ids=["separate", "packed"])
def test_a_step_on_a_param_saved_for_backward_fails_that_backward(helpers, device, fused, pack):
    # Every path counts its writes in the params' version counters (the packed path and
    # the kernel write through aliases and raw pointers), so autograd refuses a backward
    # through a graph that saved a param the optimizer has since changed, as it does for
    # torch's own optimizers.
    problem = helpers.make_problem([(2, 64)] * 3, 1, seed=65)
    params = _params_of(problem, device)
    if pack:
        pack_params_(params)
    opt = SphericalSGD(params, lr=LR, fused=fused)
    loss = sum((p * p).sum() for p in params)  # saves every param
    for p, g in zip(params, problem["grads"][0]):
        p.grad = g.to(device)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()

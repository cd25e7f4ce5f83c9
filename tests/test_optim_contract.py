"""The torch.optim contract, scenario by scenario, for SphericalSGD next to torch.optim.SGD.

These restate the generic checks torch's own suite (test/test_optim.py with
common_optimizers.py) holds its built-in optimizers to: copying and pickling an
optimizer, torch's ``load_state_dict`` with its hooks, state entries that are
not params, older state dicts (a Python-number ``step``, a missing group key),
JSON-able param groups, a tensor ``lr``. Each scenario runs the same steps on
``torch.optim.SGD`` (with momentum, so that it has per-param state) or, where
SGD has nothing to compare, ``torch.optim.Adam``, and asserts that SphericalSGD
behaves as torch's optimizer does. Tests taking ``fused`` run on the vectorized
path and on the Triton kernel (under the interpreter on the CPU).

What differs by design (rows must be unit vectors, float64 and sparse grads are
refused, priors are per-param state) is tested in test_optim.py.
"""

from __future__ import annotations

import copy
import io
import json
import multiprocessing
import pickle

import pytest
import torch

from dti_fast import SphericalSGD, project_to_sphere, spherical_sgd_step_reference

LR = 0.05
SHAPES = [(3, 64), (2, 64)]


def _params(device: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(project_to_sphere(torch.randn(s, generator=gen)).to(device=device, dtype=dtype))
        for s in SHAPES
    ]


def _grads(step: int, device: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=gen).to(device) / 8.0 for s in SHAPES]


def _priors(seed: int = 5) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) for s in SHAPES]


def _ours(params, fused, **kw) -> SphericalSGD:
    kw = {"lr": LR, "beta": 0.9, "kappa": 0.1, **kw}
    group = {"params": params}
    if kw["kappa"]:
        group["prior"] = [mu.to(params[0].device) for mu in _priors()]
    return SphericalSGD([group], fused=fused, **kw)


def _sgd(params) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def _optimizers(device, fused):
    """(name, optimizer) pairs on fresh params of the same values: SGD and SphericalSGD."""
    return [("SGD", _sgd(_params(device))), ("SphericalSGD", _ours(_params(device), fused))]


def _step(opt: torch.optim.Optimizer, k: int, device: str) -> None:
    for p, g in zip(opt.param_groups[0]["params"], _grads(k, device)):
        p.grad = g.to(p.dtype)
    opt.step()


def _rows(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in opt.param_groups[0]["params"]]


# -- copies: deepcopy, pickle, torch.save of the whole optimizer, a spawned worker ------------------


def _copy(opt, via: str):
    if via == "deepcopy":
        return copy.deepcopy(opt)
    if via == "pickle":
        return pickle.loads(pickle.dumps(opt))
    buffer = io.BytesIO()
    torch.save(opt, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("via", ["deepcopy", "pickle", "torch.save"])
def test_a_copied_optimizer_steps_like_the_original(device, fused, via):
    # A copy holds copies of the params; stepping both on the same grads gives the same rows.
    for name, opt in _optimizers(device, fused):
        _step(opt, 0, device)
        twin = _copy(opt, via)
        for k in (1, 2):
            _step(opt, k, device)
            _step(twin, k, device)  # raised AttributeError ('_cache') before the fix
        for a, b in zip(_rows(opt), _rows(twin)):
            assert torch.equal(a, b), name
        public = {k for k in opt.__dict__ if not k.startswith("_")}
        assert public == {k for k in twin.__dict__ if not k.startswith("_")}, name


def _worker_steps(optimizers: list, grads: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """Runs in a spawned process: step each optimizer it was sent on ``grads``, return the rows."""
    out = []
    for opt in optimizers:
        for step_grads in grads:
            for p, g in zip(opt.param_groups[0]["params"], step_grads):
                p.grad = g.to(p.dtype)
            opt.step()
        out.append([p.detach().clone() for p in opt.param_groups[0]["params"]])
    return out


def test_an_optimizer_sent_to_a_spawned_worker_steps_there():
    # Both paths and SGD in one worker (a spawn costs seconds); CPU tensors travel by pickle.
    optimizers = [_sgd(_params("cpu")), _ours(_params("cpu"), False)]
    from dti_fast.optim import triton_available

    if triton_available():
        optimizers.append(_ours(_params("cpu"), True))  # the worker inherits TRITON_INTERPRET=1
    for opt in optimizers:
        _step(opt, 0, "cpu")
    grads = [_grads(k, "cpu") for k in (1, 2)]
    # Sent tensors move to shared memory (torch's reductions), so the worker writes the
    # parent's params: the comparison steps local copies taken before.
    local = copy.deepcopy(optimizers)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        remote = pool.apply(_worker_steps, (optimizers, grads))
    for opt, rows in zip(local, remote):
        for step_grads in grads:
            for p, g in zip(opt.param_groups[0]["params"], step_grads):
                p.grad = g
            opt.step()
        for a, b in zip(_rows(opt), rows):
            assert torch.equal(a, b), type(opt).__name__


# -- load_state_dict and its hooks -------------------------------------------------------------------


def _state_of(opt, p) -> torch.Tensor:
    """The per-param state tensor that differs between params (SGD's momentum, our s)."""
    st = opt.state[p]
    return st["momentum_buffer"] if "momentum_buffer" in st else st["s"]


def test_a_load_pre_hook_that_returns_a_new_state_dict_is_used(device, fused):
    # The hook renumbers the saved param ids and swaps the two params' state: the
    # loaded optimizer must follow the hook's dict, as SGD does.
    for name, opt in _optimizers(device, fused):
        _step(opt, 0, device)
        saved = opt.state_dict()
        shifted = {
            "state": {100 + k: v for k, v in saved["state"].items()},
            "param_groups": [{**g, "params": [100 + i for i in g["params"]]} for g in saved["param_groups"]],
        }
        fresh = _sgd(_params(device)) if name == "SGD" else _ours(_params(device), fused)

        def hook(optimizer, state_dict):
            state = {k - 100: v for k, v in state_dict["state"].items()}
            state[0], state[1] = state[1], state[0]  # a rewrite that the hook owns
            groups = [{**g, "params": [i - 100 for i in g["params"]]} for g in state_dict["param_groups"]]
            return {"state": state, "param_groups": groups}

        fresh.register_load_state_dict_pre_hook(hook)
        fresh.load_state_dict(shifted)
        p0, p1 = fresh.param_groups[0]["params"]
        q0, q1 = opt.param_groups[0]["params"]
        # Shapes differ (3 and 2 rows for ours; momentum buffers follow the swap too).
        assert torch.equal(_state_of(fresh, p0).float(), _state_of(opt, q1).float()), name
        assert torch.equal(_state_of(fresh, p1).float(), _state_of(opt, q0).float()), name


def test_what_a_load_post_hook_changes_stays(device, fused):
    for name, opt in _optimizers(device, fused):
        _step(opt, 0, device)
        saved = opt.state_dict()

        def post(optimizer):
            optimizer.param_groups[0]["lr"] = 0.123
            first = optimizer.param_groups[0]["params"][0]
            optimizer.state[first]["marker"] = "post-hook"

        opt.register_load_state_dict_post_hook(post)
        opt.load_state_dict(saved)
        first = opt.param_groups[0]["params"][0]
        assert opt.param_groups[0]["lr"] == 0.123, name
        assert opt.state[first]["marker"] == "post-hook", name
        _step(opt, 1, device)  # an extra state key does not break the step


def test_state_entries_that_are_not_params_are_carried_over(device, fused):
    for name, opt in _optimizers(device, fused):
        _step(opt, 0, device)
        opt.state["note"] = 1
        saved = opt.state_dict()
        assert saved["state"]["note"] == 1, name
        fresh = _sgd(_params(device)) if name == "SGD" else _ours(_params(device), fused)
        fresh.load_state_dict(saved)  # raised KeyError before the fix
        assert fresh.state["note"] == 1, name
        _step(fresh, 1, device)


@pytest.mark.parametrize("step", [3, 3.0], ids=["int", "float"])
def test_a_state_dict_whose_step_is_a_python_number_loads(device, fused, step):
    # torch's Adam turns a Python-number step into a tensor; so does SphericalSGD.
    pairs = [("Adam", torch.optim.Adam(_params(device), lr=LR)), ("SphericalSGD", _ours(_params(device), fused))]
    for name, opt in pairs:
        for k in range(3):
            _step(opt, k, device)
        saved = copy.deepcopy(opt.state_dict())  # state_dict() shares the per-param dicts with opt
        for st in saved["state"].values():
            st["step"] = step
        same = [torch.nn.Parameter(r) for r in _rows(opt)]
        fresh = torch.optim.Adam(same, lr=LR) if name == "Adam" else _ours(same, fused)
        fresh.load_state_dict(saved)
        _step(fresh, 3, device)  # raised "'float' object has no attribute 'detach'" before the fix
        _step(opt, 3, device)
        for a, b in zip(_rows(opt), _rows(fresh)):
            assert torch.equal(a, b), name
        first = fresh.param_groups[0]["params"][0]
        assert torch.is_tensor(fresh.state[first]["step"]) and int(fresh.state[first]["step"]) == 4, name


def test_a_state_dict_from_before_a_hyper_parameter_existed_loads(device, fused):
    # torch's built-ins fill a missing group key from the defaults in __setstate__.
    pairs = [("Adam", torch.optim.Adam(_params(device), lr=LR)), ("SphericalSGD", _ours(_params(device), fused))]
    for name, opt in pairs:
        _step(opt, 0, device)
        saved = opt.state_dict()
        del saved["param_groups"][0]["fused"]
        fresh = torch.optim.Adam(_params(device), lr=LR) if name == "Adam" else _ours(_params(device), fused)
        fresh.load_state_dict(saved)
        assert fresh.param_groups[0]["fused"] == fresh.defaults["fused"], name
        _step(fresh, 1, device)  # raised KeyError: 'fused' before the fix
    # Every hyper-parameter of SphericalSGD, not only fused, is filled in.
    opt = _ours(_params(device), fused)
    _step(opt, 0, device)
    saved = opt.state_dict()
    saved["param_groups"][0] = {"params": saved["param_groups"][0]["params"], "lr": LR}
    fresh = _ours(_params(device), fused, beta=0.5)
    fresh.load_state_dict(saved)
    group = fresh.param_groups[0]
    assert group["beta"] == 0.5 and group["kappa"] == 0.1 and group["fused"] == fused
    _step(fresh, 1, device)


def test_an_unpickled_optimizer_of_an_older_version_gets_new_defaults(device):
    # Pickles of older versions lack newer group keys and keep priors in the group.
    opt = _ours(_params(device), False)
    _step(opt, 0, device)
    state = opt.__getstate__()
    old = copy.deepcopy(state)
    group = old["param_groups"][0]
    del group["fused"]
    del old["defaults"]["fused"]
    group["prior"] = [old["state"][p].pop("prior") for p in group["params"]]
    revived = SphericalSGD.__new__(SphericalSGD)
    revived.__setstate__(old)
    assert revived.param_groups[0]["fused"] is None and "prior" not in revived.param_groups[0]
    for p, q in zip(revived.param_groups[0]["params"], opt.param_groups[0]["params"]):
        assert torch.equal(revived.state[p]["prior"], opt.state[q]["prior"])
    _step(revived, 1, device)
    _step(opt, 1, device)
    for a, b in zip(_rows(opt), _rows(revived)):
        assert torch.equal(a, b)


# -- what a state dict holds ------------------------------------------------------------------------


def test_param_groups_hold_no_tensors(device, fused):
    for name, opt in _optimizers(device, fused):
        _step(opt, 0, device)
        json.dumps(opt.state_dict()["param_groups"])  # failed on the prior tensors before the fix
        assert "tensor(" not in repr(opt), name


def test_priors_are_state_saved_and_restored(helpers, device, fused):
    opt = _ours(_params(device), fused)
    _step(opt, 0, device)
    saved = copy.deepcopy(opt.state_dict())
    expected = [project_to_sphere(mu) for mu in _priors()]
    for st, mu in zip(saved["state"].values(), expected):
        torch.testing.assert_close(st["prior"].cpu(), mu, atol=1e-6, rtol=0)
    # Built with other priors, or with none: the loaded ones replace them.
    for other in ({"prior": [mu.to(device) for mu in _priors(seed=9)]}, {}):
        params = _params(device)
        fresh = SphericalSGD([{"params": params, **other}], lr=LR, beta=0.9, kappa=0.1 if other else 0.0, fused=fused)
        fresh.load_state_dict(saved)
        for p, mu in zip(params, expected):
            assert fresh.state[p]["prior"].dtype == torch.float32
            torch.testing.assert_close(fresh.state[p]["prior"].cpu(), mu, atol=1e-6, rtol=0)


def test_a_state_dict_without_priors_keeps_the_priors_the_optimizer_was_built_with(device, fused):
    # A checkpoint that holds only step and s (as a trainer may write it) or one from a
    # version that kept priors in the group: neither loses the priors.
    opt = _ours(_params(device), fused)
    _step(opt, 0, device)
    built = [opt.state[p]["prior"].clone() for p in opt.param_groups[0]["params"]]
    saved = opt.state_dict()
    bare = {
        "state": {k: {"step": v["step"], "s": v["s"]} for k, v in saved["state"].items()},
        "param_groups": saved["param_groups"],
    }
    fresh = _ours(_params(device), fused)
    fresh.load_state_dict(bare)
    for p, mu in zip(fresh.param_groups[0]["params"], built):
        assert torch.equal(fresh.state[p]["prior"], mu)
    legacy_priors = [project_to_sphere(mu).to(device) for mu in _priors(seed=9)]
    legacy = {"state": bare["state"], "param_groups": [{**saved["param_groups"][0], "prior": legacy_priors}]}
    fresh.load_state_dict(legacy)
    assert "prior" not in fresh.param_groups[0]
    for p, mu in zip(fresh.param_groups[0]["params"], legacy_priors):
        assert torch.equal(fresh.state[p]["prior"], mu)
    _step(fresh, 1, device)


def test_fp32_state_survives_a_user_pre_hook_for_16_bit_params(device, fused):
    # The optimizer's own pre-hook runs after the user's: s stays fp32-exact.
    p = torch.nn.Parameter(_params(device)[0].detach().to(torch.bfloat16))
    opt = SphericalSGD([p], beta=0.9, fused=fused)
    opt.state[p]["step"] = torch.tensor(3.0, device=device)
    opt.state[p]["s"] = torch.full((3,), 1.0 + 2.0**-12, device=device)  # bf16 rounds this to 1
    saved = opt.state_dict()
    q = torch.nn.Parameter(p.detach().clone())
    fresh = SphericalSGD([q], beta=0.9, fused=fused)
    calls = []
    fresh.register_load_state_dict_pre_hook(lambda o, sd: calls.append(1) or copy.deepcopy(sd))
    fresh.load_state_dict(saved)
    assert calls == [1]
    assert fresh.state[q]["s"].dtype == torch.float32 and torch.equal(fresh.state[q]["s"], opt.state[p]["s"])


# -- priors changed during training ------------------------------------------------------------------


@pytest.mark.parametrize("how", ["in-place", "assigned"])
def test_a_prior_changed_between_steps_is_used(helpers, device, fused, how):
    # Two params in one group (their priors are packed together by the vectorized path):
    # a prior changed in place, or replaced, must be what the next step uses.
    opt = _ours(_params(device), fused, kappa=0.5)
    _step(opt, 0, device)
    _step(opt, 1, device)
    p0, p1 = opt.param_groups[0]["params"]
    new_mu = project_to_sphere(torch.randn(SHAPES[1], generator=torch.Generator().manual_seed(77))).to(device)
    if how == "in-place":
        opt.state[p1]["prior"].copy_(new_mu)
    else:
        opt.state[p1]["prior"] = new_mu.clone()
    before = [p.detach().clone() for p in (p0, p1)]
    s_before = [opt.state[p]["s"].clone() for p in (p0, p1)]
    mus = [opt.state[p0]["prior"], new_mu]
    _step(opt, 2, device)
    for i, (p, g) in enumerate(zip((p0, p1), _grads(2, device))):
        ref, _ = spherical_sgd_step_reference(before[i], g, s_before[i], 3, lr=LR, kappa=0.5, mu=mus[i], beta=0.9)
        torch.testing.assert_close(p.detach(), ref, atol=1e-5, rtol=0)
    stale, _ = spherical_sgd_step_reference(
        before[1],
        _grads(2, device)[1],
        s_before[1],
        3,
        lr=LR,
        kappa=0.5,
        mu=project_to_sphere(_priors()[1]).to(device),
        beta=0.9,
    )
    assert (p1.detach() - stale).abs().max() > 1e-3  # the old prior would give another step


# -- tensor lr ------------------------------------------------------------------------------------


def test_a_tensor_lr_is_accepted_like_torch(device, fused):
    for name, make in [
        ("SGD", lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9)),
        ("SphericalSGD", lambda ps, lr: _ours(ps, fused, lr=lr)),
    ]:
        with_tensor = make(_params(device), torch.tensor(LR))
        with_float = make(_params(device), LR)
        scheduler = torch.optim.lr_scheduler.StepLR(with_tensor, step_size=1, gamma=0.5)
        scheduler_f = torch.optim.lr_scheduler.StepLR(with_float, step_size=1, gamma=0.5)
        for k in range(3):
            _step(with_tensor, k, device)
            _step(with_float, k, device)
            scheduler.step()
            scheduler_f.step()
        assert torch.is_tensor(with_tensor.param_groups[0]["lr"]), name
        for a, b in zip(_rows(with_tensor), _rows(with_float)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
        with pytest.raises(ValueError):
            make(_params(device), torch.tensor([LR, LR]))


# -- step hooks -------------------------------------------------------------------------------------


def test_step_hooks_run_around_the_step(device, fused):
    for name, opt in _optimizers(device, fused):
        calls = []
        opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", _rows(o)[0].sum().item())))
        opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", _rows(o)[0].sum().item())))
        _step(opt, 0, device)
        assert [c[0] for c in calls] == ["pre", "post"] and calls[0][1] != calls[1][1], name


def test_named_parameters_and_their_names_in_the_state_dict(device, fused):
    for name, make in [
        ("SGD", lambda ps: torch.optim.SGD(ps, lr=LR, momentum=0.9)),
        ("SphericalSGD", lambda ps: SphericalSGD(ps, lr=LR, beta=0.9, fused=fused)),
    ]:
        named = list(zip(("a", "b"), _params(device)))
        opt = make(named)
        _step(opt, 0, device)
        saved = copy.deepcopy(opt.state_dict())  # torch's load would alias SGD's momentum buffers
        assert saved["param_groups"][0]["param_names"] == ["a", "b"], name
        json.dumps(saved["param_groups"])
        again = make(list(zip(("a", "b"), [torch.nn.Parameter(r) for r in _rows(opt)])))
        again.load_state_dict(saved)
        _step(again, 1, device)
        _step(opt, 1, device)
        for x, y in zip(_rows(opt), _rows(again)):
            assert torch.equal(x, y), name

"""SphericalSGD: Riemannian SGD on the unit hypersphere with a von Mises-Fisher prior.

A drop-in ``torch.optim.Optimizer``. The update itself is the functional
:func:`spherical_sgd`, with two interchangeable implementations chosen by
``fused``: a vectorized torch path (every param of a group in one batched
computation) and a Triton kernel (one launch for all rows). Both compute the
step of :func:`dti_fast.sphere.spherical_sgd_step_reference`.

The optimizer keeps torch's optimizer contract: torch's own ``state_dict`` and
``load_state_dict`` (with their hooks), pickling, ``copy.deepcopy`` and
``torch.save`` of the optimizer, state entries that are not params, and state
dicts from older versions (missing group keys are filled from the defaults).
The per-param state is ``step`` (fp32 scalar tensor), ``s`` (fp32, one per row)
and, for params given a prior, ``prior`` (fp32 unit rows shaped like the param).
"""

from __future__ import annotations

import contextlib
import functools
import operator
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import torch
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from .sphere import project_to_sphere

__all__ = ["SphericalSGD", "spherical_sgd", "pack_params_", "triton_available", "resolve_fused"]

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# How far from 1 a row's norm may be at the first step (storage rounding of a
# unit vector is ~1e-7 in fp32 and ~1e-3 in 16-bit formats).
_UNIT_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 5e-3}
#: The hyper-parameters of a param group and their defaults. A group (or a
#: loaded state dict, or an unpickled optimizer) that lacks one gets it from the
#: optimizer's defaults, so state dicts stay loadable when one is added.
HYPER_DEFAULTS: dict[str, Any] = {"lr": 0.01, "kappa": 0.0, "beta": 0.0, "eps": 1e-8, "normalize": True, "fused": None}
_GRAD = operator.attrgetter("grad")
_IS_SPARSE = operator.attrgetter("is_sparse")
_S = operator.itemgetter("s")
_STEP = operator.itemgetter("step")
_PRIOR = operator.itemgetter("prior")
_VERSION = operator.attrgetter("_version")
#: Per-param state kept in fp32 on the param's device whatever the param dtype.
_FP32_STATE = ("step", "s", "prior")


def triton_available() -> bool:
    """True when Triton imports (it is needed for ``fused=True``)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class _Fp32:
    """A state tensor wrapped so that torch's ``load_state_dict`` does not cast it.

    torch casts every floating state tensor to its param's dtype when loading;
    SphericalSGD's state is fp32 for 16-bit params too. The optimizer's own
    load pre-hook wraps ``step``/``s``/``prior`` in this (not a tensor, not
    iterable: torch passes it through untouched) and ``__setstate__``, which
    torch's ``load_state_dict`` calls, unwraps it into an fp32 copy on the
    param's device.
    """

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def _load_state_dict_pre_hook(optimizer: SphericalSGD, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Prepare a state dict for torch's ``load_state_dict`` (the optimizer's own pre-hook, run last).

    - Priors of state dicts from before priors were state (a list of tensors
      under a group's ``prior``) move into the per-param state.
    - A param whose loaded state has no ``prior`` keeps the prior it has now
      (the one it was built with).
    - ``step``, ``s`` and ``prior`` tensors are wrapped so that torch does not
      round them to a 16-bit param's dtype (see :class:`_Fp32`).

    Returns a new dict; the caller's state dict and its nested dicts are not modified.
    """
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        return state_dict  # torch's load_state_dict raises its own error
    state = dict(state_dict["state"])
    groups = []
    id_map: dict[Any, torch.Tensor] = {}
    for saved, group in zip(saved_groups, optimizer.param_groups):
        id_map.update(zip(saved["params"], group["params"]))
        if "prior" in saved:
            saved = dict(saved)
            legacy = saved.pop("prior")
            if legacy is not None:
                for sid, mu in zip(saved["params"], legacy):
                    entry = dict(state.get(sid, {}))
                    entry.setdefault("prior", mu)
                    state[sid] = entry
        groups.append(saved)
    for sid, p in id_map.items():
        current = optimizer.state.get(p)
        entry = state.get(sid)
        if current is not None and "prior" in current and (entry is None or "prior" not in entry):
            entry = dict(entry or {})
            entry["prior"] = current["prior"]
            state[sid] = entry
        if entry:
            entry = dict(entry)
            for key in _FP32_STATE:
                if isinstance(entry.get(key), torch.Tensor):
                    entry[key] = _Fp32(entry[key])
            state[sid] = entry
    return {**state_dict, "state": state, "param_groups": groups}


def _own_fp32_state(state: dict[str, Any], p: torch.Tensor) -> None:
    """Make ``step``/``s``/``prior`` of one param's state fp32 tensors on its device (in place).

    Wrapped values (from a load) are copied, so the optimizer never writes into
    the state dict it was loaded from; a ``step`` saved as a Python number
    becomes a tensor.
    """
    for key in _FP32_STATE:
        if key not in state:
            continue
        value = state[key]
        if isinstance(value, _Fp32):
            value = value.tensor.detach().to(device=p.device, dtype=torch.float32, copy=True)
        elif not isinstance(value, torch.Tensor):
            value = torch.tensor(float(value), dtype=torch.float32, device=p.device)
        elif value.dtype != torch.float32 or value.device != p.device:
            value = value.detach().to(device=p.device, dtype=torch.float32)
        state[key] = value if key == "step" else value.contiguous()


def _init_packed_state(
    states: list[dict],
    params: list[torch.Tensor],
    device: torch.device,
    values: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> None:
    """Give ``params`` their ``step`` and ``s`` as views into one packed step and one packed s tensor.

    Each param keeps its own tensors (a 0-dim ``step``, ``s`` shaped
    ``param.shape[:-1]``), as torch's contract has it; packed together, a step
    over these params counts steps in one op and writes ``s`` in one copy (see
    :func:`_span`). ``values`` (step, s) fill them; zeros without.
    """
    rows = [p.numel() // p.shape[-1] for p in params]
    steps = torch.zeros(len(params), dtype=torch.float32, device=device)
    s_all = torch.zeros(sum(rows), dtype=torch.float32, device=device)
    offset = 0
    for k, (st, p, n) in enumerate(zip(states, params, rows)):
        st["step"] = steps[k]
        st["s"] = s_all[offset : offset + n].view(p.shape[:-1])
        if values is not None:
            st["step"].copy_(values[k][0])
            st["s"].copy_(values[k][1])
        offset += n


def _repack_state(params: Sequence[torch.Tensor], state: dict) -> None:
    """Re-pack the step and s of a group's params (per device, in group order) after a load or unpickle."""
    by_device: dict[torch.device, list] = {}
    for p in params:
        st = state.get(p)
        if not st or not isinstance(st.get("step"), torch.Tensor) or not isinstance(st.get("s"), torch.Tensor):
            continue
        step, s = st["step"], st["s"]
        if step.numel() != 1 or tuple(s.shape) != tuple(p.shape[:-1]) or s.device != p.device:
            continue
        by_device.setdefault(p.device, []).append((p, st, step.reshape(()), s))
    for device, items in by_device.items():
        _init_packed_state(
            [st for _, st, _, _ in items],
            [p for p, _, _, _ in items],
            device,
            values=[(step, s) for _, _, step, s in items],
        )


def _span(tensors: Sequence[torch.Tensor], cache: dict, tag: str) -> torch.Tensor | None:
    """A 1-D view of the stretch of one tensor that ``tensors`` cover in order, or None.

    True when the tensors are contiguous views of one base tensor lying back to
    back (as :func:`_init_packed_state` makes them); then one op on the span
    updates them all. Cached on the tensors' identity (a replaced state tensor
    is a new object, and then the answer is worked out again).
    """
    key = ("span", tag, len(tensors), id(tensors[0]))
    hit = cache.get(key)
    if hit is not None and len(hit[0]) == len(tensors) and all(map(operator.is_, hit[0], tensors)):
        return hit[1]
    span = None
    base = tensors[0]._base
    if base is not None and base.is_contiguous():
        start = pos = tensors[0].storage_offset()
        for t in tensors:
            if t._base is not base or not t.is_contiguous() or t.storage_offset() != pos:
                break
            pos += t.numel()
        else:
            first = start - base.storage_offset()
            span = base.view(-1)[first : first + pos - start]
    if sum(1 for k in cache if k[0] == "span") >= 256:
        for old in [k for k in cache if k[0] == "span"]:
            del cache[old]
    cache[key] = (list(tensors), span)
    return span


class SphericalSGD(Optimizer):
    r"""Riemannian SGD on the unit sphere with adaptive step normalization (DTI).

    Every param is a stack of unit vectors: its last dimension is the vector,
    every leading index a row. Per row ``v`` and step ``t``::

        g = dL/dv - kappa * mu                      # vMF prior
        g = g - (g . v) v                           # tangent projection
        s = beta * s + (1 - beta) * ||g||^2         # one scalar per row
        g = g / (sqrt(s / (1 - beta^t)) + eps)      # adaptive normalization
        v = (v - lr * g) / ||v - lr * g||           # update and retraction

    Args:
        params: tensors or param-group dicts. A group may hold ``prior``: a list
            of tensors, one per param and shaped like it (the vMF means; rows
            are normalized here and kept, in fp32, as the param's state
            ``"prior"``, which ``state_dict`` saves).
        lr: step length, a float or a one-element tensor (read with ``float()``
            every step: a host sync for a CUDA tensor). With ``beta=0`` each step
            moves a row by ``lr`` along the sphere before retraction.
        kappa: vMF concentration; ``kappa > 0`` needs a ``prior`` in the group.
        beta: decay of the running squared-norm ``s``; 0 normalizes every step.
        eps: added to ``sqrt(s)`` (outside the root).
        normalize: ``False`` drops the normalization line: plain Riemannian SGD
            with projection retraction.
        fused: ``None`` picks the Triton kernel for CUDA params when Triton
            imports, else the vectorized torch path; ``False`` forces the torch
            path; ``True`` forces the kernel (CUDA params, or CPU params under
            ``TRITON_INTERPRET=1`` for testing).

    Rows must have unit norm at the first step (use
    :func:`dti_fast.project_to_sphere_`). Params are fp32, bf16 or fp16; the
    math runs in fp32 and the per-param state is fp32. A prior can be changed
    during training, in place (``opt.state[p]["prior"].copy_(unit_rows)``) or
    by assigning a new fp32 tensor of unit rows; the next step uses it. The
    optimizer works with ``torch.amp.GradScaler``: it reads the scaler's
    ``grad_scale`` and ``found_inf`` on the device (one copy per device when
    params are on several), so a step with inf/NaN grads changes nothing and
    needs no host sync.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor = 0.01,
        kappa: float = 0.0,
        beta: float = 0.0,
        eps: float = 1e-8,
        normalize: bool = True,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(lr=lr, kappa=kappa, beta=beta, eps=eps, normalize=normalize, fused=fused)
        # Derived tables (packed priors, row counts, kernel pointer tables): not state,
        # never pickled (__setstate__ makes a new one).
        self._cache: dict = {}
        super().__init__(params, defaults)
        self._register_own_load_hook()

    # -- pickling, copying, loading ----------------------------------------------

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore from a pickle/deepcopy, or take the state of ``load_state_dict``.

        torch pickles ``defaults``, ``state`` and ``param_groups`` only: the
        derived cache and the optimizer's own load hook are rebuilt here; group
        keys missing from older state dicts are filled from the defaults
        (priors kept in a group by older versions move into the state); the
        per-param state is made fp32 tensors on the param's device, and the
        ``step``/``s`` of each group re-packed (see :func:`_init_packed_state`).
        """
        super().__setstate__(state)
        self._cache = {}
        for key, value in HYPER_DEFAULTS.items():
            self.defaults.setdefault(key, value)
        self.defaults.pop("prior", None)  # a default of older versions
        for group in self.param_groups:
            legacy = group.pop("prior", None)  # older versions kept priors in the group
            for key in HYPER_DEFAULTS:
                group.setdefault(key, self.defaults[key])
            for p, mu in zip(group["params"], legacy or ()):
                self.state[p].setdefault("prior", mu)
            for p in group["params"]:
                param_state = self.state.get(p)
                if param_state:
                    _own_fp32_state(param_state, p)
            _repack_state(group["params"], self.state)
        self._register_own_load_hook()

    def _register_own_load_hook(self) -> None:
        hooks = self._optimizer_load_state_dict_pre_hooks
        if getattr(self, "_own_load_hook_id", None) not in hooks:
            handle = super().register_load_state_dict_pre_hook(_load_state_dict_pre_hook)
            self._own_load_hook_id = handle.id

    def register_load_state_dict_pre_hook(
        self,
        hook: Callable[[Optimizer, dict[str, Any]], dict[str, Any] | None],
        prepend: bool = False,
    ) -> RemovableHandle:
        """torch's ``register_load_state_dict_pre_hook``; the optimizer's own pre-hook stays the last one run."""
        handle = super().register_load_state_dict_pre_hook(hook, prepend)
        self._optimizer_load_state_dict_pre_hooks.move_to_end(self._own_load_hook_id)
        return handle

    # -- param groups ---------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, checking params and hyper-parameters; a ``prior`` list becomes state."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group).__name__}")
        group = dict(param_group)
        prior = group.pop("prior", None)
        super().add_param_group(group)
        group = self.param_groups[-1]
        try:
            priors = _checked_group(group, prior)
            if group["fused"]:
                _check_fused_possible(group["params"])
        except Exception:
            self.param_groups.pop()
            raise
        for p, mu in zip(group["params"], priors or ()):
            self.state[p]["prior"] = mu

    # -- the step ---------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Take one step; ``closure`` re-evaluates the model and returns the loss.

        Every check (sparse grads, a prior for ``kappa > 0``, unit rows at a
        param's first step) runs for all groups before anything is changed.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        state_of = self.state
        work = []
        first: list[tuple[torch.Tensor, int, list, int]] = []
        for group in self.param_groups:
            use_prior = group["kappa"] != 0.0
            # The common case in C-level passes (no Python work per param): every
            # param has a dense grad and its state (with a prior where needed).
            params = group["params"]
            grads = list(map(_GRAD, params))
            states = list(map(state_of.get, params)) if params else []
            if (
                any(map(operator.is_, grads, repeat(None)))
                or any(map(_IS_SPARSE, grads))
                or None in states
                or not all(map(operator.contains, states, repeat("step")))
                or (use_prior and not all(map(operator.contains, states, repeat("prior"))))
            ):
                params, grads, states = self._checked_params(group, use_prior, first)
            if params:
                work.append((group, params, grads, states))
        for p, i, _, _ in first:
            _check_unit_rows(p, i)
        batches: dict[tuple, list] = {}
        for p, _, states, j in first:
            states[j] = state_of[p]
            batches.setdefault((id(states), p.device), []).append(p)
        for (_, device), new_params in batches.items():
            _init_packed_state([state_of[p] for p in new_params], new_params, device)
        for group, params, grads, states in work:
            use_prior = group["kappa"] != 0.0
            spherical_sgd(
                params,
                grads,
                list(map(_S, states)),
                list(map(_STEP, states)),
                list(map(_PRIOR, states)) if use_prior else None,
                lr=group["lr"],
                kappa=group["kappa"],
                beta=group["beta"],
                eps=group["eps"],
                normalize=group["normalize"],
                fused=resolve_fused(group["fused"], params),
                grad_scale=grad_scale,
                found_inf=found_inf,
                cache=self._cache,
            )
        return loss

    def _checked_params(self, group: dict[str, Any], use_prior: bool, first: list) -> tuple[list, list, list]:
        """A group's params with a grad, their grads and states, checked param by param.

        Raises for a sparse grad or a missing prior; params at their first step
        (no state yet) are added to ``first`` (with the states list and their
        place in it, filled in once their state is made).
        """
        state_of = self.state
        params, grads, states = [], [], []
        for i, p in enumerate(group["params"]):
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError(
                    "SphericalSGD does not support sparse gradients; build the embedding with "
                    "sparse=False (DirectionalEmbedding's rows are small and dense)"
                )
            param_state = state_of.get(p)
            if param_state is None or "step" not in param_state:
                first.append((p, i, states, len(states)))
            if use_prior and (param_state is None or "prior" not in param_state):
                raise ValueError("kappa > 0 needs a 'prior' in the param group (one tensor per param)")
            params.append(p)
            grads.append(grad)
            states.append(param_state)
        return params, grads, states


def _checked_group(group: dict[str, Any], prior: Any) -> list[torch.Tensor] | None:
    """Check a new group's hyper-parameters and params; return its priors as fp32 unit rows (or None)."""
    _check_hyperparameters(group, has_prior=prior is not None)
    params = group["params"]
    for i, p in enumerate(params):
        if p.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"SphericalSGD param {i} has dtype {p.dtype}; use float32, bfloat16 or float16")
        if p.dim() == 0:
            raise ValueError(f"SphericalSGD param {i} is a scalar; params are stacks of vectors (last dim)")
    if prior is None:
        return None
    if isinstance(prior, torch.Tensor) or len(prior) != len(params):
        raise ValueError(
            f"a param group's 'prior' must be a list with one tensor per param ({len(params)} params in the group)"
        )
    priors = []
    for i, (p, mu) in enumerate(zip(params, prior)):
        if tuple(mu.shape) != tuple(p.shape):
            raise ValueError(
                f"prior {i} has shape {tuple(mu.shape)} but its param has shape {tuple(p.shape)}; "
                "give one prior row per param row"
            )
        unit = project_to_sphere(mu.detach().to(device=p.device, dtype=torch.float32), f"prior {i}")
        priors.append(unit.contiguous())
    return priors


def _check_hyperparameters(group: dict[str, Any], has_prior: bool) -> None:
    lr, kappa, beta, eps = group["lr"], group["kappa"], group["beta"], group["eps"]
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"a tensor lr must have one element, got shape {tuple(lr.shape)}")
        lr = float(lr)
    if not lr >= 0.0:
        raise ValueError(f"invalid learning rate {lr!r}: must be >= 0")
    if not kappa >= 0.0:
        raise ValueError(f"invalid kappa {kappa!r}: the vMF concentration must be >= 0")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"invalid beta {beta!r}: must be in [0, 1)")
    if not eps >= 0.0:
        raise ValueError(f"invalid eps {eps!r}: must be >= 0")
    if kappa > 0.0 and not has_prior:
        raise ValueError(
            "kappa > 0 needs a 'prior' in the param group: a list of tensors, one per param, "
            "shaped like it (the vMF means); or set kappa=0"
        )


def _check_unit_rows(p: torch.Tensor, index: int) -> None:
    norms = torch.linalg.vector_norm(p.detach().float(), dim=-1)
    worst = float((norms - 1.0).abs().max()) if norms.numel() else 0.0
    if not worst <= _UNIT_TOLERANCE[p.dtype]:
        raise ValueError(
            f"SphericalSGD param {index} (shape {tuple(p.shape)}) has rows that are not unit vectors "
            f"(largest | ||row|| - 1 | = {worst:.3g}); the optimizer walks on the unit sphere. "
            "Project it first with dti_fast.project_to_sphere_(param)."
        )


def _check_fused_possible(params: Sequence[torch.Tensor]) -> None:
    if not triton_available():
        raise RuntimeError("fused=True needs Triton, which does not import here; use fused=None or fused=False")
    if not all(p.is_cuda for p in params) and not _interpreting():
        raise RuntimeError(
            "fused=True runs a Triton kernel, which needs CUDA params; on the CPU it runs only under "
            "TRITON_INTERPRET=1 (Triton's interpreter, for testing). Use fused=None or fused=False here."
        )


def resolve_fused(fused: bool | None, params: Sequence[torch.Tensor]) -> bool:
    """Which path a group with this ``fused`` setting takes for ``params``: True for the Triton kernel.

    ``None`` picks the kernel when every param is a contiguous CUDA tensor and
    Triton imports; ``True`` checks that the kernel can run (raises
    ``RuntimeError`` if not); ``False`` is the vectorized torch path.
    """
    if fused is None:
        return all(p.is_cuda and p.is_contiguous() for p in params) and triton_available()
    if fused:
        _check_fused_possible(params)
    return bool(fused)


def device_copy(t: torch.Tensor | None, device: torch.device, memo: dict) -> torch.Tensor | None:
    """``t`` on ``device``: ``t`` itself if it is there, else one copy per device, kept in ``memo``.

    For a GradScaler's ``grad_scale``/``found_inf`` (on the scaler's device)
    read by params on several devices: each device's update reads its own
    copy (made without a host sync), as torch's fused optimizers do. ``memo``
    lives for one step (the values change every step).
    """
    if t is None or t.device == device:
        return t
    key = (id(t), device)
    hit = memo.get(key)
    if hit is None:
        hit = memo[key] = t.to(device, non_blocking=True)
    return hit


def spherical_sgd(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    row_states: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    priors: Sequence[torch.Tensor] | None,
    *,
    lr: float | torch.Tensor,
    kappa: float = 0.0,
    beta: float = 0.0,
    eps: float = 1e-8,
    normalize: bool = True,
    fused: bool = False,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    cache: dict | None = None,
) -> None:
    """Functional SphericalSGD: update ``params``, ``row_states`` and ``steps`` in place.

    ``row_states[i]`` is the fp32 running ``s`` of ``params[i]`` (shape
    ``param.shape[:-1]``), ``steps[i]`` its fp32 scalar step count (incremented
    here), ``priors[i]`` its fp32 unit-row vMF mean (needed when
    ``kappa != 0``). ``fused`` selects the Triton kernel. ``grad_scale`` and
    ``found_inf`` (a GradScaler's, on any device) are read on each param's
    device. ``cache`` is a dict the caller keeps between steps for derived
    tables (optional); entries are keyed so that a changed tensor (new object,
    new storage or an in-place write) is never served from it.
    """
    if not params:
        return
    with torch.no_grad():
        _spherical_sgd(
            params,
            grads,
            row_states,
            steps,
            priors,
            lr=lr,
            kappa=kappa,
            beta=beta,
            eps=eps,
            normalize=normalize,
            fused=fused,
            grad_scale=grad_scale,
            found_inf=found_inf,
            cache=cache,
        )


def _spherical_sgd(
    params, grads, row_states, steps, priors, *, lr, kappa, beta, eps, normalize, fused, grad_scale, found_inf, cache
) -> None:
    cache = cache if cache is not None else {}
    if isinstance(lr, torch.Tensor):
        lr = float(lr)
    memo: dict = {}  # per-device copies of grad_scale / found_inf, for this step only
    # Packed steps (the optimizer's own, one device) are counted in one op.
    step_span = _span(steps, cache, "step")
    step_groups = {step_span.device: list(steps)} if step_span is not None else _by_device(steps)
    if step_span is not None:
        step_span.add_(1.0)
    else:
        for device, group_steps in step_groups.items():
            torch._foreach_add_(group_steps, [_one(device, cache)] * len(group_steps))
    math_args = dict(
        lr=lr, kappa=kappa, beta=beta, eps=eps, normalize=normalize, grad_scale=grad_scale, found_inf=found_inf
    )
    if fused:
        from dti_fast.kernels.spherical_sgd import LaunchCache, fused_spherical_sgd

        launch_cache = cache.get("launch")
        if launch_cache is None:
            launch_cache = cache["launch"] = LaunchCache()
        fused_spherical_sgd(params, grads, row_states, steps, priors, **math_args, cache=launch_cache, device_memo=memo)
        # The kernel writes through raw pointers, which autograd does not see: count the
        # writes as an in-place op would, so a param saved for a backward still fails loudly.
        torch._C._increment_version(list(params))
    else:
        _vectorized_spherical_sgd(params, grads, row_states, steps, priors, **math_args, cache=cache, memo=memo)
    if found_inf is not None:
        # A skipped step does not count (as torch's fused optimizers do). GradScaler's
        # found_inf is a sum over devices (can be 2 or more): a skip undoes exactly one step.
        for device, group_steps in step_groups.items():
            skipped = (device_copy(found_inf, device, memo).reshape(()) > 0).to(torch.float32)
            if step_span is not None:
                step_span.sub_(skipped)
            else:
                torch._foreach_sub_(group_steps, [skipped] * len(group_steps))


def _by_device(tensors: Sequence[torch.Tensor]) -> dict[torch.device, list[torch.Tensor]]:
    if all(t.is_cpu for t in tensors):  # a cheap test for the common CPU case
        return {tensors[0].device: list(tensors)}
    first = tensors[0].device
    if all(t.device == first for t in tensors):
        return {first: list(tensors)}
    out: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        out.setdefault(t.device, []).append(t)
    return out


def _one(device: torch.device, cache: dict) -> torch.Tensor:
    # A tensor-list add of one shared 0-dim tensor is ~4x faster on the CPU than a scalar add.
    key = ("one", device)
    one = cache.get(key)
    if one is None:
        one = cache[key] = torch.ones((), dtype=torch.float32, device=device)
    return one


def _packed_prior(priors: Sequence[torch.Tensor], dim: int, cache: dict) -> torch.Tensor:
    """The priors concatenated as (rows, dim), cached while every prior is the same tensor at the same version.

    The version (``t._version``) counts in-place writes: a prior updated in
    place (``copy_``) is re-read at the next step.
    """
    key = ("prior", tuple(map(id, priors)))
    versions = tuple(map(_VERSION, priors))
    hit = cache.get(key)
    if hit is not None and hit[1] == versions and all(map(operator.is_, hit[0], priors)):
        return hit[2]
    if len(cache) > 64:
        for old in [k for k in cache if k[0] == "prior"]:
            del cache[old]
    packed = torch.cat([mu.reshape(-1, dim) for mu in priors])
    cache[key] = (tuple(priors), versions, packed)
    return packed


# On the CPU the row math runs in blocks of about 1 MB per temporary: they stay in
# cache and are reused, instead of being paged in afresh every step.
_CPU_BLOCK_ELEMENTS = 1 << 18
# A run of several params is stepped on one thread: with several, ATen splits every op
# above 32768 elements (at::internal::GRAIN_SIZE) over them, each parallel region ends
# in a barrier, and on a busy machine (other processes on the cores) a barrier waits
# for a descheduled thread. Measured on 2 shared cores, 1000 params of (4, 768): 81 ms
# a step with parallel 1 MB blocks, 20 ms with runs cut below the grain (~100 runs of
# ~20 ops), and 500 against 50 ms under heavier load. So the runs stay 1 MB and run
# with torch's intra-op threads set to one (see _one_thread): serial, and about 8x fewer
# ops than runs cut at the grain. A single large param is still stepped in 1 MB blocks
# on every thread (parallel ops pay off there). Builds whose ATen thread pool is not
# OpenMP's cannot change the thread count once work has started: there the runs are
# cut below the grain instead, which keeps every op on one thread too.
_ATEN_GRAIN = 32768


@functools.lru_cache(maxsize=1)
def _threads_can_be_scoped() -> bool:
    """Whether ``torch.set_num_threads`` may be called at any time (ATen's OpenMP backend)."""
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


def _cpu_run_elements() -> int:
    """How many elements a run of several params may hold on the CPU."""
    if torch.get_num_threads() == 1 or _threads_can_be_scoped():
        return _CPU_BLOCK_ELEMENTS
    return _ATEN_GRAIN - 1


# torch.get_num_threads() is process-wide: steps in several Python threads take turns
# in _one_thread, so each reads the caller's count, not another step's temporary one.
_THREADS_LOCK = threading.RLock()


@contextlib.contextmanager
def _one_thread(device: torch.device):
    """torch's intra-op threads set to one inside (a CPU run of several params), restored after.

    ``torch.set_num_threads`` costs well under a microsecond (OpenMP builds; see
    :func:`_threads_can_be_scoped`).
    """
    if device.type != "cpu" or torch.get_num_threads() == 1 or not _threads_can_be_scoped():
        yield
        return
    with _THREADS_LOCK:
        n = torch.get_num_threads()
        if n > 1:
            torch.set_num_threads(1)
        try:
            yield
        finally:
            if n > 1:
                torch.set_num_threads(n)


@dataclass
class _Run:
    """Params stepped together: one concatenation in, one foreach copy out."""

    idx: list[int]
    rows: list[int]
    flat: bool  # every param is 2-D: concatenated without views
    out_views: list[torch.Tensor] = field(default_factory=list)  # of the bucket's out buffer, shaped like the params
    s_views: list[torch.Tensor] = field(default_factory=list)  # of the bucket's s buffer, shaped like the states
    row_counts: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # Consecutive params (the usual case) are taken with one list slice, not per index.
        a = self.idx[0]
        self.slice = slice(a, a + len(self.idx)) if self.idx == list(range(a, a + len(self.idx))) else None

    def take(self, items: Sequence) -> list:
        """The run's entries of a per-param list."""
        if self.slice is not None:
            return list(items[self.slice])
        return [items[i] for i in self.idx]


@dataclass
class _Bucket:
    """Params of one device, vector size and dtypes; buffers shared by its runs (used one run at a time)."""

    device: torch.device
    dim: int
    runs: list[_Run]
    out: torch.Tensor | None = None  # (rows of the largest run, dim) fp32: the new rows
    s_out: torch.Tensor | None = None  # (rows of the largest run,) fp32: the new s
    v_in: torch.Tensor | None = None  # (rows of the largest run, dim), param dtype: the rows concatenated
    g_in: torch.Tensor | None = None  # (rows of the largest run, dim), grad dtype: the grads concatenated
    work: torch.Tensor | None = None  # (rows of the largest run, dim) fp32: products summed along rows


@dataclass
class _Plan:
    """How a list of params is bucketed and run, built once and reused while the params stay the same."""

    params: list[torch.Tensor]
    signature: list[tuple]
    buckets: list[_Bucket]
    run_elements: int  # the CPU run size it was cut with


_SHAPE_DTYPE = operator.attrgetter("shape", "dtype")


def _signature(params: Sequence[torch.Tensor]) -> list[tuple]:
    # Shapes and dtypes; a param moved to another device with the same shape fails
    # loudly in the concatenation (it is not silently stepped on the old device).
    # (Four passes of ints and dtypes instead measured slower, 1.09 against 0.99 ms a
    # warm step at 1000 params of (1, 64), interleaved.)
    return list(map(_SHAPE_DTYPE, params))


def _plan(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], cache: dict) -> _Plan:
    """The cached plan for ``params`` (the same tensors, of the same shapes and dtypes), or a new one."""
    key = ("plan", len(params), id(params[0]))
    plan = cache.get(key)
    signature = _signature(params)
    run_elements = _cpu_run_elements()
    if (
        plan is not None
        and plan.run_elements == run_elements
        and len(plan.params) == len(params)
        and all(map(operator.is_, plan.params, params))
        and plan.signature == signature
    ):
        return plan
    groups: dict[tuple, list[int]] = {}
    for i, (p, g) in enumerate(zip(params, grads)):
        groups.setdefault((p.device, p.shape[-1], p.dtype, g.dtype), []).append(i)
    buckets = []
    for (device, dim, p_dtype, g_dtype), idx in groups.items():
        limit = max(1, run_elements // dim) if device.type == "cpu" else None
        runs = []
        for run_idx in _runs(idx, [params[i].numel() // dim for i in idx], limit):
            targets = [params[i] for i in run_idx]
            flat = all(t.dim() == 2 for t in targets)
            runs.append(_Run(run_idx, [t.numel() // dim for t in targets], flat))
        bucket = _Bucket(device, dim, runs)
        batched = [run for run in runs if len(run.idx) > 1]
        if batched:
            most = max(sum(run.rows) for run in batched)
            bucket.out = torch.empty(most, dim, dtype=torch.float32, device=device)
            bucket.s_out = torch.empty(most, dtype=torch.float32, device=device)
            bucket.v_in = torch.empty(most, dim, dtype=p_dtype, device=device)
            bucket.g_in = torch.empty(most, dim, dtype=g_dtype, device=device)
            bucket.work = torch.empty(most, dim, dtype=torch.float32, device=device)
            for run in batched:
                targets = [params[i] for i in run.idx]
                out = bucket.out[: sum(run.rows)].split(run.rows)
                s_out = bucket.s_out[: sum(run.rows)].split(run.rows)
                run.out_views = list(out) if run.flat else [c.view(t.shape) for c, t in zip(out, targets)]
                run.s_views = list(s_out) if run.flat else [c.view(t.shape[:-1]) for c, t in zip(s_out, targets)]
                run.row_counts = torch.tensor(run.rows, device=device)
        buckets.append(bucket)
    if sum(1 for k in cache if k[0] == "plan") >= 8:
        for old in [k for k in cache if k[0] == "plan"]:
            del cache[old]
    plan = cache[key] = _Plan(list(params), signature, buckets, run_elements)
    return plan


def _vectorized_spherical_sgd(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    row_states: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    priors: Sequence[torch.Tensor] | None,
    *,
    lr: float,
    kappa: float,
    beta: float,
    eps: float,
    normalize: bool,
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
    cache: dict,
    memo: dict,
) -> None:
    """The step in batched torch ops.

    Params are bucketed by device, vector size and dtypes; on the CPU a bucket
    is cut into runs (see :func:`_cpu_run_elements`). A run of several params is
    one concatenation of rows and grads, the row math on the whole block
    (written into buffers kept between steps, allocating nothing of the block's
    size), and one foreach copy back into the params, in inference mode and,
    on the CPU, on one intra-op thread (:func:`_one_thread`); ``s`` is written
    in one op when the run's row states are packed (:func:`_span`), else by a
    foreach copy. A lone param (or one larger than a
    run) is updated through views in blocks of :data:`_CPU_BLOCK_ELEMENTS`. The
    bucketing, buffers and output views are cached while the params stay the
    same tensors of the same shapes and dtypes.
    """
    use_prior = kappa != 0.0
    uses_s = normalize and beta != 0.0
    need_old_s = uses_s or (normalize and found_inf is not None)  # a skipped step keeps the old s
    plan = _plan(params, grads, cache)
    # Inference mode: the same in-place writes (version counters still count them) through
    # a shorter dispatch; the concatenations and the foreach copy into many small params
    # cost about a quarter less. The plan's buffers are made outside it, above.
    with torch.inference_mode():
        for bucket in plan.buckets:
            device, dim = bucket.device, bucket.dim
            scale = device_copy(grad_scale, device, memo)
            inf = device_copy(found_inf, device, memo)
            hyper = dict(
                lr=lr,
                kappa=kappa,
                beta=beta,
                eps=eps,
                normalize=normalize,
                inv_scale=scale.reciprocal().to(torch.float32) if scale is not None else None,
                skip=inf.reshape(()) > 0 if inf is not None else None,
            )
            limit = max(1, _CPU_BLOCK_ELEMENTS // dim) if device.type == "cpu" else None
            for run in bucket.runs:
                if len(run.idx) == 1:
                    i = run.idx[0]
                    _step_one_param(
                        params[i],
                        grads[i],
                        row_states[i],
                        steps[i],
                        priors[i] if use_prior else None,
                        dim,
                        limit,
                        hyper,
                    )
                    continue
                with _one_thread(device):  # serial ops, 1 MB runs (see _cpu_run_elements)
                    targets = run.take(params)
                    states = run.take(row_states)
                    run_grads = run.take(grads)
                    # Concatenated into buffers kept between steps (no allocation, no fresh pages).
                    n = sum(run.rows)
                    # Params lying back to back in one storage (pack_params_) are read and
                    # written there: no concatenation in, no foreach copy out.
                    packed = _packed_rows(targets, dim, cache)
                    if packed is not None:
                        v = packed
                    elif run.flat:
                        v = torch.cat(targets, out=bucket.v_in[:n])
                    else:
                        v = torch.cat([t.reshape(-1, dim) for t in targets], out=bucket.v_in[:n])
                    if run.flat:
                        g = torch.cat(run_grads, out=bucket.g_in[:n])
                    else:
                        g = torch.cat([t.reshape(-1, dim) for t in run_grads], out=bucket.g_in[:n])
                    s_old = None
                    if need_old_s:
                        s_old = torch.cat(states) if run.flat else torch.cat([st.reshape(-1) for st in states])
                    mu = _packed_prior(run.take(priors), dim, cache) if use_prior else None
                    t_rows = None
                    if uses_s:
                        t_rows = torch.repeat_interleave(
                            torch.stack(run.take(steps)), run.row_counts, output_size=v.shape[0]
                        )
                    # Packed state (the optimizer's own): s is written in place, in one op.
                    s_span = _span(states, cache, "s") if normalize else None
                    _, s_new = _update_rows(
                        v,
                        g,
                        s_old,
                        mu,
                        t_rows,
                        **hyper,
                        out=bucket.out[:n],
                        s_out=s_span if s_span is not None else bucket.s_out[:n],
                        work=bucket.work[:n],
                        g_owned=True,  # g_in is the bucket's own buffer
                    )
                    if packed is not None:
                        packed.copy_(bucket.out[:n])
                        # Written through an alias of their storage: count the write as
                        # the foreach copy does (autograd's check on saved tensors).
                        torch._C._increment_version(targets)
                    else:
                        torch._foreach_copy_(targets, run.out_views)
                    if s_new is not None and s_span is None:
                        torch._foreach_copy_(states, run.s_views)


_DATA_PTR = torch.Tensor.data_ptr


def _packed_rows(tensors: Sequence[torch.Tensor], dim: int, cache: dict) -> torch.Tensor | None:
    """A (rows, dim) tensor over the storage that ``tensors`` fill back to back in order, or None.

    True when every tensor is contiguous and starts where the one before it
    ends, in one storage (as :func:`pack_params_` lays params out): writing the
    returned tensor writes them all. Cached on the tensors' identity and data
    pointers, which are read every step, so a param whose ``.data`` was
    replaced since (``module.to``, a reassignment) is never written through a
    stale alias.
    """
    first = tensors[0]
    if len(tensors) > 1 and tensors[1].data_ptr() != first.data_ptr() + first.numel() * first.element_size():
        return None  # separate tensors (the usual case): told apart without a pass
    ptrs = list(map(_DATA_PTR, tensors))
    key = ("packed", len(tensors), id(first))
    hit = cache.get(key)
    if hit is not None and hit[1] == ptrs and all(map(operator.is_, hit[0], tensors)):
        return hit[2]
    rows = None
    storage = first.untyped_storage()
    size = first.element_size()
    pos = ptrs[0]
    for t, ptr in zip(tensors, ptrs):
        if ptr != pos or not t.is_contiguous() or t.dtype != first.dtype:
            break
        if t.untyped_storage().data_ptr() != storage.data_ptr():
            break
        pos += t.numel() * size
    else:
        count = (pos - ptrs[0]) // size
        rows = torch.empty(0, dtype=first.dtype, device=first.device).set_(
            storage, first.storage_offset(), (count // dim, dim)
        )
    if sum(1 for k in cache if k[0] == "packed") >= 256:
        for old in [k for k in cache if k[0] == "packed"]:
            del cache[old]
    cache[key] = (list(tensors), ptrs, rows)
    return rows


def pack_params_(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """Move ``params`` into one new contiguous tensor, back to back in the order given; return it (1-D).

    Every param keeps its identity, shape, values, ``requires_grad`` and
    ``grad``; only its storage changes (``p.data`` becomes a view of the
    returned tensor), so modules, optimizer state and state dicts that refer to
    the params are unaffected. :class:`SphericalSGD` then updates params that
    lie back to back in place on the vectorized path: no concatenation of the
    rows in and no copy into each param out (on the CPU, 1000 params of (1, 64):
    the copy out is about half of a step). All params must be leaf tensors of
    one device and dtype, each given once. Replacing a param's ``.data`` later
    (``module.to``) just ends the packing for it: the optimizer checks the
    layout every step.
    """
    params = list(params)
    if not params:
        raise ValueError("pack_params_ got no params")
    first = params[0]
    seen: set[int] = set()
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"pack_params_: item {i} is a {type(p).__name__}, not a tensor")
        if p.device != first.device or p.dtype != first.dtype:
            raise ValueError(
                f"pack_params_: param {i} is {p.dtype} on {p.device} but param 0 is {first.dtype} on "
                f"{first.device}; pack the params of each device and dtype separately"
            )
        if not p.is_leaf:
            raise ValueError(f"pack_params_: param {i} is not a leaf tensor (it is computed from others)")
        if id(p) in seen:
            raise ValueError(f"pack_params_: param {i} is given twice")
        seen.add(id(p))
    flat = torch.empty(sum(p.numel() for p in params), dtype=first.dtype, device=first.device)
    offset = 0
    with torch.no_grad():
        for p in params:
            view = flat[offset : offset + p.numel()].view(p.shape)
            view.copy_(p)
            p.data = view
            offset += p.numel()
    return flat


def _runs(idx: list[int], rows: list[int], limit: int | None) -> list[list[int]]:
    """Consecutive params grouped into runs of at most ``limit`` rows (a larger param stands alone)."""
    if limit is None:
        return [idx]
    runs, current, count = [], [], 0
    for i, r in zip(idx, rows):
        if current and count + r > limit:
            runs.append(current)
            current, count = [], 0
        current.append(i)
        count += r
    if current:
        runs.append(current)
    return runs


def _step_one_param(p, grad, s, step, mu, dim: int, limit: int | None, hyper: dict) -> None:
    """Update one (possibly packed) param in blocks of ``limit`` rows, through views."""
    rows = p.numel() // dim
    if not p.is_contiguous() or limit is None or rows <= limit:
        blocks = [(0, rows)]
    else:
        blocks = [(a, min(a + limit, rows)) for a in range(0, rows, limit)]
    v_all = p.view(-1, dim) if p.is_contiguous() else p.reshape(-1, dim)
    g_all = grad.reshape(-1, dim)
    s_all = s.view(-1)
    mu_all = mu.reshape(-1, dim) if mu is not None else None
    t_rows = step if (hyper["normalize"] and hyper["beta"] != 0.0) else None
    for a, b in blocks:
        new_v, s_new = _update_rows(
            v_all[a:b], g_all[a:b], s_all[a:b], mu_all[a:b] if mu is not None else None, t_rows, **hyper
        )
        if p.is_contiguous():
            v_all[a:b].copy_(new_v)
        else:
            p.copy_(new_v.view(p.shape))
        if s_new is not None:
            s_all[a:b].copy_(s_new)


def _sqrt(s: torch.Tensor) -> torch.Tensor:
    """sqrt of non-negative row values (a new tensor); sqrt(0) = 0.

    On the CPU this is ``s * rsqrt(s)``: torch.sqrt there calls MKL's threaded
    vsSqrt, which with 2 threads on a busy machine was measured at 16 ms for
    511 values (rsqrt: 1 us). On other devices it is torch.sqrt.
    """
    if s.device.type != "cpu":
        return torch.sqrt(s)
    return torch.where(s > 0, s * torch.rsqrt(s), 0.0)


def _rowdot(a: torch.Tensor, b: torch.Tensor, work: torch.Tensor | None, out: torch.Tensor | None = None):
    """Row-wise dot products of two (R, D) blocks: ``torch.linalg.vecdot``, or with ``work``
    the same product and sum (what vecdot computes) without allocating the (R, D) product."""
    if work is None:
        return torch.linalg.vecdot(a, b, out=out)
    return torch.sum(torch.mul(a, b, out=work), dim=-1, out=out)


def _update_rows(
    v_raw: torch.Tensor,
    g_raw: torch.Tensor,
    s_old: torch.Tensor | None,
    mu: torch.Tensor | None,
    t_rows: torch.Tensor | None,
    *,
    lr: float,
    kappa: float,
    beta: float,
    eps: float,
    normalize: bool,
    inv_scale: torch.Tensor | None,
    skip: torch.Tensor | None,
    out: torch.Tensor | None = None,
    s_out: torch.Tensor | None = None,
    work: torch.Tensor | None = None,
    g_owned: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The step on a block of rows (R, D); returns new rows (fp32) and new ``s`` (None without normalize).

    Inputs may be views of params, grads and state: they are only read.
    ``s_old`` is needed when ``beta != 0`` or with ``skip``; ``inv_scale`` is 1 / a
    GradScaler's scale; where ``skip`` (a 0-dim bool tensor) is true the old
    rows and ``s`` are returned. ``out``/``s_out`` (fp32, not aliasing any
    input) receive the results when given. ``work`` (fp32, shaped like the
    block, aliasing nothing) holds the row products; ``g_owned`` says that
    ``g_raw`` is the caller's scratch and may be overwritten. With both, a step
    allocates nothing of the block's size (on the CPU, blocks of a MB or more
    come fresh from mmap, zero-filled, each time the allocator's threshold is
    below them: the same step measured 6.5 or 10.5 ms by that state alone).
    """
    # .float() of an fp32 tensor is itself, but still a dispatch: skipped (one run is ~20 small ops).
    v = v_raw if v_raw.dtype == torch.float32 else v_raw.float()
    if g_raw.dtype != torch.float32:
        g, g_owned = g_raw.float(), True
    else:
        g = g_raw
    if inv_scale is not None:
        g = g.mul_(inv_scale) if g_owned else g * inv_scale
        g_owned = True
    if kappa != 0.0:
        g = g.add_(mu, alpha=-kappa) if g_owned else torch.add(g, mu, alpha=-kappa)
        g_owned = True
    gv = _rowdot(g, v, work).unsqueeze_(-1)
    # The tangent: written over g when g is ours, else a fresh tensor; in-place ops are safe from here on.
    g = g.addcmul_(v, gv, value=-1.0) if g_owned else torch.addcmul(g, v, gv, value=-1.0)
    s_new = None
    if normalize:
        # ||g||^2 as the square of torch's norm: one fused reduction, where a product and
        # a sum take two passes over the block (on one CPU thread, 47 against 145 us for
        # 341 x 768 fp32).
        norm = torch.linalg.vector_norm(g, dim=-1)
        s_new = torch.mul(norm, norm, out=s_out)
        if beta != 0.0:
            s_new.mul_(1.0 - beta).add_(s_old, alpha=beta)
            root = _sqrt(s_new / (1.0 - torch.pow(beta, t_rows)))
        else:
            root = norm  # sqrt(s) with beta 0 is the norm itself: not squared and rooted again
        # g / (sqrt(s_hat) + eps), as the reference writes it, in the update's one op.
        denom = root.add_(eps).unsqueeze_(-1)
        new_v = torch.addcdiv(v, g, denom, value=-lr, out=out)
    else:
        new_v = torch.add(v, g, alpha=-lr, out=out)
    new_v.div_(torch.linalg.vector_norm(new_v, dim=-1, keepdim=True))
    if skip is not None:
        new_v = torch.where(skip, v, new_v, out=out)
        if s_new is not None:
            s_new = torch.where(skip, s_old, s_new, out=s_out)
    return new_v, s_new

"""SphericalSGD: Riemannian SGD on the unit hypersphere with a von Mises-Fisher prior.

A drop-in ``torch.optim.Optimizer``. The update itself is the functional
:func:`spherical_sgd`, with two interchangeable implementations chosen by
``fused``: a vectorized torch path (every param of a group in one batched
computation) and a Triton kernel (one launch for all rows). Both compute the
step of :func:`dti_fast.sphere.spherical_sgd_step_reference`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, Callable, Optional, Sequence

import torch
from torch.optim import Optimizer

from .sphere import project_to_sphere

__all__ = ["SphericalSGD", "spherical_sgd", "triton_available"]

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# How far from 1 a row's norm may be at the first step (storage rounding of a
# unit vector is ~1e-7 in fp32 and ~1e-3 in 16-bit formats).
_UNIT_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def triton_available() -> bool:
    """True when Triton imports (it is needed for ``fused=True``)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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
            are normalized here).
        lr: step length (with ``beta=0`` each step moves a row by ``lr`` along
            the sphere before retraction).
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
    math runs in fp32 and the per-row state ``s`` is fp32. The optimizer works
    with ``torch.amp.GradScaler``: it reads the scaler's ``grad_scale`` and
    ``found_inf`` on the device, so a step with inf/NaN grads changes nothing
    and needs no host sync.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.01,
        kappa: float = 0.0,
        beta: float = 0.0,
        eps: float = 1e-8,
        normalize: bool = True,
        fused: Optional[bool] = None,
    ) -> None:
        defaults = dict(lr=lr, kappa=kappa, beta=beta, eps=eps, normalize=normalize, fused=fused, prior=None)
        # Derived tables (packed priors, row counts, kernel pointer tables); not state.
        self._cache: dict = {}
        super().__init__(params, defaults)

    # -- param groups ---------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hyperparameters(group)
        for i, p in enumerate(group["params"]):
            if p.dtype not in _SUPPORTED_DTYPES:
                raise TypeError(f"SphericalSGD param {i} has dtype {p.dtype}; use float32, bfloat16 or float16")
            if p.dim() == 0:
                raise ValueError(f"SphericalSGD param {i} is a scalar; params are stacks of vectors (last dim)")
        prior = group["prior"]
        if prior is not None:
            if isinstance(prior, torch.Tensor) or len(prior) != len(group["params"]):
                raise ValueError(
                    "a param group's 'prior' must be a list with one tensor per param "
                    f"({len(group['params'])} params in the group)"
                )
            normalized = []
            for i, (p, mu) in enumerate(zip(group["params"], prior)):
                if tuple(mu.shape) != tuple(p.shape):
                    raise ValueError(
                        f"prior {i} has shape {tuple(mu.shape)} but its param has shape {tuple(p.shape)}; "
                        "give one prior row per param row"
                    )
                unit = project_to_sphere(mu.detach().to(device=p.device, dtype=torch.float32), f"prior {i}")
                normalized.append(unit.contiguous())
            group["prior"] = normalized
        fused = group["fused"]
        if fused:
            _check_fused_possible(group["params"])

    # -- state dict -----------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; the fp32 row state keeps its precision for 16-bit params."""
        saved_groups = state_dict["param_groups"]
        id_map = {
            saved_id: p
            for saved, group in zip(saved_groups, self.param_groups)
            for saved_id, p in zip(saved["params"], group["params"])
        }
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        # torch casts floating state to the param dtype; SphericalSGD keeps it fp32.
        for saved_id, value in saved_state.items():
            p = id_map[saved_id]
            self.state[p] = {
                "step": value["step"].detach().to(device=p.device, dtype=torch.float32).clone(),
                "s": value["s"].detach().to(device=p.device, dtype=torch.float32).clone().contiguous(),
            }
        for group in self.param_groups:
            _check_hyperparameters(group)
            if group["prior"] is not None:
                group["prior"] = [
                    mu.to(device=p.device, dtype=torch.float32).contiguous()
                    for p, mu in zip(group["params"], group["prior"])
                ]
        self._cache.clear()

    # -- the step ---------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:
        """Take one step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        # Checked for every group before any is stepped (kappa may be set after construction).
        for group in self.param_groups:
            if group["kappa"] != 0.0 and group["prior"] is None and any(p.grad is not None for p in group["params"]):
                raise ValueError("kappa > 0 needs a 'prior' in the param group (one tensor per param)")
        for group in self.param_groups:
            params, grads, row_states, steps, priors = [], [], [], [], []
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        "SphericalSGD does not support sparse gradients; build the embedding with "
                        "sparse=False (DirectionalEmbedding's rows are small and dense)"
                    )
                state = self.state[p]
                if not state:
                    _check_unit_rows(p, i)
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["s"] = torch.zeros(p.shape[:-1], dtype=torch.float32, device=p.device)
                params.append(p)
                grads.append(p.grad)
                row_states.append(state["s"])
                steps.append(state["step"])
                if group["kappa"] != 0.0:
                    priors.append(group["prior"][i])
            if not params:
                continue
            spherical_sgd(
                params,
                grads,
                row_states,
                steps,
                priors if group["kappa"] != 0.0 else None,
                lr=group["lr"],
                kappa=group["kappa"],
                beta=group["beta"],
                eps=group["eps"],
                normalize=group["normalize"],
                fused=_resolve_fused(group["fused"], params),
                grad_scale=grad_scale,
                found_inf=found_inf,
                cache=self._cache,
            )
        return loss


def _check_hyperparameters(group: dict[str, Any]) -> None:
    lr, kappa, beta, eps = group["lr"], group["kappa"], group["beta"], group["eps"]
    if isinstance(lr, torch.Tensor):
        raise TypeError("SphericalSGD takes lr as a float (LR schedulers set floats)")
    if not lr >= 0.0:
        raise ValueError(f"invalid learning rate {lr!r}: must be >= 0")
    if not kappa >= 0.0:
        raise ValueError(f"invalid kappa {kappa!r}: the vMF concentration must be >= 0")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"invalid beta {beta!r}: must be in [0, 1)")
    if not eps >= 0.0:
        raise ValueError(f"invalid eps {eps!r}: must be >= 0")
    if kappa > 0.0 and group.get("prior") is None:
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


def _resolve_fused(fused: Optional[bool], params: Sequence[torch.Tensor]) -> bool:
    if fused is None:
        # The kernel works on contiguous rows; anything else takes the torch path.
        return all(p.is_cuda and p.is_contiguous() for p in params) and triton_available()
    if fused:
        _check_fused_possible(params)
    return bool(fused)


def spherical_sgd(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    row_states: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    priors: Optional[Sequence[torch.Tensor]],
    *,
    lr: float,
    kappa: float = 0.0,
    beta: float = 0.0,
    eps: float = 1e-8,
    normalize: bool = True,
    fused: bool = False,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    cache: Optional[dict] = None,
) -> None:
    """Functional SphericalSGD: update ``params``, ``row_states`` and ``steps`` in place.

    ``row_states[i]`` is the fp32 running ``s`` of ``params[i]`` (shape
    ``param.shape[:-1]``), ``steps[i]`` its fp32 scalar step count (incremented
    here), ``priors[i]`` its fp32 unit-row vMF mean (needed when
    ``kappa != 0``). ``fused`` selects the Triton kernel. ``cache`` is a dict
    the caller keeps between steps for derived tables (optional).
    """
    cache = cache if cache is not None else {}
    torch._foreach_add_(list(steps), 1.0)
    if fused:
        from dti_fast.kernels.spherical_sgd import _LaunchCache, fused_spherical_sgd

        launch_cache = cache.get("launch")
        if launch_cache is None:
            launch_cache = cache["launch"] = _LaunchCache()
        fused_spherical_sgd(
            params, grads, row_states, steps, priors,
            lr=lr, kappa=kappa, beta=beta, eps=eps, normalize=normalize,
            grad_scale=grad_scale, found_inf=found_inf, cache=launch_cache,
        )
    else:
        _vectorized_spherical_sgd(
            params, grads, row_states, steps, priors,
            lr=lr, kappa=kappa, beta=beta, eps=eps, normalize=normalize,
            grad_scale=grad_scale, found_inf=found_inf, cache=cache,
        )
    if found_inf is not None:
        # A skipped step does not count (as torch's fused optimizers do). GradScaler's
        # found_inf is a sum over devices (can be 2 or more): a skip undoes exactly one step.
        skipped = (found_inf.reshape(()) > 0).to(torch.float32)
        torch._foreach_sub_(list(steps), [skipped] * len(steps))


def _packed_prior(priors: Sequence[torch.Tensor], dim: int, cache: dict) -> torch.Tensor:
    key = tuple(id(mu) for mu in priors)
    hit = cache.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[0], priors)):
        return hit[1]
    if len(cache) > 64:
        cache.clear()
    packed = torch.cat([mu.reshape(-1, dim) for mu in priors])
    cache[key] = (tuple(priors), packed)
    return packed


# On the CPU the row math runs in blocks of about 1 MB per temporary: they stay in
# cache and are reused, instead of being paged in afresh every step.
_CPU_BLOCK_ELEMENTS = 1 << 18


def _vectorized_spherical_sgd(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    row_states: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    priors: Optional[Sequence[torch.Tensor]],
    *,
    lr: float,
    kappa: float,
    beta: float,
    eps: float,
    normalize: bool,
    grad_scale: Optional[torch.Tensor],
    found_inf: Optional[torch.Tensor],
    cache: dict,
) -> None:
    hyper = dict(lr=lr, kappa=kappa, beta=beta, eps=eps, normalize=normalize, grad_scale=grad_scale,
                 found_inf=found_inf)
    buckets: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        buckets.setdefault((p.device, p.shape[-1]), []).append(i)
    for (device, dim), idx in buckets.items():
        limit = max(1, _CPU_BLOCK_ELEMENTS // dim) if device.type == "cpu" else None
        for run in _runs(idx, [params[i].numel() // dim for i in idx], limit):
            if len(run) == 1:
                _step_one_param(params[run[0]], grads[run[0]], row_states[run[0]], steps[run[0]],
                                priors[run[0]] if kappa != 0.0 else None, dim, limit, hyper)
                continue
            # Many params: one concatenation each way. 2-D params (the common case: one
            # (vectors, dim) param per concept) need no views, which dominate at 1000s of params.
            flat = all(params[i].dim() == 2 for i in run)
            targets = [params[i] for i in run]
            states = [row_states[i] for i in run]
            rows = [params[i].shape[0] if flat else params[i].numel() // dim for i in run]
            v = torch.cat(targets if flat else [t.reshape(-1, dim) for t in targets])
            g = torch.cat([grads[i] for i in run] if flat else [grads[i].reshape(-1, dim) for i in run])
            s_old = torch.cat(states if flat else [st.reshape(-1) for st in states])
            mu = _packed_prior([priors[i] for i in run], dim, cache) if kappa != 0.0 else None
            t_rows = None
            if normalize and beta != 0.0:
                t_rows = torch.repeat_interleave(torch.stack([steps[i] for i in run]), _row_counts(rows, device, cache),
                                                 output_size=v.shape[0])
            new_v, s_new = _update_rows(v, g, s_old, mu, t_rows, **hyper)
            chunks = new_v.split(rows)
            torch._foreach_copy_(targets, list(chunks) if flat else [c.view(t.shape) for c, t in zip(chunks, targets)])
            if s_new is not None:
                chunks = s_new.split(rows)
                torch._foreach_copy_(states, list(chunks) if flat else [c.view(st.shape) for c, st in zip(chunks, states)])


def _runs(idx: list[int], rows: list[int], limit: Optional[int]) -> list[list[int]]:
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


def _step_one_param(p, grad, s, step, mu, dim: int, limit: Optional[int], hyper: dict) -> None:
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
        new_v, s_new = _update_rows(v_all[a:b], g_all[a:b], s_all[a:b], mu_all[a:b] if mu is not None else None,
                                    t_rows, **hyper)
        if p.is_contiguous():
            v_all[a:b].copy_(new_v)
        else:
            p.copy_(new_v.view(p.shape))
        if s_new is not None:
            s_all[a:b].copy_(s_new)


def _update_rows(
    v_raw: torch.Tensor,
    g_raw: torch.Tensor,
    s_old: torch.Tensor,
    mu: Optional[torch.Tensor],
    t_rows: Optional[torch.Tensor],
    *,
    lr: float,
    kappa: float,
    beta: float,
    eps: float,
    normalize: bool,
    grad_scale: Optional[torch.Tensor],
    found_inf: Optional[torch.Tensor],
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The step on a block of rows (R, D); returns new rows (fp32) and new ``s`` (None without normalize).

    Inputs may be views of params, grads and state: they are only read.
    """
    v = v_raw.float()
    g = g_raw.float()
    if grad_scale is not None:
        g = g * grad_scale.reciprocal().to(torch.float32)
    if kappa != 0.0:
        g = torch.add(g, mu, alpha=-kappa)
    gv = torch.linalg.vecdot(g, v).unsqueeze(-1)
    g = torch.addcmul(g, v, gv, value=-1.0)  # a fresh tensor from here on: in-place ops are safe
    s_new = None
    if normalize:
        s_new = torch.linalg.vecdot(g, g).mul_(1.0 - beta)
        s_hat = s_new
        if beta != 0.0:
            s_new.add_(s_old, alpha=beta)
            s_hat = s_new / (1.0 - torch.pow(beta, t_rows))
        coef = torch.sqrt(s_hat).add_(eps).reciprocal_().mul_(lr).unsqueeze(-1)
        new_v = g.mul_(coef).neg_().add_(v)
    else:
        new_v = g.mul_(-lr).add_(v)
    new_v.div_(torch.linalg.vector_norm(new_v, dim=-1, keepdim=True))
    if found_inf is not None:
        skip = found_inf.reshape(()) > 0
        new_v = torch.where(skip, v, new_v)
        if s_new is not None:
            s_new = torch.where(skip, s_old, s_new)
    return new_v, s_new


def _row_counts(rows: list[int], device: torch.device, cache: dict) -> torch.Tensor:
    key = ("rows", tuple(rows), device)
    hit = cache.get(key)
    if hit is None:
        hit = torch.tensor(rows, device=device)
        cache[key] = hit
    return hit

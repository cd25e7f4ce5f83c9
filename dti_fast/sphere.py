"""The math of Directional Textual Inversion in plain torch.

This module is the reference every fast path (the vectorized optimizer path and
the Triton kernel) is tested against. Everything works row-wise: the last
dimension of a tensor is the vector, every leading index is a row.

See ``docs`` in the README and arXiv 2512.13672 for the method.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "project_tangent",
    "retract",
    "vmf_prior_grad",
    "project_to_sphere",
    "project_to_sphere_",
    "slerp",
    "norm_scale",
    "spherical_sgd_step_reference",
    "SLERP_LINEAR_THRESHOLD",
    "SLERP_ANTIPODAL_THRESHOLD",
]

#: Below this angle (radians) slerp falls back to a normalized lerp: sin(theta)
#: is too small to divide by in fp32, and the two paths agree to ~1e-12 there.
SLERP_LINEAR_THRESHOLD = 1e-4
#: Within this angle of pi the great circle through a and b is not unique.
SLERP_ANTIPODAL_THRESHOLD = 1e-3


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=-1, keepdim=True)


def project_tangent(v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Project ``g`` onto the tangent space of the unit sphere at ``v``: g - (g.v) v."""
    return g - _rowdot(g, v) * v


def retract(v: torch.Tensor) -> torch.Tensor:
    """Map every row back onto the unit sphere: v / ||v||."""
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)


def vmf_prior_grad(mu: torch.Tensor, kappa: float) -> torch.Tensor:
    """Gradient of the negative log-density of a von Mises-Fisher prior: -kappa * mu.

    ``mu`` must hold unit rows. The vMF log-density is kappa * mu.v + const, so
    adding this term to dL/dv pulls v toward mu.
    """
    return -kappa * mu


def project_to_sphere(x: torch.Tensor, name: str = "tensor") -> torch.Tensor:
    """Return ``x`` with every row scaled to unit L2 norm (computed in fp32).

    Rows of norm zero (or non-finite rows) have no direction and raise a
    ``ValueError`` naming ``name``.
    """
    x32 = x.detach().float()
    norms = torch.linalg.vector_norm(x32, dim=-1, keepdim=True)
    bad = ~torch.isfinite(norms) | (norms == 0)
    if bool(bad.any()):
        n_bad = int(bad.sum())
        raise ValueError(
            f"{name}: {n_bad} row(s) have zero or non-finite norm and no direction; "
            "initialize them with a nonzero finite vector before projecting onto the sphere"
        )
    return (x32 / norms).to(x.dtype)


@torch.no_grad()
def project_to_sphere_(x: torch.Tensor, name: str = "tensor") -> torch.Tensor:
    """In-place :func:`project_to_sphere`; returns ``x``.

    Use it on a parameter before its first :class:`~dti_fast.SphericalSGD` step.
    """
    x.copy_(project_to_sphere(x, name))
    return x


def slerp(
    a: torch.Tensor,
    b: torch.Tensor,
    t: float | torch.Tensor,
    *,
    linear_threshold: float = SLERP_LINEAR_THRESHOLD,
    antipodal_threshold: float = SLERP_ANTIPODAL_THRESHOLD,
) -> torch.Tensor:
    """Spherical linear interpolation between unit rows ``a`` and ``b``.

    ``slerp(a, b; t) = (sin((1-t) theta) a + sin(t theta) b) / sin(theta)`` with
    ``theta = arccos(a . b)``, row by row; ``a`` and ``b`` are normalized first.
    ``t`` is a float or a tensor that broadcasts against the rows (``a.shape[:-1]``).
    Rows whose angle is below ``linear_threshold`` use a normalized lerp; rows
    whose angle is within ``antipodal_threshold`` of pi raise ``ValueError``
    (the interpolating great circle is not unique there).
    """
    if a.shape != b.shape:
        raise ValueError(f"slerp needs tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    out_dtype = torch.promote_types(a.dtype, b.dtype)
    a32 = project_to_sphere(a.float(), "slerp start")
    b32 = project_to_sphere(b.float(), "slerp end")
    # t is a scalar or broadcasts against the rows (a.shape[:-1]).
    t = torch.as_tensor(t, dtype=torch.float32, device=a.device).unsqueeze(-1)
    dot = _rowdot(a32, b32).clamp(-1.0, 1.0)
    theta = torch.arccos(dot)
    if bool((theta > math.pi - antipodal_threshold).any()):
        raise ValueError(
            "slerp: a row of the two directions is (nearly) antipodal (angle within "
            f"{antipodal_threshold} rad of pi); the path between them is not defined. "
            "Interpolate through an intermediate concept instead."
        )
    sin_theta = torch.sin(theta)
    small = theta < linear_threshold
    safe_sin = torch.where(small, torch.ones_like(sin_theta), sin_theta)
    wa = torch.where(small, 1.0 - t, torch.sin((1.0 - t) * theta) / safe_sin)
    wb = torch.where(small, t, torch.sin(t * theta) / safe_sin)
    out = wa * a32 + wb * b32
    # Exact slerp of unit vectors stays unit; renormalizing only removes rounding
    # and makes the lerp fallback a normalized lerp.
    return retract(out).to(out_dtype)


def norm_scale(weight: torch.Tensor | float, stat: str | float = "mean") -> float:
    """The fixed magnitude m* of learned vectors for an embedding table.

    ``stat`` is "mean" (default), "min" or "max" of the L2 norms of the table's
    rows, rows of norm exactly 0 excluded; or a positive float used as is.
    """
    if isinstance(stat, (int, float)) and not isinstance(stat, bool):
        value = float(stat)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"norm scale must be a positive finite float, got {stat!r}")
        return value
    if stat not in ("mean", "min", "max"):
        raise ValueError(f"norm scale statistic must be 'mean', 'min', 'max' or a positive float, got {stat!r}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("norm_scale needs a 2-D embedding table (vocab x dim)")
    norms = torch.linalg.vector_norm(weight.detach().float(), dim=-1)
    norms = norms[norms > 0]
    if norms.numel() == 0:
        raise ValueError("norm_scale: every row of the embedding table has norm 0")
    return float(getattr(norms, stat)())


def spherical_sgd_step_reference(
    v: torch.Tensor,
    grad: torch.Tensor,
    s: torch.Tensor,
    step: int,
    *,
    lr: float,
    kappa: float = 0.0,
    mu: torch.Tensor | None = None,
    beta: float = 0.0,
    eps: float = 1e-8,
    normalize: bool = True,
    grad_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SphericalSGD step on the rows of ``v``, written line by line from the method.

    ``step`` is t (1 for the first step), ``s`` the running mean of squared
    tangent-gradient norms (one per row, s_0 = 0). Math runs in fp32. Returns the
    new rows (in ``v``'s dtype) and the new ``s`` (fp32); inputs are not modified.
    With ``normalize=False`` the step is plain Riemannian SGD with projection
    retraction and ``s`` is returned unchanged. ``grad_scale`` divides the
    gradient first (a GradScaler's scale).
    """
    v32 = v.float()
    g = grad.float()
    if grad_scale is not None:
        g = g / grad_scale
    if kappa != 0.0:
        if mu is None:
            raise ValueError("kappa > 0 needs a prior mean mu")
        g = g + vmf_prior_grad(retract(mu.float()), kappa)
    g = project_tangent(v32, g)
    s = s.float()
    if normalize:
        s = beta * s + (1.0 - beta) * (g * g).sum(dim=-1)
        s_hat = s / (1.0 - beta**step)
        g = g / (torch.sqrt(s_hat) + eps).unsqueeze(-1)
    new_v = retract(v32 - lr * g)
    return new_v.to(v.dtype), s

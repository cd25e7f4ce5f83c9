"""The plain-torch sphere math of dti_fast.sphere, checked against its definitions."""

from __future__ import annotations

import math

import pytest
import torch

from dti_fast.sphere import (
    SLERP_ANTIPODAL_THRESHOLD,
    SLERP_LINEAR_THRESHOLD,
    norm_scale,
    project_tangent,
    project_to_sphere,
    project_to_sphere_,
    retract,
    slerp,
    spherical_sgd_step_reference,
    vmf_prior_grad,
)

#: fp32 identities (dot products, norms) of O(1) quantities over <= 768 terms:
#: rounding is ~sqrt(768) * 6e-8 ~ 2e-6 at worst; 1e-5 leaves margin and still
#: catches any real mistake (a wrong formula is off by O(1)).
FP32_ATOL = 1e-5
#: Angles from atan2 of fp32 vectors: ~1e-7 rad of rounding per component;
#: 1e-5 rad is far below any mistake in the slerp weights (which are O(0.1)).
ANGLE_ATOL = 1e-5


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(shape, generator=_gen(seed))
    return x / x.norm(dim=-1, keepdim=True)


def _angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise angle between a and b, accurate also near 0 and pi (atan2, in fp64)."""
    a, b = a.double(), b.double()
    cross = (a - (a * b).sum(-1, keepdim=True) * b / (b * b).sum(-1, keepdim=True)).norm(dim=-1) * b.norm(dim=-1)
    dot = (a * b).sum(-1)
    return torch.atan2(cross, dot)


def _at_angle(a: torch.Tensor, theta: float, seed: int = 1) -> torch.Tensor:
    """A unit row at exactly ``theta`` from unit row ``a`` (built in fp64)."""
    a64 = a.double()
    w = torch.randn(a.shape, generator=_gen(seed), dtype=torch.float64)
    w = w - (w * a64).sum(-1, keepdim=True) * a64
    w = w / w.norm(dim=-1, keepdim=True)
    return (math.cos(theta) * a64 + math.sin(theta) * w).float()


# -- project_tangent / retract / vmf_prior_grad ---------------------------------


@pytest.mark.parametrize("shape", [(768,), (5, 64), (2, 3, 1280)])
def test_project_tangent_is_orthogonal_to_row(shape):
    v = _unit(*shape)
    g = 3.0 * torch.randn(shape, generator=_gen(1))
    t = project_tangent(v, g)
    assert t.shape == g.shape
    assert (t * v).sum(-1).abs().max() < FP32_ATOL * 3.0  # g has norm ~3*sqrt(D); scaled tolerance
    # Projection: idempotent, and it removes exactly the radial part.
    torch.testing.assert_close(project_tangent(v, t), t, atol=FP32_ATOL, rtol=0)
    radial = g - t
    cos = (radial * v).sum(-1) / (radial.norm(dim=-1) * v.norm(dim=-1))
    torch.testing.assert_close(cos.abs(), torch.ones_like(cos), atol=FP32_ATOL, rtol=0)


def test_project_tangent_of_radial_gradient_is_zero():
    v = _unit(4, 77)
    t = project_tangent(v, 2.5 * v)
    assert t.abs().max() < FP32_ATOL


@pytest.mark.parametrize("shape", [(768,), (6, 77), (2, 3, 64)])
def test_retract_gives_unit_rows_and_keeps_direction(shape):
    x = 7.0 * torch.randn(shape, generator=_gen(2))
    r = retract(x)
    torch.testing.assert_close(r.norm(dim=-1), torch.ones(shape[:-1]), atol=FP32_ATOL, rtol=0)
    cos = (r * x).sum(-1) / x.norm(dim=-1)
    torch.testing.assert_close(cos, torch.ones(shape[:-1]), atol=FP32_ATOL, rtol=0)


def test_vmf_prior_grad_is_the_gradient_of_the_negative_log_density():
    mu = _unit(3, 64)
    kappa = 0.37
    v = _unit(3, 64, seed=5).requires_grad_(True)
    # -log p(v) = -kappa * mu.v + const
    (-(kappa * (mu * v).sum())).backward()
    torch.testing.assert_close(vmf_prior_grad(mu, kappa), v.grad, atol=0, rtol=0)
    torch.testing.assert_close(vmf_prior_grad(mu, kappa), -kappa * mu, atol=0, rtol=0)
    assert torch.equal(vmf_prior_grad(mu, 0.0), torch.zeros_like(mu))


# -- project_to_sphere ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_project_to_sphere_normalizes_and_keeps_dtype(dtype):
    x = (5 * torch.randn(4, 3, 77, generator=_gen(3))).to(dtype)
    y = project_to_sphere(x)
    assert y.dtype == dtype and y.shape == x.shape
    # 16-bit storage of a unit vector: norm within a few eps of 1.
    tol = {torch.float32: FP32_ATOL, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
    torch.testing.assert_close(y.float().norm(dim=-1), torch.ones(4, 3), atol=tol, rtol=0)


def test_project_to_sphere_inplace_returns_same_tensor():
    x = 3 * torch.randn(5, 64, generator=_gen(4))
    expected = x / x.norm(dim=-1, keepdim=True)
    out = project_to_sphere_(x)
    assert out is x
    torch.testing.assert_close(x, expected, atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("bad_value", [0.0, float("nan"), float("inf")])
def test_project_to_sphere_rejects_rows_without_direction(bad_value):
    x = torch.randn(4, 16, generator=_gen(5))
    x[2] = bad_value
    with pytest.raises(ValueError, match="my_rows"):
        project_to_sphere(x, "my_rows")
    before = x.clone()
    with pytest.raises(ValueError, match="1 row"):
        project_to_sphere_(x, "my_rows")
    assert torch.equal(x.nan_to_num(), before.nan_to_num())  # nothing written on failure


# -- slerp ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slerp_endpoints(dtype):
    a = _unit(3, 768).to(dtype)
    b = _unit(3, 768, seed=9).to(dtype)
    tol = FP32_ATOL if dtype == torch.float32 else 1e-2  # a renormalized bf16 row moves by ~1 bf16 ulp
    out0, out1 = slerp(a, b, 0.0), slerp(a, b, 1.0)
    assert out0.dtype == dtype and out1.dtype == dtype
    torch.testing.assert_close(out0.float(), project_to_sphere(a.float()), atol=tol, rtol=0)
    torch.testing.assert_close(out1.float(), project_to_sphere(b.float()), atol=tol, rtol=0)


@pytest.mark.parametrize("theta", [0.3, math.pi / 2, 2.0, 3.0])
def test_slerp_unit_norm_and_constant_angular_speed(theta):
    a = _unit(4, 768)
    b = _at_angle(a, theta)
    ts = torch.linspace(0.0, 1.0, 11)
    for t in ts.tolist():
        out = slerp(a, b, t)
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(4), atol=FP32_ATOL, rtol=0)
        # Constant angular speed along the great circle: angle(a, x) = t*theta, angle(x, b) = (1-t)*theta.
        torch.testing.assert_close(
            _angle(a, out), torch.full((4,), t * theta, dtype=torch.float64), atol=ANGLE_ATOL, rtol=0
        )
        torch.testing.assert_close(
            _angle(out, b), torch.full((4,), (1 - t) * theta, dtype=torch.float64), atol=ANGLE_ATOL, rtol=0
        )


def test_slerp_normalizes_inputs_and_takes_per_row_t():
    a = _unit(3, 64)
    b = _at_angle(a, 1.0)
    t = torch.tensor([0.0, 0.25, 1.0])
    out = slerp(5.0 * a, 0.1 * b, t)  # scaling the inputs must not matter
    torch.testing.assert_close(
        _angle(a, out), torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64), atol=ANGLE_ATOL, rtol=0
    )


@pytest.mark.parametrize("theta", [0.0, 1e-7, 1e-5, 0.5 * SLERP_LINEAR_THRESHOLD])
def test_slerp_near_zero_angle_is_normalized_lerp_without_nan(theta):
    a = _unit(4, 768)
    b = a.clone() if theta == 0.0 else _at_angle(a, theta)
    for t in (0.0, 0.3, 0.5, 1.0):
        out = slerp(a, b, t)
        assert torch.isfinite(out).all()
        lerp = (1 - t) * a + t * b
        torch.testing.assert_close(out, lerp / lerp.norm(dim=-1, keepdim=True), atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("delta", [0.0, 1e-4, 0.5 * SLERP_ANTIPODAL_THRESHOLD])
def test_slerp_near_antipodal_raises(delta):
    a = _unit(3, 768)
    b = -a if delta == 0.0 else _at_angle(a, math.pi - delta)
    with pytest.raises(ValueError, match="antipodal"):
        slerp(a, b, 0.5)


def test_slerp_just_outside_antipodal_threshold_works():
    a = _unit(2, 768)
    theta = math.pi - 20 * SLERP_ANTIPODAL_THRESHOLD
    out = slerp(a, _at_angle(a, theta), 0.5)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(
        _angle(a, out), torch.full((2,), 0.5 * theta, dtype=torch.float64), atol=1e-4, rtol=0
    )  # arccos in fp32 near -1 resolves theta to ~1e-4


def test_slerp_rejects_bad_inputs():
    a = _unit(3, 64)
    with pytest.raises(ValueError, match="one shape"):
        slerp(a, _unit(2, 64), 0.5)
    zero = a.clone()
    zero[1] = 0
    with pytest.raises(ValueError, match="slerp end"):
        slerp(a, zero, 0.5)


# -- norm_scale -----------------------------------------------------------------------


def _table_with_zero_rows() -> tuple[torch.Tensor, torch.Tensor]:
    norms = torch.tensor([0.5, 2.0, 1.0, 0.25])
    rows = _unit(4, 32) * norms[:, None]
    table = torch.cat([rows[:2], torch.zeros(2, 32), rows[2:], torch.zeros(1, 32)])
    return table, norms


@pytest.mark.parametrize("stat, expected", [("mean", 0.9375), ("min", 0.25), ("max", 2.0)])
def test_norm_scale_statistics_exclude_zero_rows(stat, expected):
    table, _ = _table_with_zero_rows()
    assert norm_scale(table, stat) == pytest.approx(expected, abs=1e-6)


def test_norm_scale_default_is_mean_and_ignores_dtype():
    table, norms = _table_with_zero_rows()
    assert norm_scale(table) == pytest.approx(float(norms.mean()), abs=1e-6)
    assert norm_scale(table.to(torch.bfloat16)) == pytest.approx(float(norms.mean()), abs=1e-2)


@pytest.mark.parametrize("value", [0.387, 5.0, 2])
def test_norm_scale_float_passes_through(value):
    table, _ = _table_with_zero_rows()
    assert norm_scale(table, value) == float(value)
    assert isinstance(norm_scale(table, value), float)
    assert norm_scale(0.0, value) == float(value)  # the table is not even looked at


@pytest.mark.parametrize("stat", ["median", "Mean", None, True, 0.0, -1.0, float("nan"), float("inf")])
def test_norm_scale_rejects_bad_statistic(stat):
    table, _ = _table_with_zero_rows()
    with pytest.raises(ValueError):
        norm_scale(table, stat)


def test_norm_scale_rejects_bad_tables():
    with pytest.raises(ValueError, match="2-D"):
        norm_scale(torch.ones(32), "mean")
    with pytest.raises(ValueError, match="2-D"):
        norm_scale(0.5, "mean")
    with pytest.raises(ValueError, match="norm 0"):
        norm_scale(torch.zeros(4, 8), "mean")


# -- the reference step, against the method's formulas ------------------------------------


def test_reference_step_with_beta0_moves_each_row_by_atan_lr():
    # beta = 0: g / sqrt(||g||^2) is a unit tangent vector, so v - lr*g has norm
    # sqrt(1 + lr^2) and the retracted row turned by exactly atan(lr).
    v = _unit(5, 768)
    g = torch.randn(5, 768, generator=_gen(7))
    for lr in (0.01, 0.1, 0.5):
        new_v, s = spherical_sgd_step_reference(v, g, torch.zeros(5), 1, lr=lr)
        torch.testing.assert_close(
            _angle(v, new_v), torch.full((5,), math.atan(lr), dtype=torch.float64), atol=ANGLE_ATOL, rtol=0
        )
        torch.testing.assert_close(s, project_tangent(v, g).pow(2).sum(-1), rtol=1e-6, atol=0)


def test_reference_step_bias_correction_and_running_state():
    beta, lr, eps = 0.9, 0.05, 1e-8
    v = _unit(3, 64)
    g1 = torch.randn(3, 64, generator=_gen(11))
    g2 = 4.0 * torch.randn(3, 64, generator=_gen(12))
    v1, s1 = spherical_sgd_step_reference(v, g1, torch.zeros(3), 1, lr=lr, beta=beta, eps=eps)
    n1 = project_tangent(v, g1).norm(dim=-1)
    torch.testing.assert_close(s1, (1 - beta) * n1**2, rtol=1e-6, atol=0)
    # Step 1 with bias correction: s_hat = ||g||^2, so again a move of atan(lr).
    torch.testing.assert_close(
        _angle(v, v1), torch.full((3,), math.atan(lr), dtype=torch.float64), atol=ANGLE_ATOL, rtol=0
    )
    v2, s2 = spherical_sgd_step_reference(v1, g2, s1, 2, lr=lr, beta=beta, eps=eps)
    n2 = project_tangent(v1, g2).norm(dim=-1)
    expected_s2 = beta * s1 + (1 - beta) * n2**2
    torch.testing.assert_close(s2, expected_s2, rtol=1e-6, atol=0)
    step_len = lr * n2 / (torch.sqrt(expected_s2 / (1 - beta**2)) + eps)
    torch.testing.assert_close(_angle(v1, v2), torch.atan(step_len).double(), atol=ANGLE_ATOL, rtol=0)


def test_reference_step_prior_and_grad_scale_and_plain_mode():
    v = _unit(4, 64)
    g = torch.randn(4, 64, generator=_gen(13))
    mu = 3.0 * torch.randn(4, 64, generator=_gen(14))  # normalized inside
    kappa, lr = 0.2, 0.1
    # Plain RSGD (normalize=False): retract(v - lr * P_v(g - kappa*mu_hat)); s untouched.
    s0 = torch.rand(4, generator=_gen(15))
    new_v, s = spherical_sgd_step_reference(v, g, s0, 3, lr=lr, kappa=kappa, mu=mu, normalize=False)
    mu_hat = mu / mu.norm(dim=-1, keepdim=True)
    expected = retract(v - lr * project_tangent(v, g - kappa * mu_hat))
    torch.testing.assert_close(new_v, expected, atol=FP32_ATOL, rtol=0)
    assert torch.equal(s, s0)
    # grad_scale divides the gradient first.
    scaled, _ = spherical_sgd_step_reference(
        v, 1024.0 * g, s0, 3, lr=lr, kappa=kappa, mu=mu, normalize=False, grad_scale=1024.0
    )
    torch.testing.assert_close(scaled, expected, atol=FP32_ATOL, rtol=0)
    with pytest.raises(ValueError, match="mu"):
        spherical_sgd_step_reference(v, g, s0, 1, lr=lr, kappa=kappa, mu=None)


def test_reference_step_does_not_modify_inputs_and_keeps_dtype():
    v = _unit(3, 64).to(torch.bfloat16)
    g = torch.randn(3, 64, generator=_gen(16)).to(torch.bfloat16)
    s = torch.rand(3, generator=_gen(17))
    copies = (v.clone(), g.clone(), s.clone())
    new_v, new_s = spherical_sgd_step_reference(v, g, s, 2, lr=0.1, beta=0.5)
    assert new_v.dtype == torch.bfloat16 and new_s.dtype == torch.float32
    assert torch.equal(v, copies[0]) and torch.equal(g, copies[1]) and torch.equal(s, copies[2])

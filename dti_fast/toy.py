"""A toy problem on the sphere that shows SphericalSGD at work in a second.

Many "concepts" of a few unit vectors each chase hidden target directions
through a noisy cosine loss, with a vMF prior pulling them toward their
initializers. SphericalSGD keeps every row on the unit sphere while AdamW on
the same loss, unconstrained (as plain Textual Inversion trains), lets the
norms drift.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .optim import SphericalSGD, resolve_fused
from .sphere import project_to_sphere


@dataclass
class ToyResult:
    """What the toy run measured."""

    concepts: int
    vectors: int
    dim: int
    steps: int
    start_cosine: float
    final_cosine: float
    max_norm_error: float
    adamw_final_norm: float
    seconds: float
    path: str


def _loss(rows: torch.Tensor, targets: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    # Negative cosine to the targets; the noise term plays the role of SGD noise.
    return -(rows * (targets + noise)).sum(-1).sum(-1).mean()


def run_toy(
    concepts: int = 64,
    vectors: int = 4,
    dim: int = 768,
    steps: int = 200,
    lr: float = 0.02,
    kappa: float = 1e-4,
    seed: int = 0,
    fused: bool | None = None,
) -> ToyResult:
    """Train the toy problem and return what happened."""
    gen = torch.Generator().manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = (concepts, vectors, dim)
    targets = project_to_sphere(torch.randn(shape, generator=gen)).to(device)
    # Initializers: a noisy version of the target, as an initializer word is
    # related to but not the concept.
    init = project_to_sphere(targets.cpu() + 1.5 * torch.randn(shape, generator=gen)).to(device)
    rows = torch.nn.Parameter(init.clone())
    opt = SphericalSGD([{"params": [rows], "prior": [init]}], lr=lr, kappa=kappa, fused=fused)
    start_cos = float((rows.detach() * targets).sum(-1).mean())

    ti = torch.nn.Parameter(init.clone() * 0.39)  # CLIP-scale start, unconstrained
    adamw = torch.optim.AdamW([ti], lr=5e-3, weight_decay=1e-2)

    started = time.perf_counter()
    noise_gen = torch.Generator(device=device).manual_seed(seed + 1)
    for _ in range(steps):
        noise = 0.02 * torch.randn(shape, generator=noise_gen, device=device)
        opt.zero_grad()
        _loss(rows, targets, noise).backward()
        opt.step()
        adamw.zero_grad()
        _loss(ti, targets, noise).backward()
        adamw.step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    norms = torch.linalg.vector_norm(rows.detach(), dim=-1)
    return ToyResult(
        concepts=concepts,
        vectors=vectors,
        dim=dim,
        steps=steps,
        start_cosine=start_cos,
        final_cosine=float((rows.detach() * targets).sum(-1).mean()),
        max_norm_error=float((norms - 1).abs().max()),
        adamw_final_norm=float(torch.linalg.vector_norm(ti.detach(), dim=-1).mean()),
        seconds=seconds,
        path="fused Triton kernel" if resolve_fused(fused, [rows]) else "vectorized torch",
    )

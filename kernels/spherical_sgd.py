"""Fused SphericalSGD step: one Triton launch updates every row of many tensors.

The launch works on a pointer table: one entry per tensor (param, grad, per-row
state ``s``, prior, step counter, row count) and one entry per program (which
tensor, first row). So a step over 1000 small concept tensors is one launch,
not 1000; a single packed tensor of a million rows is the same launch with a
one-row table. The math is :func:`dti_fast.sphere.spherical_sgd_step_reference`,
accumulated in fp32 whatever the storage dtype.

Tensors of one launch share a device, param dtype, grad dtype and vector size;
:func:`fused_spherical_sgd` buckets its inputs by these and launches once per
bucket (normally one).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["fused_spherical_sgd", "MAX_SINGLE_PASS_DIM", "LaunchCache", "LaunchConfig", "launch_config"]

#: Rows up to this size are held in registers and read once; longer rows are
#: streamed in chunks (four passes over the row).
MAX_SINGLE_PASS_DIM = 8192

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}


@triton.jit
def _adjusted_grad(grad_ptr, mu_ptr, offs, mask, inv_scale, kappa, HAS_SCALE: tl.constexpr, HAS_PRIOR: tl.constexpr):
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = g * inv_scale
    if HAS_PRIOR:
        g = g - kappa * tl.load(mu_ptr + offs, mask=mask, other=0.0)
    return g


@triton.jit
def _spherical_sgd_kernel(
    meta_ptr,
    blocks_ptr,
    grad_scale_ptr,
    found_inf_ptr,
    lr,
    kappa,
    beta,
    log2_beta,
    eps,
    D,
    PARAM_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    HAS_PRIOR: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BIAS_CORRECTION: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    SINGLE_PASS: tl.constexpr,
    ALIGNED: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # meta rows (int64): param, grad, s, prior, step pointers; row count.
    # blocks rows (int32): tensor index, first row of this program.
    pid = tl.program_id(0)
    tensor = tl.load(blocks_ptr + 2 * pid).to(tl.int64)
    row0 = tl.load(blocks_ptr + 2 * pid + 1).to(tl.int64)
    meta = meta_ptr + tensor * 6
    p_ptr = tl.load(meta + 0).to(tl.pointer_type(PARAM_DTYPE))
    g_ptr = tl.load(meta + 1).to(tl.pointer_type(GRAD_DTYPE))
    s_ptr = tl.load(meta + 2).to(tl.pointer_type(tl.float32))
    mu_ptr = tl.load(meta + 3).to(tl.pointer_type(tl.float32))
    step_ptr = tl.load(meta + 4).to(tl.pointer_type(tl.float32))
    n_rows = tl.load(meta + 5)
    if ALIGNED:
        # Chosen on the host: every param/grad/prior pointer is 16-byte aligned and a
        # row is a whole number of 16-byte vectors (D % VEC == 0). The pointers come
        # from a table, so without these hints Triton must assume nothing and emits
        # scalar loads; with them it emits 128-bit vector loads and stores.
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        mu_ptr = tl.multiple_of(mu_ptr, 16)
        D = (D // VEC) * VEC  # = D here; tells the compiler D is a multiple of VEC

    rows = row0 + tl.arange(0, BLOCK_R).to(tl.int64)
    row_mask = rows < n_rows
    cols = tl.arange(0, BLOCK_D)
    if ALIGNED:
        cols = tl.max_contiguous(tl.multiple_of(cols, BLOCK_D), BLOCK_D)

    inv_scale = 1.0
    if HAS_SCALE:
        inv_scale = 1.0 / tl.load(grad_scale_ptr)
    write = row_mask
    if HAS_FOUND_INF:
        # Compared as a block, not as a broadcast scalar: Triton's CPU interpreter
        # types a scalar comparison as float and then cannot `&` it with a mask.
        found = tl.load(found_inf_ptr) + tl.zeros([BLOCK_R], dtype=tl.float32)
        write = row_mask & (found == 0.0)

    if SINGLE_PASS:
        offs = rows[:, None] * D + cols[None, :]
        mask = row_mask[:, None] & (cols < D)[None, :]
        v = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = _adjusted_grad(g_ptr, mu_ptr, offs, mask, inv_scale, kappa, HAS_SCALE, HAS_PRIOR)
        gv = tl.sum(g * v, axis=1)
        g = g - gv[:, None] * v
        if NORMALIZE:
            s = beta * tl.load(s_ptr + rows, mask=row_mask, other=0.0) + (1.0 - beta) * tl.sum(g * g, axis=1)
            tl.store(s_ptr + rows, s, mask=write)
            if BIAS_CORRECTION:
                s = s / (1.0 - tl.exp2(tl.load(step_ptr) * log2_beta))
            coef = lr / (tl.sqrt(s) + eps)
            coef = tl.where(row_mask, coef, 0.0)
        else:
            coef = lr + tl.zeros([BLOCK_R], dtype=tl.float32)
        v = v - coef[:, None] * g
        norm = tl.where(row_mask, tl.sqrt(tl.sum(v * v, axis=1)), 1.0)  # padding rows: no 0/0
        v = v / norm[:, None]
        tl.store(p_ptr + offs, v.to(PARAM_DTYPE), mask=mask & write[:, None])
    else:
        # Rows longer than one block: stream them. Pass 1: g.v.
        gv = tl.zeros([BLOCK_R], dtype=tl.float32)
        for c in range(0, D, BLOCK_D):
            offs = rows[:, None] * D + (c + cols)[None, :]
            mask = row_mask[:, None] & ((c + cols) < D)[None, :]
            v = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g = _adjusted_grad(g_ptr, mu_ptr, offs, mask, inv_scale, kappa, HAS_SCALE, HAS_PRIOR)
            gv += tl.sum(g * v, axis=1)
        # Pass 2: the tangent gradient's norm gives the step size.
        if NORMALIZE:
            gg = tl.zeros([BLOCK_R], dtype=tl.float32)
            for c in range(0, D, BLOCK_D):
                offs = rows[:, None] * D + (c + cols)[None, :]
                mask = row_mask[:, None] & ((c + cols) < D)[None, :]
                v = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                g = _adjusted_grad(g_ptr, mu_ptr, offs, mask, inv_scale, kappa, HAS_SCALE, HAS_PRIOR)
                g = g - gv[:, None] * v
                gg += tl.sum(g * g, axis=1)
            s = beta * tl.load(s_ptr + rows, mask=row_mask, other=0.0) + (1.0 - beta) * gg
            tl.store(s_ptr + rows, s, mask=write)
            if BIAS_CORRECTION:
                s = s / (1.0 - tl.exp2(tl.load(step_ptr) * log2_beta))
            coef = lr / (tl.sqrt(s) + eps)
            coef = tl.where(row_mask, coef, 0.0)
        else:
            coef = lr + tl.zeros([BLOCK_R], dtype=tl.float32)
        # Pass 3: norm of the updated row; pass 4: write it retracted.
        nn = tl.zeros([BLOCK_R], dtype=tl.float32)
        for c in range(0, D, BLOCK_D):
            offs = rows[:, None] * D + (c + cols)[None, :]
            mask = row_mask[:, None] & ((c + cols) < D)[None, :]
            v = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g = _adjusted_grad(g_ptr, mu_ptr, offs, mask, inv_scale, kappa, HAS_SCALE, HAS_PRIOR)
            v = v - coef[:, None] * (g - gv[:, None] * v)
            nn += tl.sum(v * v, axis=1)
        inv_norm = 1.0 / tl.where(row_mask, tl.sqrt(nn), 1.0)
        for c in range(0, D, BLOCK_D):
            offs = rows[:, None] * D + (c + cols)[None, :]
            mask = row_mask[:, None] & ((c + cols) < D)[None, :]
            v = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g = _adjusted_grad(g_ptr, mu_ptr, offs, mask, inv_scale, kappa, HAS_SCALE, HAS_PRIOR)
            v = (v - coef[:, None] * (g - gv[:, None] * v)) * inv_norm[:, None]
            tl.store(p_ptr + offs, v.to(PARAM_DTYPE), mask=mask & write[:, None])


@dataclass(frozen=True)
class LaunchConfig:
    """How one launch tiles its rows: ``rows`` per program, ``block`` columns per
    tile, ``single_pass`` (the padded row held in registers, read once) or
    streamed (tiles of ``block`` columns, four passes over the row), ``num_warps``."""

    rows: int
    block: int
    single_pass: bool
    num_warps: int


#: Program tiles of about this many elements (``rows * block``): 16 KB of fp32
#: per operand, 16 or 32 elements per thread at 4 or 8 warps.
TILE_ELEMENTS = 4096
#: Overrides of :func:`launch_config` for one (D, element size in bytes), from a
#: GPU sweep (``bench/bench_optimizer.py::test_launch_sweep`` writes the timing
#: of every candidate; copy the winners here). Empty: the rule below is not yet
#: tuned on a GPU.
LAUNCH_TABLE: dict[tuple[int, int], LaunchConfig] = {}


def launch_config(dim: int, dtype: torch.dtype = torch.float32) -> LaunchConfig:
    """The launch configuration for rows of ``dim`` elements of ``dtype``.

    A :data:`LAUNCH_TABLE` entry for ``(dim, element size)`` wins. Otherwise:
    rows up to :data:`MAX_SINGLE_PASS_DIM` are padded to the next power of two
    and read once; ``rows`` per program fill a tile of :data:`TILE_ELEMENTS`
    (at most 64 rows); 4 warps for tiles up to 2048 elements, else 8. Longer
    rows are streamed in tiles of 2048 columns, one row per program.
    """
    hit = LAUNCH_TABLE.get((dim, dtype.itemsize))
    if hit is not None:
        return hit
    if dim <= MAX_SINGLE_PASS_DIM:
        block, single = triton.next_power_of_2(dim), True
    else:
        block, single = 2048, False
    rows = max(1, min(64, TILE_ELEMENTS // block))
    return LaunchConfig(rows=rows, block=block, single_pass=single, num_warps=4 if rows * block <= 2048 else 8)


def launch_candidates(dim: int) -> list[LaunchConfig]:
    """Configurations a GPU sweep times for rows of ``dim`` elements: the padded
    single pass at several rows per program and warp counts, and streamed tiles
    (the chunked loop, no padding when ``block`` divides ``dim``)."""
    out = []
    if dim <= MAX_SINGLE_PASS_DIM:
        block = triton.next_power_of_2(dim)
        for rows in (1, 2, 4, 8, 16, 32, 64):
            if 256 <= rows * block <= 16384 or (rows == 64 and rows * block < 256):
                out += [LaunchConfig(rows, block, True, w) for w in (2, 4, 8, 16) if w * 32 <= rows * block]
    for block in (128, 256, 512, 1024, 2048):
        if block < dim:
            for rows in (1, 2, 4, 8):
                out += [LaunchConfig(rows, block, False, w) for w in (4, 8) if w * 32 <= rows * block]
    return out


def vector_width(dtypes: Sequence[torch.dtype]) -> int:
    """Elements of the narrowest of ``dtypes`` in 16 bytes: a row of D elements is whole
    16-byte vectors in every one of them when D is a multiple of this."""
    return 16 // min(d.itemsize for d in dtypes)


def aligned_pointers(pointers: Sequence[int], dim: int, dtypes: Sequence[torch.dtype]) -> bool:
    """True when a launch may take the aligned specialization: every data pointer is
    16-byte aligned and rows of ``dim`` elements are whole 16-byte vectors in every dtype
    (with contiguous rows, every row then starts 16-byte aligned)."""
    return dim % vector_width(dtypes) == 0 and all(ptr % 16 == 0 for ptr in pointers)


def aligned(tensors: Sequence[torch.Tensor], dim: int) -> tuple[bool, int]:
    """(ALIGNED, VEC) for contiguous ``tensors`` with rows of ``dim`` elements (see :func:`aligned_pointers`)."""
    dtypes = [t.dtype for t in tensors]
    return aligned_pointers([t.data_ptr() for t in tensors], dim, dtypes), vector_width(dtypes)


class LaunchCache:
    """Device-side pointer and block tables, rebuilt only when pointers or shapes change."""

    def __init__(self) -> None:
        self._meta: dict = {}
        self._blocks: dict = {}

    def meta(self, bucket: tuple, entries: tuple, device: torch.device) -> torch.Tensor:
        """The device pointer table for ``entries`` (rebuilt only when they change)."""
        return self._entry(bucket, entries, device)[1]

    def aligned(self, bucket: tuple, entries: tuple, device: torch.device) -> bool:
        """Whether the launch of these entries may take the aligned specialization (see :func:`aligned`);
        worked out when the table is built."""
        return self._entry(bucket, entries, device)[2]

    def _entry(self, bucket: tuple, entries: tuple, device: torch.device) -> tuple:
        hit = self._meta.get(bucket)
        if hit is not None and hit[0] == entries:
            return hit
        if len(self._meta) > 64:
            self._meta.clear()
        table = _to_device(torch.tensor(entries, dtype=torch.int64), device)
        _, p_dtype, g_dtype, dim = bucket
        # param, grad and prior pointers (a prior pointer of 0, unused, is aligned).
        pointers = [ptr for e in entries for ptr in (e[0], e[1], e[3])]
        hit = self._meta[bucket] = (entries, table, aligned_pointers(pointers, dim, (p_dtype, g_dtype, torch.float32)))
        return hit

    def blocks(self, rows: tuple[int, ...], block_r: int, device: torch.device) -> torch.Tensor:
        key = (rows, block_r, device)
        hit = self._blocks.get(key)
        if hit is not None:
            return hit
        if len(self._blocks) > 64:
            self._blocks.clear()
        n_blocks = torch.tensor([(r + block_r - 1) // block_r for r in rows], dtype=torch.int64)
        total = int(n_blocks.sum())
        tensor_of_block = torch.repeat_interleave(torch.arange(len(rows)), n_blocks)
        first_block = torch.cumsum(n_blocks, 0) - n_blocks
        row_of_block = (torch.arange(total) - first_block[tensor_of_block]) * block_r
        table = torch.stack([tensor_of_block, row_of_block], dim=1).to(torch.int32).contiguous()
        table = _to_device(table, device)
        self._blocks[key] = table
        return table


def _to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        # Pinned memory makes the copy asynchronous: no host sync in the step.
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)


_DEFAULT_CACHE = LaunchCache()


def fused_spherical_sgd(
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
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    cache: LaunchCache | None = None,
    device_memo: dict | None = None,
    config: LaunchConfig | None = None,
) -> None:
    """Apply one SphericalSGD step in place with the Triton kernel.

    ``params`` must be contiguous; ``row_states`` are fp32 tensors of shape
    ``param.shape[:-1]``; ``steps`` fp32 scalar tensors already counting this
    step; ``priors`` fp32 unit-row tensors shaped like the params (used when
    ``kappa != 0``). ``grad_scale``/``found_inf`` are a GradScaler's tensors:
    grads are divided by the scale and nothing is written when ``found_inf``
    is nonzero, without a host sync; each device's launch reads its own copy
    of them (made once per step and device, kept in ``device_memo``).
    ``config`` overrides :func:`launch_config` (for sweeps). Each launch takes
    the aligned specialization (vector loads) when :func:`aligned` allows it.
    """
    from dti_fast.optim import device_copy

    cache = cache or _DEFAULT_CACHE
    memo = device_memo if device_memo is not None else {}
    has_prior = kappa != 0.0
    buckets: dict[tuple, list[int]] = {}
    for i, (p, g) in enumerate(zip(params, grads)):
        if not p.is_contiguous():
            raise ValueError(
                f"fused SphericalSGD needs contiguous params; param {i} of shape {tuple(p.shape)} is not "
                "(make it contiguous, or use fused=False)"
            )
        if p.dtype not in _TL_DTYPES or g.dtype not in _TL_DTYPES:
            raise TypeError(f"fused SphericalSGD supports fp32/bf16/fp16, got param {p.dtype}, grad {g.dtype}")
        buckets.setdefault((p.device, p.dtype, g.dtype, p.shape[-1]), []).append(i)

    for bucket, idx in buckets.items():
        device, p_dtype, g_dtype, dim = bucket
        # Contiguous copies of grads stay referenced here until the launch is queued.
        bucket_grads = [grads[i].contiguous() for i in idx]
        entries = tuple(
            (
                params[i].data_ptr(),
                g.data_ptr(),
                row_states[i].data_ptr(),
                priors[i].data_ptr() if has_prior else 0,
                steps[i].data_ptr(),
                params[i].numel() // dim,
            )
            for i, g in zip(idx, bucket_grads)
        )
        meta = cache.meta(bucket, entries, device)
        cfg = config or launch_config(dim, p_dtype)
        blocks = cache.blocks(tuple(e[5] for e in entries), cfg.rows, device)
        n_programs = blocks.shape[0]
        if n_programs == 0:
            continue
        is_aligned = cache.aligned(bucket, entries, device)
        vec = vector_width((p_dtype, g_dtype, torch.float32))
        scale = device_copy(grad_scale, device, memo)
        inf = device_copy(found_inf, device, memo)
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            _spherical_sgd_kernel[(n_programs,)](
                meta,
                blocks,
                scale if scale is not None else meta,
                inf if inf is not None else meta,
                float(lr),
                float(kappa),
                float(beta),
                math.log2(beta) if beta > 0 else 0.0,
                float(eps),
                dim,
                PARAM_DTYPE=_TL_DTYPES[p_dtype],
                GRAD_DTYPE=_TL_DTYPES[g_dtype],
                HAS_PRIOR=has_prior,
                NORMALIZE=bool(normalize),
                BIAS_CORRECTION=bool(normalize) and beta > 0,
                HAS_SCALE=scale is not None,
                HAS_FOUND_INF=inf is not None,
                SINGLE_PASS=cfg.single_pass,
                ALIGNED=is_aligned,
                VEC=vec,
                BLOCK_R=cfg.rows,
                BLOCK_D=cfg.block,
                num_warps=cfg.num_warps,
            )

"""DirectionalEmbedding: frozen vocabulary, learned rows, m* scaling, gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dti_fast.embedding import DirectionalEmbedding, start_rows
from dti_fast.sphere import norm_scale


def _embedding(scale="mean", vocab=50, dim=16) -> DirectionalEmbedding:
    torch.manual_seed(0)
    base = nn.Embedding(vocab, dim)
    emb = DirectionalEmbedding(base, first_id=vocab, scale=scale)
    emb.add_concept([vocab, vocab + 1], torch.randn(2, dim), torch.randn(2, dim))
    emb.add_concept([vocab + 2], torch.randn(1, dim), torch.randn(1, dim))
    return emb


def test_forward_frozen_rows_and_scaled_directions():
    emb = _embedding()
    ids = torch.tensor([[0, 50, 7, 51, 52, 49]])
    out = emb(ids)
    w = emb.base.weight
    torch.testing.assert_close(out[0, 0], w[0])
    torch.testing.assert_close(out[0, 2], w[7])
    torch.testing.assert_close(out[0, 5], w[49])
    m = norm_scale(w, "mean")
    assert emb.scale == pytest.approx(m)
    torch.testing.assert_close(out[0, 1], m * emb.rows[0][0])
    torch.testing.assert_close(out[0, 3], m * emb.rows[0][1])
    torch.testing.assert_close(out[0, 4], m * emb.rows[1][0])
    # Every learned vector has norm m*.
    torch.testing.assert_close(out[0, [1, 3, 4]].norm(dim=-1), torch.full((3,), m), rtol=1e-6, atol=0)


def test_gradient_reaches_only_learned_rows_scaled_by_mstar():
    emb = _embedding()
    ids = torch.tensor([[3, 50, 52]])
    target = torch.randn(1, 3, 16)
    out = emb(ids)
    out.retain_grad()
    ((out - target) ** 2).sum().backward()
    assert emb.base.weight.grad is None
    torch.testing.assert_close(emb.rows[0].grad[0], emb.scale * out.grad[0, 1])
    torch.testing.assert_close(emb.rows[0].grad[1], torch.zeros(16))  # <c>_1 unused here
    torch.testing.assert_close(emb.rows[1].grad[0], emb.scale * out.grad[0, 2])


def test_ti_mode_uses_free_vectors():
    emb = _embedding(scale=None)
    start = emb.rows[1].detach().clone()
    torch.testing.assert_close(emb(torch.tensor([52]))[0], start[0])
    assert emb.scale == 1.0


def test_added_ids_must_continue_in_order():
    emb = _embedding()
    with pytest.raises(ValueError, match="must continue"):
        emb.add_concept([60], torch.randn(1, 16), torch.randn(1, 16))


def test_start_rows_modes():
    base = nn.Embedding(10, 4)
    torch.testing.assert_close(start_rows(base, [3, 4], "token"), base.weight[[3, 4]].detach())
    mean = start_rows(base, [3], "mean")[0]
    torch.testing.assert_close(mean.norm(), torch.tensor(1.0))
    assert start_rows(base, [1, 2, 3], "random", torch.Generator().manual_seed(0)).shape == (3, 4)
    with pytest.raises(ValueError, match="init mode"):
        start_rows(base, [1], "zeros")

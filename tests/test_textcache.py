"""PrefixCachedTextEncoder: equal to the plain HF forward (outputs and gradients) on the tiny models."""

from __future__ import annotations

import pytest
import torch

from dti_fast.data import OBJECT_TEMPLATES, STYLE_TEMPLATES
from dti_fast.embedding import add_concept_tokens, initializer_ids, install_embedding, start_rows
from dti_fast.models import load_model_parts
from dti_fast.testing import tiny_model_path
from dti_fast.textcache import PrefixCachedTextEncoder

ATOL = 1e-5
# (placeholder, initializer): 1 and 3 vectors per concept.
CONCEPTS = (("<dog>", "dog"), ("<pack>", "red leather backpack"))


def _install(parts, seed: int = 0):
    """Add the concepts' tokens and rows as TrainingJob._install_tokens does (random start rows)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for tok, enc in zip(parts.tokenizers, parts.text_encoders):
        emb = install_embedding(enc, len(tok), "mean")
        prompts = {}
        for placeholder, init in CONCEPTS:
            init_ids = initializer_ids(tok, init, placeholder)
            ct = add_concept_tokens(tok, placeholder, len(init_ids), placeholder)
            emb.add_concept(ct.ids, start_rows(emb.base, init_ids, "random", gen), emb.base.weight.detach()[init_ids])
            prompts[placeholder] = ct.prompt_string
        out.append((tok, enc, emb, prompts))
    return out


@pytest.fixture(scope="module")
def sd():
    return _install(load_model_parts(str(tiny_model_path("sd")), dtype=torch.float32, device="cpu"))


@pytest.fixture(scope="module")
def sdxl():
    return _install(load_model_parts(str(tiny_model_path("sdxl")), dtype=torch.float32, device="cpu"))


def _prompts(names: dict) -> list[str]:
    dog, pack = names["<dog>"], names["<pack>"]
    return [
        OBJECT_TEMPLATES[0].format(dog),  # "a photo of a {}"
        OBJECT_TEMPLATES[6].format(pack),  # "a dark photo of the {}"
        STYLE_TEMPLATES[2].format(dog),  # "a cropped painting in the style of {}"
        "a photo of a dog on the beach",  # no placeholder: fully cached
        f"{pack} next to {dog}",  # placeholder right after BOS
        OBJECT_TEMPLATES[0].format(pack),  # same prefix as the first prompt, longer tail
    ]


def _ids(tok, prompts):
    return tok(
        prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def _reference(enc, ids, mode: str, pooled: bool):
    """What the trainer computes (dti_fast.TrainingJob.encode_text)."""
    if mode == "penultimate":
        out = enc(ids, output_hidden_states=True)
        return out.hidden_states[-2], (out[0] if pooled else None)
    out = enc(ids)
    if not pooled:
        return out.last_hidden_state, None
    return out.last_hidden_state, (out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output)


def _grads(emb, fn):
    for p in emb.rows:
        p.grad = None
    hidden, pooled = fn()
    gen = torch.Generator().manual_seed(1)
    loss = (hidden * torch.randn(hidden.shape, generator=gen)).sum()
    if pooled is not None:
        loss = loss + (pooled * torch.randn(pooled.shape, generator=gen)).sum()
    loss.backward()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in emb.rows]
    for p in emb.rows:
        p.grad = None
    return grads


def _check(enc, emb, ids, mode, pooled, cached=None, grads=True):
    cached = cached if cached is not None else PrefixCachedTextEncoder(enc, mode=mode, pooled=pooled)
    ref_h, ref_p = _reference(enc, ids, mode, pooled)
    for _ in range(2):  # second call: every prefix from the cache
        got = cached(ids)
        torch.testing.assert_close(got.hidden, ref_h, atol=ATOL, rtol=0)
        if pooled:
            torch.testing.assert_close(got.pooled, ref_p, atol=ATOL, rtol=0)
        else:
            assert got.pooled is None
    if grads:
        want = _grads(emb, lambda: _reference(enc, ids, mode, pooled))
        got = _grads(emb, lambda: cached(ids))
        assert any(g.abs().sum() > 0 for g in want)
        for a, b in zip(got, want):
            # The loss sums B*77*D terms, so the gradients are O(10): ATOL relative to their largest entry.
            torch.testing.assert_close(a, b, atol=ATOL * max(1.0, b.abs().max().item()), rtol=0)
    return cached


def test_sd_last_matches_hf(sd):
    tok, enc, emb, names = sd[0]
    ids = _ids(tok, _prompts(names))
    cached = _check(enc, emb, ids, "last", pooled=False)
    first = emb.first_id
    n_prefixes = len({tuple(r[: next((j for j, t in enumerate(r) if t >= first), len(r))]) for r in ids.tolist()})
    assert n_prefixes == 5  # prompts 0 and 5 share "a photo of a"
    assert cached.misses == n_prefixes
    assert cached.hits > 0
    # pooler_output of a CLIPTextModel, too
    _check(enc, emb, ids, "last", pooled=True, grads=False)


def test_sdxl_penultimate_and_pooled_match_hf(sdxl):
    (tok1, enc1, emb1, names1), (tok2, enc2, emb2, names2) = sdxl
    _check(enc1, emb1, _ids(tok1, _prompts(names1)), "penultimate", pooled=False)
    _check(enc2, emb2, _ids(tok2, _prompts(names2)), "penultimate", pooled=True)
    # the combination the trainer does not use, still exact
    _check(enc2, emb2, _ids(tok2, _prompts(names2)), "last", pooled=True)


def test_cache_hits_and_sliced_prefixes(sd):
    tok, enc, emb, names = sd[0]
    prompts = _prompts(names)
    cached = PrefixCachedTextEncoder(enc, mode="last")
    # Batch 1: P is the short prefix of "<pack> next to <dog>" (1 token, BOS).
    _check(enc, emb, _ids(tok, prompts), "last", False, cached=cached, grads=False)
    misses = cached.misses
    # Batch 2: the same prompts in other batches (other P): every prefix hits, slicing longer entries.
    for sub in ([prompts[0], prompts[1]], [prompts[2]], [prompts[3]], [prompts[1], prompts[5], prompts[3]]):
        _check(enc, emb, _ids(tok, sub), "last", False, cached=cached, grads=False)
    assert cached.misses == misses
    stats = cached.stats()
    assert stats["entries"] == misses and stats["bytes"] > 0
    cached.clear()
    assert cached.stats()["entries"] == 0
    cached(_ids(tok, prompts[:1]))
    assert cached.misses == misses + 1


def test_batch_without_learned_tokens(sdxl):
    tok, enc, emb, names = sdxl[1]
    ids = _ids(tok, ["a photo of a dog", "a rendering of a cat"])
    cached = _check(enc, emb, ids, "penultimate", pooled=True, grads=False)
    out = cached(ids)
    assert not out.hidden.requires_grad and not out.pooled.requires_grad


def test_learned_token_at_position_zero(sd):
    """P == 0: nothing to cache, everything is computed (still exact)."""
    tok, enc, emb, names = sd[0]
    ids = _ids(tok, _prompts(names))
    ids[1, 0] = emb.first_id  # a learned id instead of BOS
    cached = PrefixCachedTextEncoder(enc, mode="last")
    _check(enc, emb, ids, "last", False, cached=cached)
    assert cached.misses == 1 and cached.stats()["entries"] == 1  # only the placeholder-free prompt 3, whole


@pytest.mark.parametrize("mode", ["penultimate", "last"])
def test_legacy_eos_rule(sdxl, mode, monkeypatch):
    """eos_token_id == 2: transformers pools at the argmax of the ids, i.e. at a placeholder."""
    tok, enc, emb, names = sdxl[1]
    ids = _ids(tok, _prompts(names))
    ref_new = enc(ids)[0]
    monkeypatch.setattr(enc.config, "eos_token_id", 2)
    monkeypatch.setattr(enc.text_model, "eos_token_id", 2)  # transformers reads the attribute it set in __init__
    ref_legacy = enc(ids)[0]
    assert not torch.allclose(ref_new, ref_legacy)  # the rule really changed what transformers pools
    _check(enc, emb, ids, mode, pooled=True)


def test_pooled_position_inside_prefix(sdxl):
    """An EOS id before the placeholder: the pooled position lies in the cached prefix (read from the cache)."""
    tok, enc, emb, names = sdxl[1]
    prompts = _prompts(names)
    ids = _ids(tok, [prompts[0], prompts[4], prompts[3]])
    ids[0, 1] = enc.text_model.eos_token_id  # pooled at position 1, the placeholder at 5
    for mode in ("penultimate", "last"):
        _check(enc, emb, ids, mode, pooled=True)  # P = 1: pooled position computed
        _check(enc, emb, ids[[0, 2]], mode, pooled=True)  # P = 5: pooled position cached


def test_penultimate_skips_work(sdxl):
    """Without pooled the last layer never runs; with pooled its MLP runs for one query per sample."""
    (tok1, enc1, _, names1), (tok2, enc2, _, names2) = sdxl
    shapes = {}

    def hook(name):
        return lambda mod, args: shapes.setdefault(name, []).append(tuple(args[0].shape))

    c1 = PrefixCachedTextEncoder(enc1, mode="penultimate")
    c2 = PrefixCachedTextEncoder(enc2, mode="penultimate", pooled=True)
    handles = [
        c1.layers[-1].mlp.register_forward_pre_hook(hook("e1")),
        c2.layers[-1].mlp.register_forward_pre_hook(hook("e2")),
    ]
    try:
        ids1, ids2 = _ids(tok1, _prompts(names1)), _ids(tok2, _prompts(names2))
        c1(ids1), c2(ids2)
        shapes.clear()
        c1(ids1), c2(ids2)  # all prefixes cached now
    finally:
        for h in handles:
            h.remove()
    assert "e1" not in shapes
    b = ids2.shape[0] - 1  # one sample has no placeholder
    assert shapes["e2"] == [(b, 1, enc2.config.hidden_size)]


def test_lru_bound(sd):
    tok, enc, emb, names = sd[0]
    prompts = _prompts(names)
    cached = PrefixCachedTextEncoder(enc, mode="last", max_entries=2)
    for p in prompts:
        cached(_ids(tok, [p]))
    assert cached.stats()["entries"] == 2 and cached.evictions == len(prompts) - 2
    _check(enc, emb, _ids(tok, prompts), "last", False, cached=cached, grads=False)
    assert cached.stats()["entries"] == 2


def test_bf16_autocast_cpu(sdxl):
    tok, enc, emb, names = sdxl[1]
    ids = _ids(tok, _prompts(names))
    cached = PrefixCachedTextEncoder(enc, mode="penultimate", pooled=True)
    cached(ids)  # fp32 entries
    misses = cached.misses
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_h, ref_p = _reference(enc, ids, "penultimate", True)
        got = cached(ids)
        assert cached.misses > misses  # fp32 entries are not reused under autocast
        again = cached(ids)
    assert got.hidden.dtype == ref_h.dtype and got.pooled.dtype == ref_p.dtype
    for a, b in ((got.hidden, ref_h), (got.pooled, ref_p), (again.hidden, ref_h)):
        scale = b.float().abs().max().item()
        assert (a.float() - b.float()).abs().max().item() <= 0.03 * scale
    misses = cached.misses
    fp32 = cached(ids)  # back in fp32: the fp32 entries hit again
    assert cached.misses == misses
    torch.testing.assert_close(fp32.hidden, _reference(enc, ids, "penultimate", True)[0], atol=ATOL, rtol=0)


def test_uncached_is_the_hf_forward(sdxl):
    """uncached() (the fallback, e.g. for attention dropout in training mode) reads the same outputs."""
    tok, enc, emb, names = sdxl[1]
    ids = _ids(tok, _prompts(names))
    for mode in ("penultimate", "last"):
        cached = PrefixCachedTextEncoder(enc, mode=mode, pooled=True)
        a, b = cached(ids), cached.uncached(ids)
        torch.testing.assert_close(a.hidden, b.hidden, atol=ATOL, rtol=0)
        torch.testing.assert_close(a.pooled, b.pooled, atol=ATOL, rtol=0)


# -- DecoderPrefixCache: Gemma-2 (SANA's text encoder) -------------------------------------


@pytest.fixture(scope="module")
def gemma():
    """The tiny SANA model's Gemma-2 tokenizer with a 4-layer Gemma-2 whose sliding window (4) is shorter
    than the prompts, with attention soft-capping, and learned rows for the concepts."""
    from transformers import AutoTokenizer, Gemma2Config, Gemma2Model

    from dti_fast.testing.tiny_flow import TINY_GEMMA

    tok = AutoTokenizer.from_pretrained(tiny_model_path("sana") / "tokenizer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = dict(TINY_GEMMA, num_hidden_layers=4, sliding_window=4)
        enc = Gemma2Model(Gemma2Config(vocab_size=len(tok), **config)).eval().requires_grad_(False)
    emb = install_embedding(enc, len(tok), "mean")
    gen = torch.Generator().manual_seed(0)
    words = {}
    for placeholder, init in CONCEPTS:
        init_ids = initializer_ids(tok, init, placeholder)
        ct = add_concept_tokens(tok, placeholder, len(init_ids), placeholder)
        emb.add_concept(ct.ids, start_rows(emb.base, init_ids, "random", gen), emb.base.weight.detach()[init_ids])
        words[placeholder] = ct.prompt_string
    return tok, enc, emb, words


def _gemma_batch(tok, words, templates):
    prompts = [t.format(words[p]) for t, p in zip(templates, ["<dog>", "<pack>"] * len(templates))]
    enc = tok(prompts, padding="longest", return_tensors="pt")
    return enc.input_ids, enc.attention_mask


@pytest.mark.parametrize("templates", [OBJECT_TEMPLATES[:4], STYLE_TEMPLATES[:3], OBJECT_TEMPLATES[5:6]])
def test_gemma_prefix_cache_equals_the_uncached_forward_and_its_gradients(gemma, templates):
    from dti_fast.textcache import DecoderPrefixCache

    tok, enc, emb, words = gemma
    ids, mask = _gemma_batch(tok, words, templates)
    assert ids.shape[1] > 2 * 4  # longer than twice the window: the local layers really slide
    cache = DecoderPrefixCache(enc, emb.first_id)
    for _ in range(2):  # the second call reads every prefix from the cache
        for p in emb.rows:
            p.grad = None
        want = cache.uncached(ids, mask)
        weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(1)) * mask.unsqueeze(-1)
        (want * weights).sum().backward()
        grads = [p.grad.clone() for p in emb.rows]
        for p in emb.rows:
            p.grad = None
        got = cache(ids, mask)
        torch.testing.assert_close(got * mask.unsqueeze(-1), want * mask.unsqueeze(-1), rtol=1e-5, atol=1e-6)
        (got * weights).sum().backward()
        for g, p in zip(grads, emb.rows):
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-8)
    assert cache.hits >= len(templates) and cache.misses <= len(templates)


def test_gemma_prefix_cache_uses_the_cached_states(gemma):
    """A corrupted cache entry changes the output: the cached prefix is what the suffix attends to."""
    from dti_fast.textcache import DecoderPrefixCache

    tok, enc, emb, words = gemma
    ids, mask = _gemma_batch(tok, words, OBJECT_TEMPLATES[:2])
    cache = DecoderPrefixCache(enc, emb.first_id)
    with torch.no_grad():
        good = cache(ids, mask)
        for hidden, kv in cache._cache.values():
            kv[0][0].add_(1.0)  # the first layer's keys
        bad = cache(ids, mask)
    assert not torch.allclose(good, bad)

"""Exact prefix caches for text encoders during textual-inversion training.

:class:`PrefixCachedTextEncoder` serves CLIP text encoders (SD, SDXL; described below);
:class:`DecoderPrefixCache` serves a transformers causal decoder used as a text encoder
(SANA's Gemma-2) through the model's own forward and KV cache. A bidirectional encoder
(Wan's UMT5) cannot have one: every state depends on every token, learned ones included.

CLIP's text transformer (transformers' ``CLIPTextModel`` and
``CLIPTextModelWithProjection``) is causal and pre-norm: the hidden state at
position ``i`` of every layer depends only on the tokens at positions ``<= i``.
Training prompts look like ``"a photo of a <placeholder> ..."`` padded to 77
tokens, and only the placeholder ids (``>= first_learned_id``, the
:class:`~dti_fast.embedding.DirectionalEmbedding`'s ``first_id``) look up
learned rows. So every position before a sample's first placeholder (its
*prefix*) is a constant of the frozen encoder and the prefix token ids.

What is cached
    For every distinct prefix (keyed by the tuple of its token ids, plus the
    device, weight dtype and autocast state), computed once under
    ``torch.no_grad``: per layer the attention keys and values at the prefix
    positions (after ``k_proj``/``v_proj``, before attention), and the outputs
    the trainer reads at those positions (the final-normed last layer output
    for mode ``"last"``, the penultimate layer output for ``"penultimate"``,
    plus the final-normed last layer output where a pooled embedding may need
    it). A sample without any learned token is cached whole (its outputs only).

How it is used
    For a batch, ``P`` is the shortest prefix among the samples that have a
    learned token. The first ``P`` positions of each such sample come from its
    cached (possibly longer) prefix, sliced: by causality the first ``P``
    positions of a longer prefix are the same. Only positions ``P..T-1`` run
    through the layers, their queries attending to ``[cached prefix K/V ; own
    K/V]`` under a causal mask, with the HF model's own modules
    (``layer_norm1``, ``self_attn.{q,k,v,out}_proj``, ``layer_norm2``,
    ``mlp``, ``final_layer_norm``, ``embeddings.position_embedding``,
    ``text_projection``) and the attention scale/head count the attention
    module carries. Token embeddings of the suffix go through the encoder's
    input embedding module, so gradients reach the learned rows.

    Further exact savings: in mode ``"penultimate"`` (SDXL, ``hidden_states[-2]``)
    without a pooled output the last layer is skipped; with a pooled output
    (SDXL's ``text_encoder_2``) the last layer runs only for the query at the
    pooled (EOS) position, its keys/values over all positions coming from the
    penultimate output.

Why it is exact
    Causality makes the prefix states independent of everything after them,
    and the prefix ids never reach the learned rows, so cached values equal
    the ones a full forward computes (up to floating-point reassociation of
    differently shaped matmuls: ~1e-7 relative in fp32). Gradients with
    respect to the learned rows are unchanged: the prefix contributes no path
    to them.

When it is not used / caveats
    * ``P == 0`` (a learned token at position 0): nothing is cached; the same
      code path runs every position (still exact).
    * The encoder is in training mode with ``attention_dropout > 0``, or the
      text model's forward receives an attention mask or position ids: not
      supported here; use :meth:`PrefixCachedTextEncoder.uncached` (the plain
      HF forward), which :meth:`__call__` falls back to for the dropout case.
    * The cache assumes frozen encoder weights (everything but the learned rows
      of the input embedding). Call :meth:`PrefixCachedTextEncoder.clear` after
      changing them (loading other weights, LoRA on the text encoder, ...).
      Device, weight dtype and autocast state are part of the key, so entries
      computed in fp32 are never mixed into a bf16-autocast forward.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DecoderPrefixCache", "PrefixCachedTextEncoder", "TextEncoding"]

MODES = ("last", "penultimate")


class TextEncoding(NamedTuple):
    """What :class:`PrefixCachedTextEncoder` returns.

    ``hidden``: (B, T, D) as the trainer reads it: ``enc(ids)[0]`` (mode
    "last") or ``enc(ids, output_hidden_states=True).hidden_states[-2]``
    (mode "penultimate"). ``pooled``: (B, projection_dim) ``text_embeds`` of a
    ``CLIPTextModelWithProjection`` (``enc(ids)[0]``), or (B, D)
    ``pooler_output`` of a ``CLIPTextModel``; ``None`` unless asked for.
    """

    hidden: torch.Tensor
    pooled: torch.Tensor | None


@dataclass
class _Entry:
    """Cached constants of one prefix of length L (no grad, computation dtype)."""

    kv: torch.Tensor | None  # (n_kv_layers, 2, heads, L, head_dim); None for whole-sample entries
    hidden: torch.Tensor  # (L, D): the output the mode asks for
    normed_last: torch.Tensor | None  # (L, D): final-normed last layer output, where pooled needs it
    nbytes: int


class PrefixCachedTextEncoder:
    """Wraps one CLIP text encoder; computes its training outputs reusing cached prompt prefixes.

    Args:
        encoder: a transformers ``CLIPTextModel`` or ``CLIPTextModelWithProjection``
            (eval mode, frozen weights; its input embedding typically a
            :class:`~dti_fast.embedding.DirectionalEmbedding`).
        mode: ``"last"`` (SD 1.x/2.x: ``enc(ids)[0]``, after ``final_layer_norm``)
            or ``"penultimate"`` (SDXL: ``hidden_states[-2]``, no final norm).
        pooled: also return the pooled embedding (SDXL's ``text_encoder_2``).
        first_learned_id: ids ``>=`` this are learned; default: the input
            embedding's ``first_id``, read at each call. If neither exists (and
            the input embedding is frozen) every sample is cached whole.
        max_entries, max_bytes: bounds of the LRU cache (entries are evicted,
            least recently used first, when either is exceeded).

    Call with input ids (B, T) (any device; they are read on the CPU to build
    cache keys, one host sync per call); returns a :class:`TextEncoding`.
    ``hits``/``misses``/``evictions`` count per-sample prefix look-ups.
    """

    def __init__(
        self,
        encoder: nn.Module,
        mode: str = "last",
        pooled: bool = False,
        first_learned_id: int | None = None,
        max_entries: int = 2048,
        max_bytes: int = 1 << 30,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.encoder = encoder
        self.core = getattr(encoder, "text_model", encoder)  # CLIPTextModelWithProjection (and 4.x CLIPTextModel)
        for name in ("embeddings", "encoder", "final_layer_norm"):
            if not hasattr(self.core, name):
                raise TypeError(f"{type(encoder).__name__} does not look like a CLIP text model (no .{name})")
        self.layers = list(self.core.encoder.layers)
        if not self.layers:
            raise ValueError("the text encoder has no layers")
        self.text_projection = getattr(encoder, "text_projection", None)
        self.mode = mode
        self.pooled = bool(pooled)
        self._first_learned_id = first_learned_id
        attn = self.layers[0].self_attn
        self.heads = int(attn.num_heads)
        self.head_dim = int(attn.head_dim)
        self.scale = float(attn.scale)
        # Layers whose K/V a suffix pass needs: all but the last when "penultimate" skips it.
        self.n_kv_layers = len(self.layers) if (mode == "last" or self.pooled) else len(self.layers) - 1
        self.max_entries = int(max_entries)
        self.max_bytes = int(max_bytes)
        self._cache: OrderedDict[tuple, _Entry] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def first_learned_id(self) -> int | None:
        """Ids ``>=`` this are learned: the constructor's value, else the input embedding's ``first_id`` now."""
        if self._first_learned_id is not None:
            return int(self._first_learned_id)
        first = getattr(self.core.embeddings.token_embedding, "first_id", None)
        return None if first is None else int(first)

    # -- cache bookkeeping ------------------------------------------------------------

    def clear(self) -> None:
        """Drop every cached prefix (needed after changing the frozen encoder weights)."""
        self._cache.clear()
        self._bytes = 0

    def stats(self) -> dict:
        """Counters: hits, misses, evictions, entries, bytes."""
        return {
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "entries": len(self._cache),
            "bytes": self._bytes,
        }

    def _context_key(self, device: torch.device) -> tuple:
        dev = device.type
        autocast = torch.is_autocast_enabled(dev)
        return (
            str(device),
            self.core.final_layer_norm.weight.dtype,
            autocast,
            torch.get_autocast_dtype(dev) if autocast else None,
        )

    def _lookup(self, key: tuple, ids: torch.Tensor, whole: bool) -> _Entry:
        entry = self._cache.get(key)
        if entry is not None:
            self._cache.move_to_end(key)
            self.hits += 1
            return entry
        self.misses += 1
        entry = self._compute_entry(ids, whole)
        self._cache[key] = entry
        self._bytes += entry.nbytes
        while len(self._cache) > 1 and (len(self._cache) > self.max_entries or self._bytes > self.max_bytes):
            _, old = self._cache.popitem(last=False)
            self._bytes -= old.nbytes
            self.evictions += 1
        return entry

    # -- model pieces -------------------------------------------------------------------

    def _embed(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Token + position embeddings of ``ids`` (B, S) standing at positions start..start+S-1."""
        emb = self.core.embeddings
        pos = torch.arange(start, start + ids.shape[1], device=ids.device)
        return emb.token_embedding(ids) + emb.position_embedding(pos).unsqueeze(0)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, s, _ = t.shape
        return t.view(b, s, self.heads, self.head_dim).transpose(1, 2)

    def _mlp_block(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x + layer.mlp(layer.layer_norm2(x))

    def _attend(
        self, layer: nn.Module, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Residual attention output for queries q (B, H, S, d) and the layer input x (B, S, D)."""
        o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=self.scale)
        b, _, s, _ = o.shape
        return x + layer.self_attn.out_proj(o.transpose(1, 2).reshape(b, s, -1))

    def _run(
        self, x: torch.Tensor, start: int, past: torch.Tensor | None, n_layers: int, collect_kv: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
        """Run positions start..start+S-1 (x: (B, S, D)) through the first ``n_layers`` layers.

        ``past``: (B, n_kv_layers, 2, H, start, d) keys/values of positions 0..start-1 (None if start == 0).
        Returns the output, the per-layer (2, B, H, S, d) K/V if ``collect_kv``, and the
        penultimate layer's output if it was passed.
        """
        s = x.shape[1]
        q_pos = torch.arange(start, start + s, device=x.device)
        k_pos = torch.arange(start + s, device=x.device)
        mask = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)  # (S, start + S): causal, bottom-right aligned
        kvs: list[torch.Tensor] = []
        penultimate = x if len(self.layers) == 1 else None
        for i, layer in enumerate(self.layers[:n_layers]):
            attn = layer.self_attn
            h = layer.layer_norm1(x)
            q, k, v = self._heads(attn.q_proj(h)), self._heads(attn.k_proj(h)), self._heads(attn.v_proj(h))
            if collect_kv:
                kvs.append(torch.stack([k, v]))
            if past is not None and start > 0:
                k = torch.cat([past[:, i, 0].to(k.dtype), k], dim=2)
                v = torch.cat([past[:, i, 1].to(v.dtype), v], dim=2)
            x = self._mlp_block(layer, self._attend(layer, x, q, k, v, mask))
            if i == len(self.layers) - 2:
                penultimate = x
        return x, kvs, penultimate

    def _eos_positions(self, ids_cpu: torch.Tensor) -> torch.Tensor:
        """The pooled position of each sample, by transformers' rule (read at call time)."""
        eos = getattr(self.core, "eos_token_id", None)
        if eos is None:
            eos = self.core.config.eos_token_id
        ids = ids_cpu.to(dtype=torch.int)
        if eos == 2:
            # transformers' legacy rule: the largest id (added tokens win over the real EOS).
            return ids.argmax(dim=-1)
        return (ids == eos).int().argmax(dim=-1)

    def _project(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.text_projection(pooled) if self.text_projection is not None else pooled

    @torch.no_grad()
    def _compute_entry(self, ids: torch.Tensor, whole: bool) -> _Entry:
        """Cache entry of one prefix ``ids`` (L,) on the encoder's device."""
        x = self._embed(ids.unsqueeze(0), 0)
        want_normed = self.mode == "last" or self.pooled
        n_layers = len(self.layers) if want_normed else len(self.layers) - 1
        out, kvs, pen = self._run(x, 0, None, n_layers, collect_kv=not whole)
        normed = self.core.final_layer_norm(out)[0] if want_normed else None
        hidden = normed if self.mode == "last" else (out[0] if n_layers < len(self.layers) else pen[0])
        kv = None
        if not whole:
            kv = torch.stack(kvs[: self.n_kv_layers])[:, :, 0].contiguous()  # (n_kv, 2, H, L, d)
        normed_last = normed if (self.mode == "penultimate" and self.pooled) else None
        hidden = hidden.contiguous()
        nbytes = sum(t.numel() * t.element_size() for t in (kv, hidden, normed_last) if t is not None)
        return _Entry(kv=kv, hidden=hidden, normed_last=normed_last, nbytes=nbytes)

    # -- the forward ----------------------------------------------------------------------

    def uncached(self, input_ids: torch.Tensor) -> TextEncoding:
        """The plain HF forward (what the trainer computes without the cache)."""
        ids = input_ids.to(self.core.embeddings.position_embedding.weight.device)
        out = self.encoder(ids, output_hidden_states=self.mode == "penultimate")
        hidden = out.hidden_states[-2] if self.mode == "penultimate" else out.last_hidden_state
        pooled = None
        if self.pooled:
            # enc(ids)[0]: text_embeds with a projection, else (CLIPTextModel) last_hidden_state; pooler_output then.
            pooled = out.text_embeds if self.text_projection is not None else out.pooler_output
        return TextEncoding(hidden, pooled)

    def __call__(self, input_ids: torch.Tensor) -> TextEncoding:
        """Encode ``input_ids`` (B, T); equal to :meth:`uncached` up to fp rounding, with the same gradients."""
        if self.encoder.training and float(getattr(self.core.config, "attention_dropout", 0.0) or 0.0) > 0:
            return self.uncached(input_ids)
        device = self.core.embeddings.position_embedding.weight.device
        ids_cpu = input_ids.detach().to("cpu", torch.long)
        if ids_cpu.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(ids_cpu.shape)}")
        ids = input_ids.to(device, torch.long)
        b, t = ids_cpu.shape
        ctx = self._context_key(device)
        first = self.first_learned_id
        if first is None and any(prm.requires_grad for prm in self.core.embeddings.token_embedding.parameters()):
            raise ValueError(
                "the input embedding is trainable but has no first_id; pass first_learned_id (ids >= it are learned)"
            )
        if first is None:
            plen = [t] * b
        else:
            learned = ids_cpu >= first
            any_learned = learned.any(dim=1)
            first_pos = learned.int().argmax(dim=1)
            plen = [int(p) if a else t for p, a in zip(first_pos.tolist(), any_learned.tolist())]
        rows = ids_cpu.tolist()
        whole = [i for i in range(b) if plen[i] >= t]
        part = [i for i in range(b) if plen[i] < t]
        eos_pos = self._eos_positions(ids_cpu).tolist() if self.pooled else None

        full: torch.Tensor | None = None
        pooled_part: torch.Tensor | None = None
        hidden_rows: list[torch.Tensor | None] = [None] * b
        pooled_rows: list[torch.Tensor | None] = [None] * b

        for i in whole:
            e = self._lookup(ctx + (tuple(rows[i]),), ids[i], whole=True)
            hidden_rows[i] = e.hidden
            if self.pooled:
                src = e.hidden if self.mode == "last" else e.normed_last
                pooled_rows[i] = src[eos_pos[i]]

        if part:
            p = min(plen[i] for i in part)
            entries = [
                self._lookup(ctx + (tuple(rows[i][: plen[i]]),), ids[i, : plen[i]], whole=False) if p > 0 else None
                for i in part
            ]
            sub = ids[part]
            x = self._embed(sub[:, p:], p)
            past = torch.stack([e.kv[:, :, :, :p] for e in entries]) if p > 0 else None
            n_layers = len(self.layers) if self.mode == "last" else len(self.layers) - 1
            out, _, _ = self._run(x, p, past, n_layers, collect_kv=False)
            if self.mode == "last":
                out = self.core.final_layer_norm(out)
            if p > 0:
                prefix_hidden = torch.stack([e.hidden[:p] for e in entries])
                full = torch.cat([prefix_hidden.to(out.dtype), out], dim=1)
            else:
                full = out
            if self.pooled:
                q = torch.tensor([eos_pos[i] for i in part], device=device)
                if self.mode == "last":
                    pooled_part = full[torch.arange(len(part), device=device), q]
                else:
                    pooled_part = self._last_layer_at(out, p, past, q, [eos_pos[i] for i in part], entries)
            for j, i in enumerate(part):
                hidden_rows[i] = full[j]
                if pooled_part is not None:
                    pooled_rows[i] = pooled_part[j]

        if not part:
            hidden = torch.stack(hidden_rows)
        elif not whole:
            hidden = full
        else:
            dtype = full.dtype
            hidden = torch.stack([h.to(dtype) for h in hidden_rows])
        pooled = None
        if self.pooled:
            if part and not whole:
                pooled = pooled_part
            else:
                dtype = pooled_part.dtype if pooled_part is not None else pooled_rows[0].dtype
                pooled = torch.stack([r.to(dtype) for r in pooled_rows])
            pooled = self._project(pooled)
        return TextEncoding(hidden, pooled)

    def _last_layer_at(
        self, pen: torch.Tensor, p: int, past: torch.Tensor | None, q: torch.Tensor, q_list: list[int], entries: list
    ) -> torch.Tensor:
        """Final-normed last layer output at the pooled positions ``q`` (B,), from the penultimate output.

        ``pen``: (B, S, D) penultimate output at positions p..T-1 (``q_list``: ``q`` on the host).
        Keys/values span all positions (prefix from the cache); the query is the pooled position
        only. A pooled position inside the prefix is read from the cache instead.
        """
        layer = self.layers[-1]
        attn = layer.self_attn
        nb, s, _ = pen.shape
        h = layer.layer_norm1(pen)
        k, v = self._heads(attn.k_proj(h)), self._heads(attn.v_proj(h))
        if past is not None and p > 0:
            k = torch.cat([past[:, -1, 0].to(k.dtype), k], dim=2)
            v = torch.cat([past[:, -1, 1].to(v.dtype), v], dim=2)
        rel = (q - p).clamp(min=0, max=s - 1)
        batch = torch.arange(nb, device=pen.device)
        xq = pen[batch, rel].unsqueeze(1)  # (B, 1, D)
        qh = self._heads(attn.q_proj(h[batch, rel].unsqueeze(1)))
        mask = torch.arange(p + s, device=pen.device).unsqueeze(0) <= q.clamp(min=p).unsqueeze(1)  # (B, p+S)
        y = self._mlp_block(layer, self._attend(layer, xq, qh, k, v, mask[:, None, None, :]))
        y = self.core.final_layer_norm(y)[:, 0]
        if p > 0 and any(qi < p for qi in q_list):
            cached = torch.stack([e.normed_last[min(qi, p - 1)] for e, qi in zip(entries, q_list)]).to(y.dtype)
            inside = (q < p).unsqueeze(1)
            y = torch.where(inside, cached, y)
        return y


# --------------------------------------------------------------------------------------------
# Causal decoders used as text encoders (SANA's Gemma-2)
# --------------------------------------------------------------------------------------------


class DecoderPrefixCache:
    """An exact prefix cache for a transformers causal decoder used as a text encoder (SANA's Gemma-2).

    The states of a causal decoder at the positions before a prompt's first learned token
    depend on those tokens only. For every distinct prefix (keyed by its token ids, plus
    device, weight dtype and autocast state) the decoder runs once, under ``no_grad``, and
    the cache keeps its final-normed outputs there and every layer's keys and values. A
    batch with shortest prefix ``P`` then runs only positions ``P..n-1``, through the
    model's own forward with its own cache object (transformers' ``DynamicCache``, one
    full-length layer per decoder layer), the full attention mask and the true positions:
    the model's own attention code applies the causal, padding and sliding-window masks
    (Gemma-2's local layers) and the logit soft-capping, so the result equals the uncached
    forward (``tests/test_textcache.py`` checks it with a window shorter than the prompt).

    Samples must be right-padded (every learned token before the padding). Falls back to the
    plain forward when the encoder is in training mode (gradient checkpointing turns
    transformers' cache off) or when a learned token sits at position 0.
    """

    def __init__(self, encoder: nn.Module, first_learned_id: int, max_entries: int = 2048) -> None:
        import inspect

        self.encoder = encoder
        self.first_learned_id = int(first_learned_id)
        self.max_entries = int(max_entries)
        params = inspect.signature(encoder.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._cache: OrderedDict[tuple, tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        """Drop every cached prefix (needed after changing the frozen encoder weights)."""
        self._cache.clear()

    def uncached(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The plain forward: final-normed last hidden states (B, n, D)."""
        return self.encoder(ids, attention_mask=mask, use_cache=False).last_hidden_state

    def _context(self, device: torch.device) -> tuple:
        autocast = torch.is_autocast_enabled(device.type)
        weight = self.encoder.get_input_embeddings().weight
        return (str(device), weight.dtype, autocast, torch.get_autocast_dtype(device.type) if autocast else None)

    @torch.no_grad()
    def _entry(self, key: tuple, ids: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            self.hits += 1
            return hit
        from transformers import DynamicCache

        self.misses += 1
        cache = DynamicCache()
        ones = torch.ones_like(ids).unsqueeze(0)
        out = self.encoder(ids.unsqueeze(0), attention_mask=ones, use_cache=True, **{self._cache_kw: cache})
        entry = (out.last_hidden_state[0], [(layer.keys[0], layer.values[0]) for layer in cache.layers])
        self._cache[key] = entry
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return entry

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The decoder's final-normed states (B, n, D) of right-padded ``ids`` with attention ``mask``."""
        if self.encoder.training:
            return self.uncached(ids, mask)
        from transformers import DynamicCache

        ids_cpu = ids.detach().to("cpu", torch.long)
        b, n = ids_cpu.shape
        learned = ids_cpu >= self.first_learned_id
        real = mask.detach().to("cpu").sum(dim=1).tolist()
        # A prefix ends at the first learned token, and never reaches into the padding.
        plen = [min(int(row.int().argmax()) if bool(row.any()) else n, int(r)) for row, r in zip(learned, real)]
        p = min(plen)
        if p == 0:
            return self.uncached(ids, mask)
        ctx = self._context(ids.device)
        rows = ids_cpu.tolist()
        entries = [self._entry(ctx + (tuple(rows[i][: plen[i]]),), ids[i, : plen[i]]) for i in range(b)]
        if p == n:  # no learned token anywhere: every sample whole from the cache
            return torch.stack([e[0][:n] for e in entries])
        cache = DynamicCache()
        for layer, _ in enumerate(entries[0][1]):
            keys = torch.stack([e[1][layer][0][:, :p] for e in entries])
            values = torch.stack([e[1][layer][1][:, :p] for e in entries])
            cache.update(keys, values, layer)
        pos = torch.arange(p, n, device=ids.device)
        out = self.encoder(
            input_ids=ids[:, p:],
            attention_mask=mask,
            position_ids=pos.unsqueeze(0).expand(b, -1),
            cache_position=pos,
            use_cache=True,
            **{self._cache_kw: cache},
        ).last_hidden_state
        prefix = torch.stack([e[0][:p] for e in entries]).to(out.dtype)
        return torch.cat([prefix, out], dim=1)

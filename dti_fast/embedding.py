"""Learned token embeddings on top of a frozen vocabulary.

:class:`DirectionalEmbedding` replaces a text encoder's input embedding. Ids of
the original vocabulary look up the frozen table; each added id returns
``m* * v`` (DTI) or a free vector ``e`` (plain TI) for its row. Every concept's
rows are one small parameter of shape (n_vectors, dim), so the optimizer sees
only the learned rows (no state for the ~49k frozen ones), each concept keeps
its own step count, and concepts absent from a batch are skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .sphere import norm_scale, project_to_sphere

__all__ = [
    "CONTEXTUAL_STATES",
    "ConceptTokens",
    "DirectionalEmbedding",
    "INIT_MODES",
    "add_concept_tokens",
    "clip_contextual_states",
    "contextual_states",
    "initial_rows",
    "initializer_ids",
    "install_embedding",
    "register_contextual_states",
]

#: Start modes of the learned rows (``--init``).
INIT_MODES = ("token", "random", "mean", "xinit")


@dataclass
class ConceptTokens:
    """The tokens of one concept in one tokenizer: placeholder strings and their ids."""

    tokens: list[str]
    ids: list[int]
    init_ids: list[int]

    @property
    def prompt_string(self) -> str:
        """What stands for the concept in a prompt: its tokens joined by spaces."""
        return " ".join(self.tokens)


def initializer_ids(tokenizer, words: str, concept: str = "?") -> list[int]:
    """Token ids of the initializer word(s): its pieces, without special tokens.

    Special pieces (unknown, padding, BOS/EOS, written out or produced by the tokenizer) and
    pieces that are only a word boundary (a lone ``"▁"`` of Gemma/T5 tokenizers) are not
    words and are left out; an initializer with nothing else is refused.
    """
    ids = tokenizer(words, add_special_tokens=False)["input_ids"]
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    kept = [i for i in ids if i not in special and tokenizer.convert_ids_to_tokens(i).replace("▁", "").strip()]
    if not kept:
        raise ValueError(
            f"concept {concept!r}: initializer {words!r} tokenizes to nothing this model's tokenizer knows "
            f"(pieces: {tokenizer.convert_ids_to_tokens(ids) if ids else 'none'}); use ordinary word(s) such as "
            "the class noun"
        )
    return kept


def add_concept_tokens(tokenizer, placeholder: str, n_vectors: int, concept: str = "?") -> ConceptTokens:
    """Add ``placeholder``, ``placeholder_1``, ... to ``tokenizer``; refuse tokens it already has."""
    tokens = [placeholder] + [f"{placeholder}_{i}" for i in range(1, n_vectors)]
    vocab = tokenizer.get_vocab()
    for tok in tokens:
        # In the vocabulary either literally (an added token) or as one ordinary
        # word piece ("dog" is "dog</w>" in CLIP's BPE table).
        if tok in vocab or len(tokenizer(tok, add_special_tokens=False)["input_ids"]) == 1:
            raise ValueError(
                f"concept {concept!r}: placeholder token {tok!r} is already in the tokenizer's vocabulary; "
                "choose another placeholder (e.g. '<my-concept>')"
            )
    added = tokenizer.add_tokens(tokens)
    if added != len(tokens):
        raise ValueError(f"concept {concept!r}: could not add placeholder tokens {tokens} to the tokenizer")
    ids = tokenizer.convert_tokens_to_ids(tokens)
    for tok, i in zip(tokens, ids):
        # A placeholder must stay one token when it is written in a prompt.
        if tokenizer(tok, add_special_tokens=False)["input_ids"] != [i]:
            raise ValueError(f"concept {concept!r}: placeholder {tok!r} does not tokenize as one token; pick another")
    return ConceptTokens(tokens=tokens, ids=list(ids), init_ids=[])


class DirectionalEmbedding(nn.Module):
    """A frozen vocabulary plus learned rows for added token ids.

    Args:
        base: the encoder's original input embedding (kept frozen).
        first_id: the id of the first added token (the tokenizer's length
            before placeholders were added).
        scale: ``m*``: a statistic name ("mean", "min", "max") of the
            vocabulary's row norms, or a float. ``None`` means plain TI: rows
            are free vectors used as they are.

    An embedding that scales its output (Gemma's ``embed_scale`` = sqrt(hidden size)) keeps
    doing so for every id: ``m*`` is the norm of the raw table rows, before that factor,
    and the learned rows get the same factor as the vocabulary's.
    """

    def __init__(self, base: nn.Embedding, first_id: int, scale: str | float | None = "mean") -> None:
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.first_id = int(first_id)
        self.spherical = scale is not None
        self.scale = norm_scale(base.weight, scale) if scale is not None else 1.0
        # Gemma's embedding multiplies its rows by sqrt(hidden) inside forward(): m* and the learned
        # rows live before that factor (like the table's rows), and the factor applies to both.
        self.output_scale = getattr(base, "embed_scale", None)
        self.rows = nn.ParameterList()
        self.priors: list[torch.Tensor] = []
        self.row_ids: list[list[int]] = []

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    @property
    def weight(self) -> torch.Tensor:
        # transformers reads .weight of the input embedding in a few places (dtype/device).
        return self.base.weight

    def add_concept(self, token_ids: Sequence[int], init: torch.Tensor, prior: torch.Tensor) -> int:
        """Register the rows of one concept; returns its index.

        ``init`` is the start (DTI: normalized here; TI: used as is), ``prior``
        the vMF mean (normalized here). Both are (n_vectors, dim).
        """
        expected = self.first_id + sum(len(ids) for ids in self.row_ids)
        if list(token_ids) != list(range(expected, expected + len(token_ids))):
            raise ValueError(
                f"token ids {list(token_ids)} must continue the added ids at {expected}; add concepts in "
                "tokenizer order"
            )
        init = init.detach().float().to(self.base.weight.device)
        if self.spherical:
            init = project_to_sphere(init, "initial direction")
        self.rows.append(nn.Parameter(init.clone().contiguous()))
        self.priors.append(project_to_sphere(prior.detach().float(), "vMF prior").to(init.device).contiguous())
        self.row_ids.append(list(token_ids))
        return len(self.rows) - 1

    def vectors(self, index: int) -> torch.Tensor:
        """The embedding vectors of concept ``index`` as used in the forward (m* v or e), fp32."""
        return (self.rows[index] * self.scale).detach().clone()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids.clamp(max=self.first_id - 1))
        if len(self.rows) == 0:
            return out
        table = torch.cat(list(self.rows)) if len(self.rows) > 1 else self.rows[0]
        added = input_ids - self.first_id
        is_added = (added >= 0) & (added < table.shape[0])
        learned = F.embedding(added.clamp(min=0, max=table.shape[0] - 1), table)
        if self.spherical:
            learned = learned * self.scale
        if self.output_scale is not None:
            learned = learned * self.output_scale.to(learned.dtype)
        return torch.where(is_added.unsqueeze(-1), learned.to(out.dtype), out)


def install_embedding(
    text_encoder: nn.Module, tokenizer_len_before: int, scale: str | float | None
) -> DirectionalEmbedding:
    """Swap ``text_encoder``'s input embedding for a :class:`DirectionalEmbedding`; returns it."""
    base = text_encoder.get_input_embeddings()
    if isinstance(base, DirectionalEmbedding):
        raise ValueError("this text encoder already has a DirectionalEmbedding installed")
    if not isinstance(base, nn.Embedding):
        raise TypeError(f"the text encoder's input embedding is a {type(base).__name__}, expected nn.Embedding")
    if tokenizer_len_before > base.num_embeddings:
        raise ValueError(
            f"the tokenizer has {tokenizer_len_before} tokens but the text encoder's table only "
            f"{base.num_embeddings} rows: tokenizer and text encoder do not belong together"
        )
    emb = DirectionalEmbedding(base, first_id=tokenizer_len_before, scale=scale)
    text_encoder.set_input_embeddings(emb)
    return emb


def mean_direction(base: nn.Embedding) -> torch.Tensor:
    """The normalized mean of the vocabulary rows (the "mean" initialization)."""
    return project_to_sphere(base.weight.detach().float().mean(0, keepdim=True), "vocabulary mean")[0]


def start_rows(
    base: nn.Embedding, init_ids: Sequence[int], mode: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Starting rows for one concept: "token" (initializer embedding), "random" or "mean"."""
    n = len(init_ids)
    weight = base.weight.detach().float()
    if mode == "token":
        return weight[list(init_ids)].clone()
    if mode == "random":
        return torch.randn(n, weight.shape[1], generator=generator).to(weight.device)
    if mode == "mean":
        return mean_direction(base).expand(n, -1).clone()
    if mode == "xinit":
        raise ValueError("init mode 'xinit' needs the text encoder: use initial_rows(), not start_rows()")
    raise ValueError(f"init mode must be one of {', '.join(INIT_MODES)}, got {mode!r}")


# -- CrossInit ("xinit"): start from the text encoder's contextual output for the initializer ------------------

ContextualStates = Callable[[Any, nn.Module, str, Sequence[int]], torch.Tensor]
"""``fn(tokenizer, text_encoder, words, init_ids) -> (len(init_ids), hidden)``: the encoder's output hidden
states at the initializer's token positions, piece i in row i."""


@torch.no_grad()
def clip_contextual_states(tokenizer, text_encoder: nn.Module, words: str, init_ids: Sequence[int]) -> torch.Tensor:
    """CrossInit's start for a CLIP text encoder (SD's one, both of SDXL's): the LAST hidden state at the
    initializer's pieces.

    The initializer is encoded as a prompt alone, laid out as in training (``<bos> pieces <eos>`` padded to
    the tokenizer's window, with its attention mask), and the encoder's ``last_hidden_state`` (CLIP: after
    the final LayerNorm) is read at the pieces' positions 1..n. This is the authors' recipe
    (kunheek/dti ``src/dti/training/token_embedding_ops.py``, ``token_cross_init``: tokenize with
    ``padding="max_length"``, run the encoder with the attention mask, take ``last_hidden_state[0]`` at the
    positions of the content ids), also for SDXL, whose UNet is conditioned on the penultimate layer. CLIP's
    attention is causal, so the padding does not change these rows. Computed in the encoder's weight dtype,
    returned in fp32 on the encoder's device.
    """
    n = len(init_ids)
    enc = tokenizer(
        words, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    ids = enc.input_ids
    if ids[0, 1 : n + 1].tolist() != list(init_ids) or n + 2 > ids.shape[1]:
        raise ValueError(
            f"initializer {words!r}: its pieces {list(init_ids)} are not at positions 1..{n} of the encoded "
            "prompt (too long for the window?); use a shorter initializer"
        )
    device = next(text_encoder.parameters()).device
    out = text_encoder(input_ids=ids.to(device), attention_mask=enc.attention_mask.to(device))
    return out.last_hidden_state[0, 1 : n + 1].float()


#: One contextual-state function per text-encoder kind, keyed by the encoder config's ``model_type``
#: (``CLIPTextModel`` and ``CLIPTextModelWithProjection`` are both ``"clip_text_model"``).
CONTEXTUAL_STATES: dict[str, ContextualStates] = {"clip_text_model": clip_contextual_states}


def register_contextual_states(model_type: str, fn: ContextualStates) -> None:
    """Let ``--init xinit`` handle another text-encoder kind (``fn`` as :data:`ContextualStates`)."""
    CONTEXTUAL_STATES[model_type] = fn


def contextual_states(tokenizer, text_encoder: nn.Module, words: str, init_ids: Sequence[int]) -> torch.Tensor:
    """The text encoder's contextual output at the initializer's pieces ``(n, hidden)``, fp32, through the
    function registered for the encoder's kind; a clear error for a kind without one."""
    from . import families  # noqa: F401  (registers the SANA/Wan encoders' functions)

    kind = getattr(getattr(text_encoder, "config", None), "model_type", None)
    fn = CONTEXTUAL_STATES.get(kind)
    if fn is None:
        raise ValueError(
            f"--init xinit has no contextual-state function for a {type(text_encoder).__name__} "
            f"(model_type {kind!r}; known: {', '.join(sorted(CONTEXTUAL_STATES))}); use --init token"
        )
    states = fn(tokenizer, text_encoder, words, init_ids)
    width = text_encoder.get_input_embeddings().embedding_dim
    if tuple(states.shape) != (len(init_ids), width):
        raise ValueError(
            f"the contextual states of {words!r} have shape {tuple(states.shape)}, expected "
            f"({len(init_ids)}, {width}): the output width must be the input embedding's"
        )
    if not torch.isfinite(states).all():
        raise ValueError(f"the text encoder's output for initializer {words!r} is not finite")
    return states.detach().float()


def initial_rows(
    tokenizer,
    text_encoder: nn.Module,
    base: nn.Embedding,
    words: str,
    init_ids: Sequence[int],
    mode: str,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One concept's ``(start, prior)`` rows for one encoder, both ``(n, dim)`` fp32 and unnormalized.

    ``start``: :func:`start_rows` for "token", "random" and "mean"; for "xinit" (CrossInit) the contextual
    states of :func:`contextual_states`. A spherical (DTI) embedding keeps the start's direction at ``m*``;
    plain TI uses it as it is, at the output's own norm (CrossInit's recipe).
    ``prior`` (the vMF mean, normalized by :meth:`DirectionalEmbedding.add_concept`): the initializer's
    embedding, and for "xinit" the same contextual direction as the start (the authors' code normalizes the
    start rows into the prior in both cases).
    """
    if mode == "xinit":
        states = contextual_states(tokenizer, text_encoder, words, init_ids).to(base.weight.device)
        return states, states.clone()
    start = start_rows(base, init_ids, mode, generator)
    return start, base.weight.detach().float()[list(init_ids)]

"""A CLIP BPE tokenizer whose vocabulary is exactly the toy world's words.

Every word is one token: ``vocab.json`` holds the two specials, each word as ``word</w>`` and
the partial pieces BPE needs to build them;
``merges.txt`` holds, for each word, the merges that join the pieces it splits into under the
merges added before it (so adding a word never changes how an earlier word tokenizes). The
partial pieces never appear in a tokenized world text; their embedding rows are exactly zero
and get no gradient, so they stay zero, and ``m*`` (the mean norm of the non-zero rows)
measures only rows that every-day training captions use: every word of the vocabulary
appears in the base model's captions. ``m*`` measures the trained vocabulary, not its
random initialization.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..data import OBJECT_TEMPLATES, STYLE_TEMPLATES

if TYPE_CHECKING:  # pragma: no cover
    from transformers import CLIPTokenizer

from .render import BG_COLOURS, COLOUR_NAMES, COUNT_WORDS, PLURALS, POSITIONS, SHAPES, SIZES, TEXTURES

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 32


def world_words() -> list[str]:
    """All words of the caption grammar and of the trainer's prompt templates, sorted, unique."""
    import re

    words: set[str] = set()
    grammar = ["a", "at", "the", "in", "on", "and", "background", "of", "style"]
    grammar += list(SHAPES) + list(PLURALS.values()) + list(COLOUR_NAMES) + list(BG_COLOURS)
    grammar += [t for t in TEXTURES if t != "plain"] + list(SIZES) + list(COUNT_WORDS.values())
    for p in POSITIONS:
        grammar += p.split()
    words.update(grammar)
    for t in OBJECT_TEMPLATES + STYLE_TEMPLATES:  # CLIP's pre-tokenizer splits "close-up" into close, -, up
        words.update(re.findall(r"[a-z]+|[^\sa-z]", t.replace("{}", " ").lower()))
    return sorted(words)


def _bpe(word: str, ranks: dict) -> list[str]:
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        a, b = parts[i], parts[i + 1]
        merged, j = [], 0
        while j < len(parts):
            if j < len(parts) - 1 and parts[j] == a and parts[j + 1] == b:
                merged.append(a + b)
                j += 2
            else:
                merged.append(parts[j])
                j += 1
        parts = merged
    return parts


def build_bpe(words: list[str]) -> tuple[dict, list[tuple[str, str]]]:
    """(vocab, merges) with every word a single token."""
    merges: list[tuple[str, str]] = []
    ranks: dict = {}
    for w in words:
        parts = _bpe(w, ranks)
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            if pair not in ranks:
                ranks[pair] = len(merges)
                merges.append(pair)
            parts = _bpe(w, ranks)
            if len(parts) > 1 and (parts[0], parts[1]) in ranks and ranks[(parts[0], parts[1])] < len(merges) - 1:
                raise RuntimeError(f"BPE merges for {w!r} conflict: {parts}")
    vocab = {BOS: 0, EOS: 1}
    for w in words:
        vocab[w + "</w>"] = len(vocab)
    # The BPE model needs every piece a merge reads or writes in the vocabulary. These pieces
    # never survive tokenization of a world word; their rows are set to exactly zero in the
    # text encoder and, receiving no gradient, stay zero (m* excludes zero rows).
    for w in words:
        for c in list(w[:-1]) + [w[-1] + "</w>"]:
            vocab.setdefault(c, len(vocab))
    for a, b in merges:
        for piece in (a, b, a + b):
            vocab.setdefault(piece, len(vocab))
    return vocab, merges


def word_ids(vocab: dict) -> list[int]:
    """Ids of the rows that training uses: the specials and the whole words."""
    words = set(world_words())
    return [i for t, i in vocab.items() if t in (BOS, EOS) or (t.endswith("</w>") and t[:-4] in words)]


def write_tokenizer(folder: Path) -> CLIPTokenizer:
    """Write vocab.json, merges.txt and the tokenizer config to ``folder``; return the loaded tokenizer."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_bpe(world_words())
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0) + "\n", encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    tok = CLIPTokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        unk_token=EOS,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=MAX_LENGTH,
    )
    tok.save_pretrained(str(folder))
    tok = CLIPTokenizer.from_pretrained(str(folder))
    check_tokenizer(tok)
    return tok


def check_tokenizer(tok) -> None:
    """Every world word is exactly one id, and no word maps to the unknown token."""
    for w in world_words():
        ids = tok(w, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == tok.convert_tokens_to_ids(EOS):
            raise RuntimeError(f"world word {w!r} tokenizes to {ids}, expected one known id")

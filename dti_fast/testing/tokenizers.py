"""Real tokenizer files of the Gemma and T5 kinds, built here (no hub download) for the tiny models.

The tiny SANA and Wan models need tokenizers that load the way the real ones do
(``AutoTokenizer.from_pretrained`` on a ``tokenizer/`` folder with ``tokenizer.json``),
that split text into sub-word pieces as theirs do, and whose vocabulary is small
enough for a tiny embedding table:

- :func:`gemma_tokenizer_json`: Gemma's kind: a byte-fallback BPE over text whose
  spaces the normalizer turns into ``"▁"`` (no pre-tokenizer), ``<bos>`` prepended,
  ids 0-3 ``<pad> <eos> <bos> <unk>``, then the 256 ``<0xNN>`` byte pieces.
- :func:`t5_tokenizer_json`: T5/UMT5's kind: a unigram model behind a ``Metaspace``
  pre-tokenizer, ``</s>`` appended, ids 0-2 ``<pad> </s> <unk>``.

transformers 5's ``GemmaTokenizer`` / ``T5Tokenizer`` classes install their own
normalizer and pre-tokenizer over the file's (as they do for the real models' files),
so what the files specify beyond the vocabulary, merges and specials matters little.

Both are trained with the ``tokenizers`` library on English words taken from the
shipped CLIP vocabulary (:data:`~dti_fast.testing.tiny.CLIP_TOKENIZER_DIR`), more
frequent words weighted more, plus the project's prompt templates, so "dog", "photo"
or "backpack" are single pieces and rare words split. Training is deterministic.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

__all__ = ["gemma_tokenizer_json", "t5_tokenizer_json", "training_words", "write_tokenizer_folder"]

GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")
T5_SPECIALS = ("<pad>", "</s>", "<unk>")


def training_words() -> list[str]:
    """Words (with repeats by frequency rank) and template sentences the tiny tokenizers learn from."""
    from ..data import OBJECT_TEMPLATES, STYLE_TEMPLATES
    from .tiny import clip_tokenizer_files

    vocab_file, _ = clip_tokenizer_files()
    vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    words = [w[:-4] for w, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if w.endswith("</w>")]
    words = [w for w in words if re.fullmatch(r"[a-z]{2,}", w)]
    corpus: list[str] = []
    for rank, w in enumerate(words[:12000]):
        corpus.extend([w] * max(1, 8 - rank // 500))
    for t in (*OBJECT_TEMPLATES, *STYLE_TEMPLATES):
        corpus.extend([t.format("dog"), t.format("red backpack")] * 4)
    return corpus


def gemma_tokenizer_json(vocab_size: int = 3000) -> str:
    """A Gemma-kind ``tokenizer.json`` (byte-fallback BPE, ``▁`` for spaces, ``<bos>`` first) as text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    # Train on words split at spaces (so no piece spans two words), then ship Gemma's pipeline:
    # the normalizer alone turns spaces into "▁" and the BPE runs over the whole text.
    probe = Tokenizer(models.BPE(unk_token="<unk>"))
    probe.normalizer = normalizers.Replace(" ", "▁")
    probe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    n_fixed = len(GEMMA_SPECIALS) + 256
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - n_fixed, show_progress=False, special_tokens=[])
    probe.train_from_iterator([" " + w for w in training_words()], trainer=trainer)
    learned = json.loads(probe.to_str())["model"]
    pieces = sorted(learned["vocab"].items(), key=lambda kv: kv[1])
    vocab = {tok: i for i, tok in enumerate(GEMMA_SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in pieces:
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(list(GEMMA_SPECIALS))
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return tok.to_str()


def t5_tokenizer_json(vocab_size: int = 3000) -> str:
    """A T5/UMT5-kind ``tokenizer.json`` (unigram, ``Metaspace``, ``</s>`` last) as text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=list(T5_SPECIALS), unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(training_words(), trainer=trainer)
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)]
    )
    return tok.to_str()


def write_tokenizer_folder(folder: Path, kind: str, model_max_length: int) -> Path:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` of ``kind``.

    ``kind``: "gemma" (``GemmaTokenizer``, right padding with ``<pad>``) or "t5"
    (``T5Tokenizer``, no extra ids). ``AutoTokenizer.from_pretrained(folder)`` loads it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "gemma":
        text = gemma_tokenizer_json()
        config = {
            "tokenizer_class": "GemmaTokenizer",
            "bos_token": "<bos>",
            "eos_token": "<eos>",
            "unk_token": "<unk>",
            "pad_token": "<pad>",
            "add_bos_token": True,
            "add_eos_token": False,
            "padding_side": "right",
            "model_max_length": model_max_length,
        }
        special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    elif kind == "t5":
        text = t5_tokenizer_json()
        config = {
            "tokenizer_class": "T5Tokenizer",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": "<pad>",
            "extra_ids": 0,
            "additional_special_tokens": [],
            "padding_side": "right",
            "model_max_length": model_max_length,
        }
        special = {k: config[k] for k in ("eos_token", "unk_token", "pad_token")}
    else:
        raise ValueError(f"tokenizer kind must be 'gemma' or 't5', got {kind!r}")
    (folder / "tokenizer.json").write_text(text, encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    return folder

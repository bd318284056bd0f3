"""Training the WordPiece tokenizer on a corpus, and encoding documents with it (``prepare``'s side).

Training is made reproducible (see ``train_wordpiece``), and the vocabulary is renumbered
canonically: the five specials first (``[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4``), then every
other token sorted. WordPiece matches strings greedily, so ids carry no meaning beyond identity.
How a tokenizer is saved, loaded and checked is ``scale_hyper.data.tokenizer``.

This module must stay light to import: prepare's tokenizer worker processes import it.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Iterator, List, Tuple

import numpy as np
from tokenizers import Tokenizer, models, trainers

from scale_hyper.data.tokenizer import SPECIAL_TOKENS, bert_pipeline, with_post_processor


def train_wordpiece(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A BERT-style (uncased) WordPiece vocabulary of at most ``vocab_size`` tokens, reproducibly.

    ``tokenizers`` numbers the "##x" continuation characters in hash-map order, and merges with
    equal counts are ordered by those ids, so two runs can pick different tokens at the vocabulary
    cut-off. We fix every initial id up front: the alphabet (the most frequent characters, ties by
    code point) is passed as ``initial_alphabet`` and its "##x" forms as extra special tokens, which
    the trainer numbers first, in our order. Merges are then tie-broken identically on every run.
    """
    texts = texts if isinstance(texts, list) else list(texts)
    if not texts:
        raise ValueError("cannot train a tokenizer: data.source produced no text")
    tok = bert_pipeline(Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100)))
    counts: Counter = Counter()
    for t in texts:
        counts.update(tok.normalizer.normalize_str(t))
    for ch in [c for c in counts if c.isspace()]:
        del counts[ch]  # whitespace only separates words
    room = (vocab_size - len(SPECIAL_TOKENS)) // 2 - 1  # each character takes two entries: "x" and "##x"
    limit = max(1, min(1000, vocab_size // 4, room))
    alphabet = sorted(sorted(counts, key=lambda c: (-counts[c], c))[:limit])
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS) + ["##" + c for c in alphabet],
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        continuing_subword_prefix="##",
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tok = canonicalize(tok)
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"trained {tok.get_vocab_size()} tokens > data.vocab_size={vocab_size}; raise data.vocab_size")
    return tok


def canonicalize(tok: Tokenizer) -> Tokenizer:
    """Renumber a trained WordPiece vocabulary deterministically (see the module docstring)."""
    vocab = tok.get_vocab()
    rest = sorted(t for t in vocab if t not in SPECIAL_TOKENS)
    ordered = {t: i for i, t in enumerate(list(SPECIAL_TOKENS) + rest)}
    out = bert_pipeline(Tokenizer(models.WordPiece(vocab=ordered, unk_token="[UNK]", max_input_chars_per_word=100)))
    out.add_special_tokens(list(SPECIAL_TOKENS))
    return with_post_processor(out)


def encode_with(tok: Tokenizer, texts: List[str]) -> Tuple[np.ndarray, np.ndarray]:
    encs = tok.encode_batch(texts, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=len(encs))
    ids = np.fromiter(_chain_ids(encs), dtype=np.uint32, count=int(lengths.sum()))
    return ids, lengths


def _chain_ids(encs) -> Iterator[int]:
    for e in encs:
        yield from e.ids

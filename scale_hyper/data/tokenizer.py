"""The WordPiece tokenizer of prepared data: load it, check its specials, save it as a Hugging Face directory.

Saved as ``<data.output>/tokenizer/`` holding ``tokenizer.json``, ``tokenizer_config.json`` and
``special_tokens_map.json``, which ``AutoTokenizer.from_pretrained(dir)`` and
``PreTrainedTokenizerFast.from_pretrained(dir)`` load offline. (In transformers 5,
``BertTokenizer(vocab_file=...)`` silently builds a broken all-[UNK] tokenizer, so we never go
through a vocab file.) Training one, and encoding a corpus with it, is ``scale_hyper.prepare.wordpiece``.

This module must stay light to import: prepare's tokenizer worker processes import it.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, Tuple

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

SPECIAL_TOKENS: Tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
SPECIAL_KEYS: Tuple[str, ...] = ("pad", "unk", "cls", "sep", "mask")
TOKENIZER_DIR = "tokenizer"


def bert_pipeline(tok: Tokenizer) -> Tokenizer:
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def with_post_processor(tok: Tokenizer) -> Tokenizer:
    """[CLS] A [SEP] (B [SEP]) for Hugging Face users; shards are built without it."""
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return tok


def load_tokenizer_dir(path: str) -> Tokenizer:
    """An existing tokenizer directory: ``tokenizer.json``, or a BERT ``vocab.txt`` (uncased)."""
    path = os.path.expanduser(path)
    tj, vt = os.path.join(path, "tokenizer.json"), os.path.join(path, "vocab.txt")
    if os.path.isfile(tj):
        tok = Tokenizer.from_file(tj)
    elif os.path.isfile(vt):
        tok = bert_pipeline(Tokenizer(models.WordPiece.from_file(vt, unk_token="[UNK]")))
        tok.add_special_tokens([t for t in SPECIAL_TOKENS if tok.token_to_id(t) is not None])
        tok = with_post_processor(tok) if tok.token_to_id("[CLS]") is not None else tok
    else:
        raise ValueError(f"data.tokenizer={path!r} holds neither tokenizer.json nor vocab.txt")
    special_ids(tok, origin=f"data.tokenizer={path!r}")
    return tok


def special_ids(tok: Tokenizer, origin: str = "tokenizer") -> Dict[str, int]:
    ids = {k: tok.token_to_id(t) for k, t in zip(SPECIAL_KEYS, SPECIAL_TOKENS, strict=False)}
    missing = [t for k, t in zip(SPECIAL_KEYS, SPECIAL_TOKENS, strict=False) if ids[k] is None]
    if missing:
        raise ValueError(f"{origin} lacks the special tokens {missing} (a BERT-style vocabulary is needed)")
    return ids  # type: ignore[return-value]


def tokenizer_files(tok: Tokenizer, model_max_length: int) -> Dict[str, bytes]:
    """The files of a Hugging Face tokenizer directory, written without importing transformers."""
    specials = dict(unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    config = dict(
        specials,
        tokenizer_class="PreTrainedTokenizerFast",
        model_max_length=model_max_length,
        do_lower_case=True,
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,
    )
    dump = lambda obj: (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()  # noqa: E731
    return {
        "tokenizer.json": tok.to_str(pretty=True).encode(),
        "tokenizer_config.json": dump(config),
        "special_tokens_map.json": dump(specials),
    }


def file_hash(files: Dict[str, bytes]) -> str:
    """The tokenizer's identity: sha256 of ``tokenizer.json`` (vocabulary, normalizer, everything)."""
    return hashlib.sha256(files["tokenizer.json"]).hexdigest()


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "uint32"


# --- loading a prepared tokenizer for Hugging Face users -------------------------------------------


def load_tokenizer(source):
    """A ``PreTrainedTokenizerFast`` for a prepared dataset (a manifest dict or a DataConfig).

    Given a DataConfig whose ``data.output`` holds no prepared data yet, falls back to
    ``data.tokenizer``. Remote outputs are copied to a local temporary directory first.
    """
    import tempfile

    from transformers import PreTrainedTokenizerFast

    from scale_hyper.data import storage

    if isinstance(source, dict):
        base, allow_pipe = source["location"], bool(source.get("allow_pipe", False))
        tok_dir = source.get("tokenizer", {}).get("path", TOKENIZER_DIR)
    else:
        # A mixture's sources share one tokenizer (checked when loading them): the first source's stands for it.
        base = source.mixture[0].output if source.mixture else source.output
        allow_pipe, tok_dir = source.allow_pipe, TOKENIZER_DIR
        if storage.read_optional(storage.join(base, "manifest.json"), allow_pipe) is None:
            if not source.tokenizer:
                raise ValueError(
                    f"no prepared data at data.output={base!r} and no data.tokenizer; run `scale-hyper prepare` first"
                )
            tok = load_tokenizer_dir(source.tokenizer)
            tmp = tempfile.mkdtemp(prefix="scale-hyper-tok-")
            for name, data in tokenizer_files(tok, source.seq_len).items():
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(data)
            return PreTrainedTokenizerFast.from_pretrained(tmp)
    if storage.is_local(base):
        local = storage.join(base, tok_dir)
    else:
        local = tempfile.mkdtemp(prefix="scale-hyper-tok-")
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            data = storage.read_bytes(storage.join(base, f"{tok_dir}/{name}"), allow_pipe)
            with open(os.path.join(local, name), "wb") as f:
                f.write(data)
    return PreTrainedTokenizerFast.from_pretrained(local)

"""Model geometry and mixer choices: the one definition shared by the omegaconf schema,
the Hugging Face config and the model code.

Standalone on purpose: this file is copied next to exported checkpoints as ``model_config.py``
(``trust_remote_code``), so it imports nothing beyond the standard library. That is also why the
small field-spec helpers every config group uses live here: ``option`` declares a field with its
one-line description (``help``), its ``choices`` or its range (``ge``/``gt``/``le``/``lt``) as
dataclass metadata, and ``check_fields`` enforces them, raising ``ConfigError``.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, Optional, Sequence, TypeVar

MIXERS = ("bert", "hyperbert", "hypermixer", "hyla")


class ConfigError(ValueError):
    """A user-facing configuration problem: ``<what> — <fix>``, naming the key."""

    user_error = True  # scale_hyper.config.errors: one line, exit 2


def fail(what: str, fix: str) -> ConfigError:
    return ConfigError(f"{what} — {fix}")


@dataclass(frozen=True)
class Range:
    """Numeric bounds; ``None`` = unbounded on that side; ``*_open`` = the bound itself is excluded."""

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, v: Any) -> bool:
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        return self.hi is None or not (v > self.hi or (self.hi_open and v == self.hi))

    def __str__(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '≥'} {self.lo}"
        return f"{'<' if self.hi_open else '≤'} {self.hi}"


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    factory: Any = MISSING,
    choices: Sequence[Any] = (),
    or_path: str = "",
    ge: Optional[float] = None,
    gt: Optional[float] = None,
    le: Optional[float] = None,
    lt: Optional[float] = None,
) -> Any:
    """A dataclass field carrying its description and allowed values as metadata (omegaconf ignores
    metadata, so structured configs keep working). ``choices`` and ranges apply to each item of a
    list; ``or_path`` names what else a choice key accepts: a path (rejected only when it does not
    exist and is a near miss of a choice, e.g. ``aut``; a path that is gone is the engine's to report)."""
    meta: dict = {"help": help}
    if choices:
        meta["choices"] = tuple(choices)
    if or_path:
        meta["or_path"] = or_path
    if (ge, gt, le, lt) != (None,) * 4:
        lo, hi = (gt if gt is not None else ge), (lt if lt is not None else le)
        meta["range"] = Range(lo, hi, gt is not None, lt is not None)
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def allowed_text(meta: Any) -> str:
    """The allowed values of a field, in words ("" when any value of its type goes)."""
    if "choices" in meta:
        text = "one of " + ", ".join(str(c) for c in meta["choices"])
        return text + (f", or {meta['or_path']}" if "or_path" in meta else "")
    return str(meta["range"]) if "range" in meta else ""


def check_value(key: str, value: Any, meta: Any) -> None:
    """Raise a ConfigError naming ``key``, ``value`` and what is allowed, unless ``value`` fits ``meta``."""
    if value is None:
        return
    if "choices" in meta:
        choices = meta["choices"]
        if value in choices or ("or_path" in meta and os.path.exists(str(value))):
            return
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
        if "or_path" in meta and not close:
            return
        fix = f"Did you mean '{close[0]}'?" if close else f"set {key} to one of them"
        raise fail(f"{key}={value!r} is not one of {allowed_text(meta)[len('one of ') :]}", fix)
    if "range" in meta and value not in meta["range"]:
        raise fail(
            f"{key}={value!r} is out of range: it must be {meta['range']}", f"set {key} to a value {meta['range']}"
        )


def check_fields(obj: Any, group: str) -> None:
    """Check every field of the dataclass ``obj`` (config group ``group``) against its metadata."""
    for f in fields(obj):
        key, value = f"{group}.{f.name}", getattr(obj, f.name)
        if isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                check_value(f"{key}[{i}]", item, f.metadata)
        else:
            check_value(key, value, f.metadata)


G = TypeVar("G", bound="ConfigGroup")


class ConfigGroup:
    """Base of every config group (a dataclass): ``validate`` checks each field against its
    metadata, then the group's own rules across its keys (``check``)."""

    GROUP: ClassVar[str] = ""  # the key prefix when validated on its own

    def validate(self: G, group: str = "") -> G:
        group = group or self.GROUP
        check_fields(self, group)
        self.check(group)
        return self

    def check(self, group: str) -> None:
        """Rules across this group's keys; raise ``fail(...)``."""


@dataclass
class ModelConfig(ConfigGroup):
    GROUP: ClassVar[str] = "model"

    # --- encoder skeleton (BERT geometry) ---
    mixer: str = option("hyperbert", "token mixer in every layer", choices=MIXERS)
    vocab_size: int = option(30522, "rows of the token embedding (at least the tokenizer's vocabulary)", ge=1)
    hidden_size: int = option(256, "d: width of the encoder", ge=1)
    num_layers: int = option(4, "L: encoder layers", ge=1)
    num_heads: int = option(4, "attention heads (bert, hyla) and the default mixer heads", ge=1)
    ffn_size: int = option(1024, "inner width of each layer's feed-forward block", ge=1)
    max_position: int = option(512, "rows of the position table: the longest sequence the model takes", ge=1)
    type_vocab_size: int = option(2, "token-type (segment) embeddings", ge=1)
    dropout: float = option(0.1, "dropout probability (embeddings, mixer and feed-forward outputs)", ge=0, lt=1)
    norm_position: str = option(
        "post", "LayerNorm after the residual (post, as BERT) or before (pre)", choices=("post", "pre")
    )
    layer_norm_eps: float = option(1e-12, "LayerNorm epsilon", gt=0)
    initializer_range: float = option(0.02, "std of the normal initialisation of weights", gt=0)
    pad_token_id: int = option(0, "id of the [PAD] token (kept in the Hugging Face config)", ge=0)

    # --- shared hypernetwork (hyperbert) ---
    hyper_width: int = option(
        128, "O4: d_h, width of the shared hypernetwork (presets: d/2 from mini to 3b, d/4 at tiny)", ge=1
    )
    hyper_layers: int = option(2, "transformer layers in the shared hypernetwork", ge=1)
    hyper_heads: int = option(4, "attention heads in the shared hypernetwork (presets: d_h/64 from base up)", ge=1)
    hyper_ffn_ratio: int = option(2, "O4: r_h, the hypernetwork's feed-forward ratio (presets: 4 from base up)", ge=1)
    mixer_width: int = option(256, "O4: d', hidden width of the generated token-mixing MLP (also hypermixer's)", ge=1)
    hyper_condition: str = option(
        "hidden+layer",
        "O1: hypernetwork input: hidden states + layer embedding, hidden states only, or layer embedding only",
        choices=("hidden+layer", "hidden", "layer"),
    )
    hyper_mlp: str = option(
        "mlp", "O2: generated MLP W2·GELU(W1ᵀX) (mlp) or W2·(W1ᵀX), one N×N map (linear)", choices=("mlp", "linear")
    )
    hyper_decoder: str = option(
        "bidirectional",
        "O3: hypernetwork self-attention: bidirectional, causal, or cross (also attends to a per-layer memory token)",
        choices=("bidirectional", "causal", "cross"),
    )
    tied_weights: bool = option(False, "O5: W2 = W1 (hyperbert and hypermixer)")
    mixer_scale: str = option(
        "none", "O6: scaling of W1ᵀX: none, 1/√N (sqrt) or 1/N (mean)", choices=("none", "sqrt", "mean")
    )
    mixer_kernel: str = option(
        "torch",
        "generated mixer implementation: torch reference; triton, the fused kernel on CUDA (an error where it cannot run there; torch on CPU); auto, the kernel where usable, else torch",
        choices=("torch", "triton", "auto"),
    )
    mixer_heads: int = option(0, "O7: heads of the generated mixer; 0 = num_heads", ge=0)
    hyper_input_norm: bool = option(False, "O8: feed LN(x_l) instead of x_l to the hypernetwork")
    hyper_position: str = option(
        "learned",
        "O8: positions in the hypernetwork: learned or sinusoidal table added, or rotary on q and k",
        choices=("learned", "sinusoidal", "rotary"),
    )

    # --- cross-layer sharing (any mixer) ---
    share_mixers: int = option(
        0, "0 = each layer its own mixer; k = k mixers shared by the L layers (k ≤ num_layers)", ge=0
    )
    share_order: str = option(
        "cycle", "layer i uses mixer i mod k (cycle) or floor(i·k/L) (stretch)", choices=("cycle", "stretch")
    )

    # --- hyla ---
    hyla_chunk: int = option(128, "hyla: queries per chunk; bounds memory at O(chunk·N·d/H)", ge=1)
    hyla_scale: str = option(
        "none",
        "hyla: divide each query's sum over keys by 1 (none, the paper) or √n, n = real keys (sqrt: output scale independent of N)",
        choices=("none", "sqrt"),
    )

    # --- hypermixer ---
    hypermixer_mlp: str = option(
        "bert",
        "hypermixer: weight-generating MLPs with biases and BERT's normal init (bert) or, as the official code, no biases and xavier-uniform init (official)",
        choices=("bert", "official"),
    )

    def check(self, group: str) -> None:
        g = group
        if self.hidden_size % self.num_heads:
            raise fail(
                f"{g}.hidden_size={self.hidden_size} is not divisible by {g}.num_heads={self.num_heads}",
                f"choose {g}.num_heads among the divisors of {g}.hidden_size",
            )
        heads = self.effective_mixer_heads
        generated = self.mixer in ("hyperbert", "hypermixer")
        if self.hidden_size % heads or (generated and self.mixer_width % heads):
            raise fail(
                f"{g}.hidden_size={self.hidden_size} and {g}.mixer_width={self.mixer_width} "
                f"must be divisible by the mixer heads ({heads})",
                f"change {g}.mixer_heads (0 = num_heads) or the widths",
            )
        if self.share_mixers > self.num_layers:
            raise fail(
                f"{g}.share_mixers={self.share_mixers} must be between 0 (no sharing) and {g}.num_layers={self.num_layers}",
                f"lower {g}.share_mixers or raise {g}.num_layers",
            )
        if self.mixer == "hyperbert" and self.hyper_width % self.hyper_heads:
            raise fail(
                f"{g}.hyper_width={self.hyper_width} is not divisible by {g}.hyper_heads={self.hyper_heads}",
                f"choose {g}.hyper_heads among the divisors of {g}.hyper_width",
            )
        if self.pad_token_id is not None and self.pad_token_id >= self.vocab_size:
            raise fail(
                f"{g}.pad_token_id={self.pad_token_id} is outside the vocabulary ({g}.vocab_size={self.vocab_size})",
                f"set {g}.pad_token_id below {g}.vocab_size",
            )

    @property
    def effective_mixer_heads(self) -> int:
        return self.mixer_heads or self.num_heads

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

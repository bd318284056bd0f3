"""Params, tags and metric keys shaped to MLflow's limits: redacted, flattened, cleaned keys,
clipped values, and batches no larger than one request may carry."""

from __future__ import annotations

import hashlib
import posixpath
import re
from typing import Any, Dict, Iterator, List, Mapping

from scale_hyper.tracking.redaction import redact_params

# MLflow's limits (mlflow.utils.validation), restated so that importing them needs no mlflow.
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_KEY_LENGTH = 250

_BAD_KEY_CHARS = re.compile(r"[^\w.\- :/]")


def clean_key(key: Any, limit: int = MAX_KEY_LENGTH) -> str:
    """A name MLflow accepts: allowed characters only, no path tricks, at most ``limit`` chars."""
    k = _BAD_KEY_CHARS.sub("_", str(key)).strip()
    k = re.sub(r"/{2,}", "/", k).strip("/")
    if not k or posixpath.normpath(k) != k or k.startswith(".."):
        k = "_" + k.replace("/", "_")
    if len(k) > limit:
        digest = hashlib.sha1(k.encode()).hexdigest()[:8]
        k = f"{k[: limit - 9]}~{digest}"
    return k


def clip_value(value: Any, limit: int) -> str:
    """``value`` as a string of at most ``limit`` chars; a clipped one says how long it was."""
    s = value if isinstance(value, str) else str(value)
    if len(s) <= limit:
        return s
    marker = f"...[truncated, {len(s)} chars]"
    return s[: limit - len(marker)] + marker


def _flatten_nested(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(_flatten_nested(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def format_params(params: Mapping[str, Any]) -> Dict[str, str]:
    """Redacted, flattened, string-valued and length-limited: exactly what is stored."""
    flat = _flatten_nested(redact_params(params))
    return {clean_key(k): clip_value(v, MAX_PARAM_VAL_LENGTH) for k, v in flat.items()}


def format_tags(tags: Mapping[str, Any]) -> Dict[str, str]:
    flat = _flatten_nested(redact_params(tags))
    return {clean_key(k): clip_value(v, MAX_TAG_VAL_LENGTH) for k, v in flat.items()}


def chunks(items: List[Any], size: int) -> Iterator[List[Any]]:
    """``items`` in lists of at most ``size``: MLflow rejects a larger batch in one request."""
    for i in range(0, len(items), size):
        yield items[i : i + size]

"""Secret redaction: nothing that names or holds a credential reaches the MLflow store.

:func:`redact_params` drops keys that name a secret (api_token, aws_secret_access_key, password, ...)
at any nesting level and masks credentials inside values (``scheme://user:pass@host``, ``token=...``);
text artifacts (the resolved config YAML, the DeepSpeed JSON) are redacted the same way by
:func:`redact_document`, with the secret values masked rather than dropped.
"""

from __future__ import annotations

import json
import re
from typing import Any, Dict, List, Mapping

REDACTED = "***"

_ALWAYS_SECRET = ("secret", "password", "passwd", "credential", "signature")
_TOKEN_NOT_SECRET_BEFORE = {
    "pad",
    "mask",
    "cls",
    "sep",
    "unk",
    "bos",
    "eos",
    "start",
    "end",
    "special",
    "max",
    "min",
    "num",
}
_FOLLOWERS_OK = {"", "value", "val", "str", "string", "id", "file", "path", "b64", "base64", "hash"}


def _words(segment: str) -> List[str]:
    """``awsSecretAccessKey`` / ``AWS-SECRET_access.key`` → ``['aws', 'secret', 'access', 'key']``."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", segment)
    return [w for w in re.split(r"[^a-zA-Z0-9]+", spaced.lower()) if w]


def _secret_segment(segment: str) -> bool:
    words = _words(segment)
    for i, w in enumerate(words):
        before = words[i - 1] if i > 0 else ""
        after = words[i + 1] if i + 1 < len(words) else ""
        if any(s in w for s in _ALWAYS_SECRET) or w in ("pwd", "apikey"):
            return True
        if w.startswith("auth") and (not w.startswith("author") or w.startswith("authoriz")):
            return True  # auth, authn, authtoken, authorization; not author/authority
        # "key"/"token" are ordinary words in a model config (pad_token_id, key_size, tokenizer):
        # secret only as the name's last word (api_key, hf_token) or before id/file/value.
        if (w.endswith("key") or w.endswith("token")) and after in _FOLLOWERS_OK:
            if w == "token" and before in _TOKEN_NOT_SECRET_BEFORE:
                continue
            return True
    return False


def is_secret_key(key: Any) -> bool:
    """Whether a (possibly dotted) parameter/tag name names a secret at any level."""
    return any(_secret_segment(seg) for seg in re.split(r"[./]", str(key)))


# scheme://userinfo@host: greedy up to the last "@" before the path, so "p@ss" does not leak "ss".
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#\s]*)@")
# name=value, name: value, "name": "value", ?name=value&... where the name is a secret.
_ASSIGNMENT = re.compile(
    r"""(?P<pre>(?P<q>["']?)(?P<name>[A-Za-z_][\w.\-]*)(?P=q)[ \t]*(?:=|:(?!/))[ \t]*(?P<vq>["']?))"""
    r"""(?P<val>(?:(?:Bearer|Basic|Token)[ \t]+)?[^\s"'&;,?#}\]]+)"""
)


def redact_text(text: str) -> str:
    """Mask credentials inside free text: URL user:password parts and ``secret_name=value`` pairs."""
    if not isinstance(text, str) or not text:
        return text
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)

    def assignment(m: re.Match) -> str:
        if not is_secret_key(m["name"]) or m["val"] == REDACTED:
            return m.group(0)
        return m["pre"] + REDACTED

    return _ASSIGNMENT.sub(assignment, text)


def _redact(obj: Any, *, drop: bool) -> Any:
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if is_secret_key(k):
                if drop:
                    continue
                out[k] = REDACTED
            else:
                out[k] = _redact(v, drop=drop)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_redact(v, drop=drop) for v in obj)
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def redact_params(params: Mapping[str, Any]) -> Dict[str, Any]:
    """A copy of ``params`` without secrets: secret-named keys (any level) dropped, credentials
    inside string values masked. Non-string values are kept as they are."""
    return _redact(dict(params), drop=True)


def redact_document(text: str, artifact_file: str) -> str:
    """Redact a text artifact. YAML/JSON documents are parsed so that a secret under any key is
    masked (the structure stays loadable); anything else gets the free-text rules."""
    suffix = artifact_file.rsplit(".", 1)[-1].lower() if "." in artifact_file else ""
    try:
        if suffix == "json":
            data = json.loads(text)
            masked = _redact(data, drop=False)
            if masked != data:
                text = json.dumps(masked, indent=1)
        elif suffix in ("yaml", "yml"):
            import yaml  # PyYAML ships with omegaconf

            data = yaml.safe_load(text)
            masked = _redact(data, drop=False)
            if masked != data:
                text = yaml.safe_dump(masked, sort_keys=False, default_flow_style=False)
    except Exception:  # not really JSON/YAML: the text rules below still apply
        pass
    return redact_text(text)

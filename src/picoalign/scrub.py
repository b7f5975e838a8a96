"""One secret scrubber for everything picoalign writes or shows: config.yaml, metrics, the logs,
dataset_meta.json, output.log and the server's access log all pass their text through `scrub`.

    scrub("http://me:pw@host/v1?key=abc&n=2")   # 'http://***@host/v1?key=***&n=2'
    scrub(f"?x={quote(key)}")                   # '?x=***' for a key set in the environment

Three rules, in this order:
- the configured secrets: the environment's keys, tokens and passwords (`*_API_KEY`, `*_TOKEN`,
  `*_SECRET`, `*_PASSWORD`, ...), the passwords in its URLs, and what a caller names (`also`,
  `register`), in any encoding: plain, percent-encoded, or percent-encoded in part (each
  character either itself or its %XX form, as a URL may carry it);
- a URL's userinfo (`scheme://user:password@`);
- the value of a query parameter whose name says credential (`key`, `api_key`, `token`,
  `password`, `sig`, ... however its name is encoded).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any
from urllib.parse import unquote_plus, urlsplit

MASK = "***"
SHORT_SECRET = 8  # a shorter secret is masked only where it stands as a token of its own
MIN_ENV_SECRET = 6  # an environment value shorter than this is a setting (`=1`, `=true`), not a key
SECRET_ENV = re.compile(r".*(API_KEY|APIKEY|_KEY|TOKEN|SECRET|PASSWORD|PASSWD)$")
URL_ENV = re.compile(r".*(_URL|_URI)$")
URL_USERINFO = re.compile(r"\b([a-z][a-z0-9+.\-]*://)[^/?#\s@]*@", re.IGNORECASE)
QUERY_PARAM = re.compile(r"([?&;])([^=&#?;\s\"'<>]+)=([^&#;\s\"'<>]*)")
CREDENTIAL_NAME = re.compile(
    r"(.*[-_.])?(api[-_]?key|apikey|key|token|access[-_]?token|auth|authorization|password|passwd|pwd|"
    r"secret|sig|signature|credentials?)", re.IGNORECASE)
_registered: set[str] = set()


def register(*values: str) -> None:
    """Secrets of this process that no environment variable holds (serve's `--api-key`)."""
    _registered.update(v for v in values if v)


def url_password(url: str) -> set[str]:
    """The `user:password` of a URL and the password alone (empty without them)."""
    try:
        userinfo = urlsplit(url.strip()).netloc.rpartition("@")[0]
    except ValueError:
        return set()
    return {userinfo, userinfo.partition(":")[2]} - {""}


def configured_secrets(environ: Mapping[str, str] | None = None, also: Iterable[str] = ()) -> list[str]:
    """The secrets to mask, longest first (a key that contains another is masked whole)."""
    env = os.environ if environ is None else environ
    found = set(_registered) | {v for v in also if v}
    for name, value in env.items():
        if SECRET_ENV.fullmatch(name.upper()) and len(value) >= MIN_ENV_SECRET:
            found.add(value)
        elif URL_ENV.fullmatch(name.upper()):
            found |= url_password(value)
    return sorted(found, key=len, reverse=True)


def _any_encoding(secret: str) -> str:
    """A pattern for `secret` with any of its characters percent-encoded (and a space as +)."""
    parts = []
    for ch in secret:
        forms = [re.escape(ch), "".join(f"%(?i:{b:02x})" for b in ch.encode("utf-8"))]
        if ch == " ":
            forms.append(r"\+")
        parts.append(f"(?:{'|'.join(forms)})")
    body = "".join(parts)
    return body if len(secret) >= SHORT_SECRET else rf"(?<![A-Za-z0-9]){body}(?![A-Za-z0-9])"


@lru_cache(maxsize=32)
def _pattern(secrets: tuple[str, ...]) -> re.Pattern | None:
    return re.compile("|".join(_any_encoding(s) for s in secrets)) if secrets else None


def _query_value(match: re.Match) -> str:
    sep, name, value = match.groups()
    secret = CREDENTIAL_NAME.fullmatch(unquote_plus(name)) and value and value != MASK
    return f"{sep}{name}={MASK}" if secret else match.group(0)


def strip_userinfo(text: str) -> str:
    """`text` with the user:password part of every URL in it replaced by ***."""
    return URL_USERINFO.sub(rf"\1{MASK}@", text)


def scrub(text: str, environ: Mapping[str, str] | None = None, also: Iterable[str] = ()) -> str:
    """`text` with every configured secret, URL userinfo and credential query value as ***."""
    if not text:
        return text
    pattern = _pattern(tuple(configured_secrets(environ, also)))
    if pattern is not None:
        text = pattern.sub(MASK, text)
    text = URL_USERINFO.sub(rf"\1{MASK}@", text)
    return QUERY_PARAM.sub(_query_value, text) if "=" in text else text


def scrub_data(obj: Any, also: Iterable[str] = ()) -> Any:
    """`obj` (JSON-like: dicts, lists, strings) with every string scrubbed; keys too."""
    if isinstance(obj, str):
        return scrub(obj, also=also)
    if isinstance(obj, Mapping):
        return {scrub_data(k, also): scrub_data(v, also) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub_data(v, also) for v in obj]
    return obj

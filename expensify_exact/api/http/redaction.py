"""Scrubs secrets (tokens, client secrets, passwords) from URLs, headers and bodies before they are logged or raised."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"

# Field names whose values are secret in query strings, form bodies and JSON. Matched case-sensitively:
# OAuth's `code` is secret, Exact's `Code` (a GL account or journal code) is not.
SENSITIVE_FIELDS = frozenset({
    "access_token", "refresh_token", "client_secret", "code", "id_token", "token",
    "password", "secret", "partnerUserSecret", "api_key", "apikey",
})
SENSITIVE_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"})

_NAMES = "|".join(sorted((re.escape(n) for n in SENSITIVE_FIELDS), key=len, reverse=True))
# "name": "value" in JSON (also inside JSON-in-form payloads such as Expensify's requestJobDescription).
_JSON_PAIR = re.compile(rf'("(?:{_NAMES})"\s*:\s*")((?:[^"\\]|\\.)*)(")')
# name=value in query strings and form bodies; stops at the next separator.
_FORM_PAIR = re.compile(rf'(?<![A-Za-z0-9_])((?:{_NAMES})=)([^&\s"\']+)')
_BEARER = re.compile(r"(\bBearer\s+)[A-Za-z0-9\-._~+/!%=]+", re.IGNORECASE)


def redact_url(url: str | object) -> str:
    """A URL with the values of sensitive query parameters and any userinfo password masked."""
    text = str(url)
    try:
        parts = urlsplit(text)
    except ValueError:
        return redact_text(text)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(k in SENSITIVE_FIELDS for k, _ in pairs):
        # Re-encoding only when needed keeps ordinary OData URLs exactly as sent.
        query = urlencode([(k, MASK if k in SENSITIVE_FIELDS else v) for k, v in pairs], safe="$'(),*:/")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_headers(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> dict[str, str]:
    """A plain dict copy of headers with credential-bearing values masked."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    return {k: (MASK if k.lower() in SENSITIVE_HEADERS else v) for k, v in items}


def redact_text(text: str | bytes | None, secrets: Iterable[str | None] = (), limit: int | None = None) -> str:
    """Mask known secret values and secret-looking fields in free text (bodies, messages).

    Args:
        text: the text to scrub; bytes are decoded as UTF-8 with replacement.
        secrets: literal values to mask wherever they occur (e.g. the current tokens).
        limit: if given, the result is cut to this many characters (after scrubbing, so a
            secret is never half-shown).

    Returns:
        The scrubbed text.
    """
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, MASK)
    text = _JSON_PAIR.sub(lambda m: f"{m.group(1)}{MASK}{m.group(3)}", text)
    text = _FORM_PAIR.sub(lambda m: f"{m.group(1)}{MASK}", text)
    text = _BEARER.sub(lambda m: f"{m.group(1)}{MASK}", text)
    if limit is not None and len(text) > limit:
        text = text[:limit] + "…"
    return text

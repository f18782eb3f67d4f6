"""Exact's OData dialect: /Date(ms)/ values, filter literals, record clean-up and error bodies."""

from __future__ import annotations

import json
import re
import uuid
from datetime import date, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import httpx

AMSTERDAM = ZoneInfo("Europe/Amsterdam")
_EPOCH = datetime(1970, 1, 1)
_ODATA_DATE = re.compile(r"^/Date\((-?\d+)([+-]\d{4})?\)/$")


def parse_odata_date(value: str) -> datetime | None:
    """Parse Exact's `/Date(ms)/` into an aware Europe/Amsterdam datetime.

    The milliseconds count Amsterdam wall-clock time, not UTC (exact-online.md §4.5):
    `/Date(1640995200000)/` is 2022-01-01 00:00 in Amsterdam, i.e. 2021-12-31T23:00Z.
    The rarer `/Date(ms+0100)/` form carries an offset; then the milliseconds are UTC.

    Returns:
        The datetime, or None if `value` is not an OData date.
    """
    match = _ODATA_DATE.match(value.strip()) if isinstance(value, str) else None
    if not match:
        return None
    ms, offset = int(match.group(1)), match.group(2)
    if offset:
        return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).astimezone(AMSTERDAM)
    # Arithmetic on a naive datetime keeps the wall clock; an ambiguous autumn hour gets fold=0.
    return (_EPOCH + timedelta(milliseconds=ms)).replace(tzinfo=AMSTERDAM)


def guid_literal(value: str | uuid.UUID) -> str:
    """`guid'…'` for $filter and key paths; rejects anything that is not a GUID (no injection)."""
    return f"guid'{uuid.UUID(str(value).strip('{}'))}'"


def string_literal(value: str) -> str:
    """A quoted OData string; a quote inside is doubled (exact-online.md §4.4)."""
    return "'" + str(value).replace("'", "''") + "'"


def datetime_literal(value: datetime | date) -> str:
    """`datetime'YYYY-MM-DDTHH:MM:SS'` in Amsterdam local time, without a zone suffix (exact-online.md §4.4).

    An aware datetime is converted to Amsterdam first; a naive one is taken as Amsterdam wall clock.
    """
    if not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    if value.tzinfo is not None:
        value = value.astimezone(AMSTERDAM).replace(tzinfo=None)
    return f"datetime'{value.strftime('%Y-%m-%dT%H:%M:%S')}'"


def clean_record(record: dict[str, Any]) -> dict[str, Any]:
    """One entity as plain Python: dates parsed, padded codes stripped, `__metadata` dropped.

    Exact right-aligns codes with spaces (`"                 8"`, `"NL        "`; exact-online.md §4.5).
    """
    cleaned: dict[str, Any] = {}
    for key, value in record.items():
        if key == "__metadata":
            continue
        if isinstance(value, str):
            parsed = parse_odata_date(value)
            cleaned[key] = parsed if parsed is not None else value.strip()
        elif isinstance(value, dict) and isinstance(value.get("results"), list):
            cleaned[key] = [clean_record(r) if isinstance(r, dict) else r for r in value["results"]]
        else:
            cleaned[key] = value
    return cleaned


def parse_error(response: httpx.Response) -> tuple[str, str | None]:
    """Exact's error text and `Reason` header (exact-online.md §7), as picqer reads them.

    Handles the OData body `{"error":{"message":{"value":…}}}`, the token endpoint's
    `{"error":…,"error_description":…}` and plain or empty bodies.

    Returns:
        (message, reason); the message falls back to the HTTP reason phrase.
    """
    reason = response.headers.get("Reason") or None
    text = _body_text(response)
    message = ""
    try:
        body = json.loads(text) if text.strip() else None
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            inner = error.get("message")
            message = inner.get("value", "") if isinstance(inner, dict) else str(inner or "")
        elif isinstance(error, str):
            message = body.get("error_description") or error
            if body.get("error_description"):
                message = f"{error}: {body['error_description']}"
    elif text.strip() and not text.lstrip().startswith("<"):
        message = text.strip()
    return (message.strip() or response.reason_phrase or f"HTTP {response.status_code}"), reason


def has_odata_error(response: httpx.Response) -> bool:
    """Whether the body is an OData error object, i.e. Exact itself answered (not a proxy or crash page)."""
    try:
        body = json.loads(_body_text(response))
    except ValueError:
        return False
    return isinstance(body, dict) and isinstance(body.get("error"), dict)


def _body_text(response: httpx.Response) -> str:
    try:
        return response.text
    except httpx.ResponseNotRead:
        return ""

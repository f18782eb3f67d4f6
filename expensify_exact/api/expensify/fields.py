"""How Expensify writes two of its fields: multi-level tag paths and naive report timestamps (expensify.md §3).
The client and the normalization of expense lines both read them this way."""

from __future__ import annotations

import re
from datetime import datetime
from datetime import timezone as dt_timezone
from typing import Any
from zoneinfo import ZoneInfo

# Dates and timestamps outside these years are export faults; the bound also keeps them inside pandas' range.
YEARS = range(1900, 2200)
_UNESCAPED_COLON = re.compile(r"(?<!\\):")


def split_tag(tag: str) -> list[str]:
    """Split a multi-level tag path on unescaped colons.

    Expensify joins tag levels with ``:`` and escapes a literal colon inside a level as ``\\:``
    (expensify.md §3.2); only that escape exists, so every other backslash is kept as it is.

    Args:
        tag: the raw tag, e.g. ``"Office:Project\\:A"``.

    Returns:
        The levels with ``\\:`` turned into ``:``, e.g. ``["Office", "Project:A"]``; ``[]`` for ``""``.
    """
    if not tag:
        return []
    return [part.replace("\\:", ":") for part in _UNESCAPED_COLON.split(tag)]


def parse_report_timestamp(value: Any, source_timezone: str = "UTC") -> datetime | None:
    """Parse a report timestamp (``yyyy-MM-dd HH:mm:ss``, naive) into an aware UTC datetime.

    Args:
        value: the field as exported; ``None`` or ``""`` means the stage was not reached.
        source_timezone: the zone naive timestamps are in. Expensify does not say (expensify.md §3 [INF]);
            the sandbox and this project treat them as UTC.

    Returns:
        The instant in UTC, or None for an empty value.

    Raises:
        ValueError: the value is not a timestamp.
    """
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"timestamp {value!r} is not a string")
    try:
        parsed = datetime.fromisoformat(value.strip())
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=ZoneInfo(source_timezone))
        parsed = parsed.astimezone(dt_timezone.utc)
    except OverflowError:
        raise ValueError(f"timestamp {value!r} is out of range") from None
    if parsed.year not in YEARS:
        raise ValueError(f"timestamp {value!r} is outside the years {YEARS.start}-{YEARS.stop - 1}")
    return parsed

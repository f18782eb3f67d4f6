"""Exact's OData quirks: local-time /Date(ms)/ values, literal quoting, padded codes, error bodies.

A wrong date here books an expense in the wrong period, and a badly quoted literal breaks or widens a query.
"""

from datetime import date, datetime, timezone

import httpx
import pytest

from expensify_exact.api.exact.odata import (
    AMSTERDAM,
    clean_record,
    datetime_literal,
    guid_literal,
    parse_error,
    parse_odata_date,
    string_literal,
)

UTC = timezone.utc


@pytest.mark.parametrize("raw, wall_clock, utc", [
    # the reference sheet's own example: midnight Amsterdam, 23:00 UTC the day before (§4.5)
    ("/Date(1640995200000)/", datetime(2022, 1, 1, 0, 0), datetime(2021, 12, 31, 23, 0, tzinfo=UTC)),
    # a date-only field in summer: CEST is UTC+2
    ("/Date(1718409600000)/", datetime(2024, 6, 15, 0, 0), datetime(2024, 6, 14, 22, 0, tzinfo=UTC)),
    # the sheet's date-only example, 2024-03-15 in winter time
    ("/Date(1710460800000)/", datetime(2024, 3, 15, 0, 0), datetime(2024, 3, 14, 23, 0, tzinfo=UTC)),
    # last winter minute before the spring jump (2024-03-31 01:59 CET)
    ("/Date(1711850340000)/", datetime(2024, 3, 31, 1, 59), datetime(2024, 3, 31, 0, 59, tzinfo=UTC)),
    # first summer wall-clock time after the jump (03:00 CEST)
    ("/Date(1711854000000)/", datetime(2024, 3, 31, 3, 0), datetime(2024, 3, 31, 1, 0, tzinfo=UTC)),
    # the repeated autumn hour resolves to its first (summer-time) occurrence
    ("/Date(1729996200000)/", datetime(2024, 10, 27, 2, 30), datetime(2024, 10, 27, 0, 30, tzinfo=UTC)),
    # milliseconds survive
    ("/Date(1640995200123)/", datetime(2022, 1, 1, 0, 0, 0, 123000), datetime(2021, 12, 31, 23, 0, 0, 123000, tzinfo=UTC)),
    # before 1970 is negative
    ("/Date(-86400000)/", datetime(1969, 12, 31, 0, 0), datetime(1969, 12, 30, 23, 0, tzinfo=UTC)),
    # the offset form is UTC milliseconds plus an offset, converted to Amsterdam
    ("/Date(1640995200000+0100)/", datetime(2022, 1, 1, 1, 0), datetime(2022, 1, 1, 0, 0, tzinfo=UTC)),
])
def test_parse_odata_date_reads_milliseconds_as_amsterdam_wall_clock(raw, wall_clock, utc):
    parsed = parse_odata_date(raw)
    assert parsed.tzinfo is not None
    assert parsed.replace(tzinfo=None) == wall_clock
    assert parsed.astimezone(UTC) == utc


@pytest.mark.parametrize("raw", [
    "2024-03-15",          # an ISO string is not an OData date
    "/Date(abc)/",         # garbage inside the wrapper
    "Date(1640995200000)",  # missing slashes
    "",                    # empty
    None,                  # null field
])
def test_parse_odata_date_returns_none_for_anything_else(raw):
    assert parse_odata_date(raw) is None


@pytest.mark.parametrize("value, literal", [
    # plain GUID
    ("3c534e79-c4fe-44d2-9765-00b30573c2de", "guid'3c534e79-c4fe-44d2-9765-00b30573c2de'"),
    # braces as in some configs (§2.1) and upper case are normalised
    ("{3C534E79-C4FE-44D2-9765-00B30573C2DE}", "guid'3c534e79-c4fe-44d2-9765-00b30573c2de'"),
])
def test_guid_literal(value, literal):
    assert guid_literal(value) == literal


def test_guid_literal_rejects_injection():
    # a "GUID" that would close the quote and widen the filter must never be formatted
    with pytest.raises(ValueError):
        guid_literal("x' or 1 eq 1 or ID eq guid'x")


@pytest.mark.parametrize("value, literal", [
    ("4406", "'4406'"),                     # ordinary code
    ("O'Brien", "'O''Brien'"),              # a quote is doubled, not backslashed (§4.4)
    ("''", "''''''"),                       # only quotes
    ("", "''"),                             # empty string
])
def test_string_literal_doubles_quotes(value, literal):
    assert string_literal(value) == literal


@pytest.mark.parametrize("value, literal", [
    # an aware UTC instant in winter becomes CET wall clock, no zone suffix
    (datetime(2022, 12, 12, 0, 0, tzinfo=UTC), "datetime'2022-12-12T01:00:00'"),
    # in summer it is CEST (+2)
    (datetime(2024, 7, 1, 10, 30, tzinfo=UTC), "datetime'2024-07-01T12:30:00'"),
    # a naive datetime is already Amsterdam wall clock
    (datetime(2024, 7, 1, 10, 30), "datetime'2024-07-01T10:30:00'"),
    # a date means its midnight
    (date(2024, 3, 15), "datetime'2024-03-15T00:00:00'"),
    # an aware Amsterdam value stays as it is
    (datetime(2024, 3, 15, 9, 0, tzinfo=AMSTERDAM), "datetime'2024-03-15T09:00:00'"),
])
def test_datetime_literal_is_amsterdam_local(value, literal):
    assert datetime_literal(value) == literal


def test_clean_record_parses_dates_strips_padding_and_drops_metadata():
    raw = {
        "__metadata": {"uri": "https://start.exactonline.nl/api/v1/1/financial/GLAccounts(guid'x')"},
        "Code": "                 8",   # right-aligned account code (§4.5)
        "Language": "NL        ",
        "Modified": "/Date(1640995200000)/",
        "Amount": 12.5,
        "Lines": {"results": [{"Code": " 1 ", "__metadata": {}}]},
    }
    assert clean_record(raw) == {
        "Code": "8", "Language": "NL", "Modified": datetime(2022, 1, 1, tzinfo=AMSTERDAM), "Amount": 12.5,
        "Lines": [{"Code": "1"}],
    }


@pytest.mark.parametrize("status, headers, body, expected", [
    # the OData error body: message.value, as picqer reads it (§7)
    (400, {}, b'{"error":{"code":"","message":{"lang":"","value":"Bad Request - Error in query syntax."}}}',
     ("Bad Request - Error in query syntax.", None)),
    # the Reason header travels with the message
    (403, {"Reason": "NoDivisionAccess"}, b'{"error":{"code":"","message":{"lang":"","value":"Forbidden"}}}',
     ("Forbidden", "NoDivisionAccess")),
    # the token endpoint's RFC 6749 shape (§2.5)
    (401, {}, b'{"error":"unauthorized_client","error_description":"Old refresh token used."}',
     ("unauthorized_client: Old refresh token used.", None)),
    # an empty 429 body falls back to the status phrase
    (429, {}, b"", ("Too Many Requests", None)),
    # a plain-text body is used as is
    (400, {}, b"Bad Request", ("Bad Request", None)),
    # an HTML proxy page is not shown
    (502, {}, b"<html><body>gateway</body></html>", ("Bad Gateway", None)),
    # CRLF-pretty JSON as the Ruby client recorded it
    (400, {}, b'{\r\n  "error": {\r\n    "code": "", "message": {\r\n "lang": "", "value": "Invalid"\r\n}}}',
     ("Invalid", None)),
])
def test_parse_error(status, headers, body, expected):
    response = httpx.Response(status, headers=headers, content=body)
    assert parse_error(response) == expected

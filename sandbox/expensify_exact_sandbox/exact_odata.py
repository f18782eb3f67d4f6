"""OData v2 as the Exact Online simulator speaks it: query options, $filter, /Date(ms)/, envelopes and Atom XML.

Written from shared/reference/exact-online.md §4 and §7 only; nothing here knows about the connector's client.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from decimal import Decimal
from typing import Any, Callable
from zoneinfo import ZoneInfo

AMSTERDAM = ZoneInfo("Europe/Amsterdam")
SYNTAX_ERROR = "Bad Request - Error in query syntax."
SELECT_REQUIRED = "Please add a $select or a $top=1 statement to the query string."

_NS_ATOM = "http://www.w3.org/2005/Atom"
_NS_D = "http://schemas.microsoft.com/ado/2007/08/dataservices"
_NS_M = "http://schemas.microsoft.com/ado/2007/08/dataservices/metadata"
ET.register_namespace("", _NS_ATOM)
ET.register_namespace("d", _NS_D)
ET.register_namespace("m", _NS_M)

_GUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


@dataclass
class Reply:
    """One HTTP answer. `drop` asks the server to close the socket without writing anything."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    drop: bool = False
    refusal: str | None = None  # stats label for token refusals
    delay: float = 0.0  # real seconds to wait, outside the lock, before answering


class ODataError(Exception):
    """A refusal rendered as the OData error body (exact-online.md §7); `reason` becomes the Reason header."""

    def __init__(self, status: int, message: str, reason: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason


def is_guid(value: Any) -> bool:
    return isinstance(value, str) and bool(_GUID_RE.match(value))


# --- dates (exact-online.md §4.5) -------------------------------------------------------------------

def to_local_naive(value: date | datetime) -> datetime:
    """Amsterdam wall-clock time without tzinfo: what Exact stores and what datetime'…' literals mean."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            return value
        return value.astimezone(AMSTERDAM).replace(tzinfo=None)
    return datetime(value.year, value.month, value.day)


def date_ms(value: date | datetime) -> int:
    # exact-online.md §4.5: the ms count encodes Amsterdam wall-clock time as if it were UTC
    local = to_local_naive(value)
    return int((local.replace(tzinfo=timezone.utc) - datetime(1970, 1, 1, tzinfo=timezone.utc)).total_seconds() * 1000)


def json_value(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return f"/Date({date_ms(value)})/"
    if isinstance(value, Decimal):
        return float(value)
    return value


# --- $filter ----------------------------------------------------------------------------------------

_TOKEN_RE = re.compile(
    r"""(?P<ws>\s+)
      | (?P<typed>(?:guid|datetime|datetimeoffset|time|X|binary)'(?:[^']|'')*')
      | (?P<str>'(?:[^']|'')*')
      | (?P<num>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?[LlMmDdFf]?)
      | (?P<ident>[A-Za-z_][A-Za-z0-9_]*(?:/[A-Za-z_][A-Za-z0-9_]*)*)
      | (?P<punct>[(),])""",
    re.VERBOSE,
)
_COMPARISONS = {"eq", "ne", "gt", "ge", "lt", "le"}
_NUMERIC = {"Edm.Int16", "Edm.Int32", "Edm.Int64", "Edm.Byte", "Edm.Double", "Edm.Decimal", "Edm.Single"}
_CLR = {"Edm.Guid": "System.Guid", "Edm.String": "System.String", "Edm.Int32": "System.Int32",
        "Edm.Int16": "System.Int16", "Edm.Int64": "System.Int64", "Edm.Byte": "System.Byte",
        "Edm.Double": "System.Double", "Edm.Decimal": "System.Decimal",
        "Edm.Boolean": "System.Boolean", "Edm.DateTime": "System.DateTime", "null": "<null>"}


@dataclass
class _Tok:
    kind: str
    text: str
    pos: int


@dataclass
class _Operand:
    edm: str
    get: Callable[[dict], Any]


def _tokenize(text: str) -> list[_Tok]:
    tokens, pos = [], 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if not m:
            raise ODataError(400, SYNTAX_ERROR)
        if m.lastgroup != "ws":
            tokens.append(_Tok(m.lastgroup, m.group(), pos))
        pos = m.end()
    return tokens


def parse_literal(tok: _Tok) -> _Operand:
    """A literal token as a typed constant; bad guid/datetime literals get Exact's own message (§4.6)."""
    text = tok.text
    if tok.kind == "str":
        value = text[1:-1].replace("''", "'")
        return _Operand("Edm.String", lambda row, v=value: v)
    if tok.kind == "typed":
        prefix, raw = text.split("'", 1)
        raw = raw[:-1]
        if prefix == "guid":
            if not is_guid(raw):
                raise ODataError(400, f"Unrecognized 'Edm.Guid' literal '{text}' in '{tok.pos}'.")
            return _Operand("Edm.Guid", lambda row, v=raw.lower(): v)
        if prefix == "datetime":
            parsed = _parse_local_datetime(raw)
            if parsed is None:
                raise ODataError(400, f"Unrecognized 'Edm.DateTime' literal '{text}' in '{tok.pos}'.")
            return _Operand("Edm.DateTime", lambda row, v=parsed: v)
        raise ODataError(400, SYNTAX_ERROR)
    if tok.kind == "num":
        suffix = text[-1] if text[-1] in "LlMmDdFf" else ""
        body = text[:-1] if suffix else text
        if suffix in ("L", "l"):
            if "." in body:
                raise ODataError(400, SYNTAX_ERROR)
            return _Operand("Edm.Int64", lambda row, v=int(body): v)
        if suffix or "." in body or "e" in body.lower():
            return _Operand("Edm.Double", lambda row, v=float(body): v)
        return _Operand("Edm.Int32", lambda row, v=int(body): v)
    raise ODataError(400, SYNTAX_ERROR)


def _parse_local_datetime(raw: str) -> datetime | None:
    # exact-online.md §4.4: no TZ suffix; Exact reads it as Amsterdam local time
    for fmt in ("%Y-%m-%dT%H:%M:%S.%f", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d"):
        try:
            return datetime.strptime(raw, fmt)
        except ValueError:
            continue
    return None


def _comparable(value: Any, edm: str) -> Any:
    if value is None:
        return None
    if edm == "Edm.DateTime" or isinstance(value, (date, datetime)):
        return to_local_naive(value) if isinstance(value, (date, datetime)) else value
    if edm == "Edm.Guid" and isinstance(value, str):
        return value.lower()
    if isinstance(value, str) and edm in _NUMERIC:
        return Decimal(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return Decimal(str(value))
    return value


def _compatible(a: str, b: str) -> bool:
    if "null" in (a, b) or a == b:
        return True
    return a in _NUMERIC and b in _NUMERIC


class _FilterParser:
    def __init__(self, text: str, fields: dict[str, str], type_name: str):
        self.tokens = _tokenize(text)
        self.i = 0
        self.fields = fields
        self.type_name = type_name

    def peek(self) -> _Tok | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> _Tok:
        tok = self.peek()
        if tok is None:
            raise ODataError(400, SYNTAX_ERROR)
        self.i += 1
        return tok

    def expect(self, text: str) -> None:
        if self.take().text != text:
            raise ODataError(400, SYNTAX_ERROR)

    def keyword(self, *words: str) -> str | None:
        tok = self.peek()
        if tok is not None and tok.kind == "ident" and tok.text in words:
            self.i += 1
            return tok.text
        return None

    def parse(self) -> Callable[[dict], bool]:
        pred = self.or_expr()
        if self.peek() is not None:
            raise ODataError(400, SYNTAX_ERROR)
        return pred

    def or_expr(self):
        left = self.and_expr()
        while self.keyword("or"):
            right = self.and_expr()
            left = (lambda l, r: lambda row: l(row) or r(row))(left, right)
        return left

    def and_expr(self):
        left = self.not_expr()
        while self.keyword("and"):
            right = self.not_expr()
            left = (lambda l, r: lambda row: l(row) and r(row))(left, right)
        return left

    def not_expr(self):
        if self.keyword("not"):
            inner = self.not_expr()
            return lambda row: not inner(row)
        return self.comparison()

    def comparison(self):
        tok = self.peek()
        if tok is not None and tok.text == "(":
            self.take()
            inner = self.or_expr()
            self.expect(")")
            return inner
        left = self.operand()
        op_tok = self.peek()
        if op_tok is None or op_tok.kind != "ident" or op_tok.text not in _COMPARISONS:
            if left.edm == "Edm.Boolean":
                return lambda row: bool(left.get(row))
            raise ODataError(400, SYNTAX_ERROR)
        self.take()
        right = self.operand()
        if not _compatible(left.edm, right.edm):
            raise ODataError(400, f"Operator '{op_tok.text}' incompatible with operand types "
                                  f"'{_CLR.get(left.edm, left.edm)}' and '{_CLR.get(right.edm, right.edm)}' "
                                  f"at position {op_tok.pos}.")
        return _compare(op_tok.text, left, right)

    def operand(self) -> _Operand:
        tok = self.take()
        if tok.kind == "ident":
            if tok.text in ("true", "false"):
                return _Operand("Edm.Boolean", lambda row, v=(tok.text == "true"): v)
            if tok.text == "null":
                return _Operand("null", lambda row: None)
            nxt = self.peek()
            if nxt is not None and nxt.text == "(":
                return self.function(tok)
            if "/" in tok.text:
                # exact-online.md §4.4: filtering on navigation properties is not supported
                raise ODataError(400, SYNTAX_ERROR)
            if tok.text not in self.fields:
                raise ODataError(400, f"No property '{tok.text}' exists in type '{self.type_name}' "
                                      f"at position {tok.pos}.")
            name, edm = tok.text, self.fields[tok.text]
            return _Operand(edm, lambda row: row.get(name))
        if tok.kind == "punct":
            raise ODataError(400, SYNTAX_ERROR)
        return parse_literal(tok)

    def function(self, name_tok: _Tok) -> _Operand:
        self.expect("(")
        args = [self.operand()]
        while self.peek() is not None and self.peek().text == ",":
            self.take()
            args.append(self.operand())
        self.expect(")")
        fn = {"startswith": lambda a, b: a.startswith(b), "endswith": lambda a, b: a.endswith(b),
              "substringof": lambda a, b: a in b}.get(name_tok.text)
        if fn is None or len(args) != 2 or any(a.edm not in ("Edm.String",) for a in args):
            raise ODataError(400, SYNTAX_ERROR)
        a, b = args
        return _Operand("Edm.Boolean", lambda row: (a.get(row) is not None and b.get(row) is not None
                                                     and fn(a.get(row), b.get(row))))


def _compare(op: str, left: _Operand, right: _Operand) -> Callable[[dict], bool]:
    def pred(row: dict) -> bool:
        a = _comparable(left.get(row), left.edm)
        b = _comparable(right.get(row), right.edm)
        if op == "eq":
            return a == b
        if op == "ne":
            return a != b
        if a is None or b is None:
            return False
        return {"gt": a > b, "ge": a >= b, "lt": a < b, "le": a <= b}[op]
    return pred


def parse_filter(text: str, fields: dict[str, str], type_name: str) -> Callable[[dict], bool]:
    """Compile a $filter expression against an entity's Edm field types."""
    if not text.strip():
        raise ODataError(400, SYNTAX_ERROR)
    return _FilterParser(text, fields, type_name).parse()


def filter_fields(text: str) -> set[str]:
    """The property names a (valid) $filter compares, e.g. {'EntryID'} for `EntryID eq guid'…' or EntryID eq …`."""
    tokens = _tokenize(text)
    names = set()
    for i, tok in enumerate(tokens):
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        prev = tokens[i - 1] if i else None
        if tok.kind != "ident" or tok.text in ("and", "or", "not", "true", "false", "null", *_COMPARISONS):
            continue
        if (nxt is not None and nxt.text in _COMPARISONS) or (prev is not None and prev.text in _COMPARISONS):
            names.add(tok.text)
    return names


def parse_key_literal(text: str) -> Any:
    """`guid'…'`, `123` or `123L` as used in key paths and $skiptoken."""
    toks = _tokenize(text)
    if len(toks) != 1:
        raise ODataError(400, SYNTAX_ERROR)
    tok = toks[0]
    if tok.kind == "typed" and not tok.text.startswith("guid'"):
        raise ODataError(400, SYNTAX_ERROR)
    if tok.kind not in ("typed", "num", "str"):
        raise ODataError(400, SYNTAX_ERROR)
    try:
        return parse_literal(tok).get({})
    except ODataError as exc:
        raise ODataError(400, SYNTAX_ERROR) from exc


def key_literal(value: Any, edm: str) -> str:
    if edm == "Edm.Guid":
        return f"guid'{value}'"
    if edm == "Edm.Int64":
        return f"{value}L"
    if edm == "Edm.String":
        return "'" + str(value).replace("'", "''") + "'"
    return str(value)


# --- query options ----------------------------------------------------------------------------------

_KNOWN_OPTIONS = {"$filter", "$select", "$top", "$skip", "$orderby", "$skiptoken", "$expand", "$inlinecount"}


@dataclass
class Query:
    filter: Callable[[dict], bool] | None = None
    select: list[str] | None = None
    top: int | None = None
    skip: int = 0
    orderby: list[tuple[str, bool]] = field(default_factory=list)  # (field, descending)
    skiptoken: Any = None
    expand: list[str] = field(default_factory=list)
    inlinecount: bool = False


def parse_query(params: list[tuple[str, str]], fields: dict[str, str], type_name: str,
                navigation: tuple[str, ...] = ()) -> Query:
    """Validate and compile the system query options; anything malformed is Exact's generic 400 (§4.6)."""
    q = Query()
    seen = set()
    for name, value in params:
        if not name.startswith("$"):
            continue
        if name not in _KNOWN_OPTIONS:
            raise ODataError(400, f"The query parameter '{name}' begins with a system-reserved '$' character "
                                  f"but is not recognized.")
        if name in seen:
            raise ODataError(400, SYNTAX_ERROR)
        seen.add(name)
        if name == "$filter":
            q.filter = parse_filter(value, fields, type_name)
        elif name == "$select":
            names = [s.strip() for s in value.split(",")]
            if not all(names):
                raise ODataError(400, SYNTAX_ERROR)
            if names != ["*"]:
                for s in names:
                    if s not in fields and s not in navigation:
                        raise ODataError(400, f"No property '{s}' exists in type '{type_name}'.")
                q.select = names
        elif name in ("$top", "$skip"):
            if not value.isdigit():
                raise ODataError(400, SYNTAX_ERROR)
            setattr(q, name[1:], int(value))
        elif name == "$orderby":
            for part in value.split(","):
                bits = part.split()
                if not bits or len(bits) > 2 or (len(bits) == 2 and bits[1] not in ("asc", "desc")):
                    raise ODataError(400, SYNTAX_ERROR)
                if bits[0] not in fields:
                    raise ODataError(400, f"No property '{bits[0]}' exists in type '{type_name}'.")
                q.orderby.append((bits[0], len(bits) == 2 and bits[1] == "desc"))
        elif name == "$skiptoken":
            q.skiptoken = parse_key_literal(value)
        elif name == "$expand":
            q.expand = [s.strip() for s in value.split(",")]
            if any(s not in navigation for s in q.expand):
                raise ODataError(400, SYNTAX_ERROR)
        elif name == "$inlinecount":
            if value not in ("allpages", "none"):
                raise ODataError(400, SYNTAX_ERROR)
            q.inlinecount = value == "allpages"
    return q


def sort_key(value: Any, edm: str) -> tuple:
    # nulls first, as SQL Server sorts them
    c = _comparable(value, edm)
    return (0, "") if c is None else (1, c)


# --- rendering --------------------------------------------------------------------------------------

def error_json(message: str) -> bytes:
    return json.dumps({"error": {"code": "", "message": {"lang": "", "value": message}}}).encode()


def error_xml(message: str) -> bytes:
    root = ET.Element(f"{{{_NS_M}}}error")
    ET.SubElement(root, f"{{{_NS_M}}}code").text = ""
    msg = ET.SubElement(root, f"{{{_NS_M}}}message")
    msg.set("{http://www.w3.org/XML/1998/namespace}lang", "")
    msg.text = message
    return b'<?xml version="1.0" encoding="utf-8" standalone="yes"?>' + ET.tostring(root)


def _xml_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (date, datetime)):
        return to_local_naive(value).isoformat()
    return str(value)


def _atom_entry(parent: ET.Element, row: dict, updated: str) -> None:
    meta = row.get("__metadata", {})
    entry = ET.SubElement(parent, f"{{{_NS_ATOM}}}entry")
    ET.SubElement(entry, f"{{{_NS_ATOM}}}id").text = meta.get("uri", "")
    ET.SubElement(entry, f"{{{_NS_ATOM}}}category", term=meta.get("type", ""),
                  scheme="http://schemas.microsoft.com/ado/2007/08/dataservices/scheme")
    ET.SubElement(entry, f"{{{_NS_ATOM}}}link", rel="edit", href=meta.get("uri", ""))
    ET.SubElement(entry, f"{{{_NS_ATOM}}}title")
    ET.SubElement(entry, f"{{{_NS_ATOM}}}updated").text = updated
    ET.SubElement(ET.SubElement(entry, f"{{{_NS_ATOM}}}author"), f"{{{_NS_ATOM}}}name")
    content = ET.SubElement(entry, f"{{{_NS_ATOM}}}content", type="application/xml")
    props = ET.SubElement(content, f"{{{_NS_M}}}properties")
    for name, value in row.items():
        if name == "__metadata" or isinstance(value, dict):
            continue
        el = ET.SubElement(props, f"{{{_NS_D}}}{name}")
        if value is None:
            el.set(f"{{{_NS_M}}}null", "true")
        else:
            el.text = _xml_text(value)


def atom_feed(title: str, self_url: str, rows: list[dict], next_url: str | None, now: datetime) -> bytes:
    """A minimal, well-formed Atom feed: what Exact answers without `Accept: application/json` (§4.1)."""
    updated = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    feed = ET.Element(f"{{{_NS_ATOM}}}feed")
    ET.SubElement(feed, f"{{{_NS_ATOM}}}title", type="text").text = title
    ET.SubElement(feed, f"{{{_NS_ATOM}}}id").text = self_url
    ET.SubElement(feed, f"{{{_NS_ATOM}}}updated").text = updated
    ET.SubElement(feed, f"{{{_NS_ATOM}}}link", rel="self", title=title, href=title)
    for row in rows:
        _atom_entry(feed, row, updated)
    if next_url:
        ET.SubElement(feed, f"{{{_NS_ATOM}}}link", rel="next", href=next_url)
    return b'<?xml version="1.0" encoding="utf-8" standalone="yes"?>' + ET.tostring(feed)


def atom_single(row: dict, now: datetime) -> bytes:
    holder = ET.Element("holder")
    _atom_entry(holder, row, now.strftime("%Y-%m-%dT%H:%M:%SZ"))
    return b'<?xml version="1.0" encoding="utf-8" standalone="yes"?>' + ET.tostring(holder[0])

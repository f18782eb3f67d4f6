"""A FreeMarker-subset template engine for the Expensify sandbox: it renders the templates clients send.

FreeMarker's sharp edges are kept on purpose (expensify.md §3, §9.2 item 2-3), so a template bug fails here too.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal, DivisionByZero, InvalidOperation, localcontext

__all__ = ["Template", "TemplateError", "TemplateSyntaxError", "render", "json_string", "js_string", "FmDate"]


class TemplateError(Exception):
    """A render failure; str() is FreeMarker-style text ("FreeMarker template error: ...")."""

    def __init__(self, message: str, text: str):
        super().__init__(text)
        self.message = message
        self.text = text


class TemplateSyntaxError(TemplateError):
    """The template does not parse (FreeMarker reports these before rendering anything)."""


class _Fail(Exception):
    def __init__(self, message: str, node=None, tip: str | None = None):
        super().__init__(message)
        self.message = message
        self.node = node
        self.tip = tip


class _SyntaxFail(Exception):
    def __init__(self, message: str, pos: int):
        super().__init__(message)
        self.message = message
        self.pos = pos


class _Break(Exception):
    pass


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING = _Missing()


class _EmptyMulti(str):
    """What `x!` yields with no default: an empty string, sequence and hash at once (FreeMarker manual)."""


EMPTY = _EmptyMulti("")


@dataclass(frozen=True)
class FmDate:
    """A date/time value; kind is "date", "datetime" or "time"."""

    value: datetime
    kind: str


_MISSING_TIP = ("Tip: If the failing expression is known to legally refer to something that's sometimes null or "
                "missing, either specify a default value like myOptionalVar!myDefault, or use "
                "<#if myOptionalVar??>when-present<#else>when-missing</#if>. (These only cover the last step of the "
                "expression; to cover the whole expression, use parenthesis: (myOptionalVar.foo)!myDefault, "
                "(myOptionalVar.foo)??")

# ---------------------------------------------------------------------------------------------------------------
# Escaping (FreeMarker's jsStringEnc rules, as documented for ?js_string / ?json_string)
# ---------------------------------------------------------------------------------------------------------------

_CTRL_SHORT = {"\n": "n", "\r": "r", "\f": "f", "\b": "b", "\t": "t"}


def _js_enc(s: str, json: bool) -> str:
    out = []
    n = len(s)
    for i, c in enumerate(s):
        o = ord(c)
        if (">" < c < "\x7f" and c != "\\") or c == " " or 0xA0 <= o < 0x2028:
            out.append(c)
            continue
        esc: str | None = None
        if o <= 0x1F:
            esc = "\\" + _CTRL_SHORT[c] if c in _CTRL_SHORT else _hex_esc(o, json)
        elif c == '"':
            esc = '\\"'
        elif c == "'":
            esc = None if json else "\\'"
        elif c == "\\":
            esc = "\\\\"
        elif c == "/" and (i == 0 or s[i - 1] == "<"):
            esc = "\\/"  # against "</script>" and the like
        elif c == ">":
            # against "]]>" and "-->"; at i == 0 we cannot know what came before
            if i == 0:
                dangerous = True
            else:
                prev = s[i - 1]
                dangerous = prev in "]-" and (i == 1 or s[i - 2] == prev)
            if dangerous:
                esc = "\\u003E" if json else "\\>"
        elif c == "<":
            dangerous = i == n - 1 or s[i + 1] in "!?"  # against "<!" and "<?"
            if dangerous:
                esc = _hex_esc(o, json)
        elif 0x7F <= o <= 0x9F or o in (0x2028, 0x2029):
            esc = _hex_esc(o, json)
        out.append(c if esc is None else esc)
    return "".join(out)


def _hex_esc(o: int, json: bool) -> str:
    if not json and o < 0x100:
        return "\\x%02X" % o
    return "\\u%04X" % o


def json_string(s: str) -> str:
    """FreeMarker's ?json_string."""
    return _js_enc(s, json=True)


def js_string(s: str) -> str:
    """FreeMarker's ?js_string (also escapes the apostrophe)."""
    return _js_enc(s, json=False)


# ---------------------------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------------------------


def _is_number(v) -> bool:
    return isinstance(v, (int, float, Decimal)) and not isinstance(v, bool)


def _is_seq(v) -> bool:
    return isinstance(v, (list, tuple)) or v is EMPTY


def _is_hash(v) -> bool:
    return isinstance(v, Mapping) or v is EMPTY


def _type_name(v) -> str:
    if v is MISSING or v is None:
        return "missing"
    if isinstance(v, bool):
        return "boolean"
    if _is_number(v):
        return "number"
    if v is EMPTY:
        return "string (wrapper: multi-type empty value)"
    if isinstance(v, str):
        return "string"
    if isinstance(v, FmDate):
        return "date"
    if isinstance(v, (list, tuple)):
        return "sequence"
    if isinstance(v, Mapping):
        return "extended_hash"
    if callable(v):
        return "method"
    return type(v).__name__


def _dec(v) -> Decimal:
    if isinstance(v, Decimal):
        return v
    if isinstance(v, float):
        return Decimal(repr(v))
    return Decimal(v)


def _norm_number(v):
    if isinstance(v, float):
        return Decimal(repr(v))
    return v


def _fmt_pattern(n, pattern: str) -> str:
    """A subset of Java DecimalFormat, en_US symbols, HALF_EVEN rounding."""
    if pattern in ("computer", "c"):
        return _fmt_c(n)
    if pattern == "number" or pattern == "":
        pattern = "#,##0.###"
    elif pattern == "0":
        pattern = "0"
    if not re.fullmatch(r"[#0,]*(\.[#0]*)?", pattern):
        raise _Fail(f'Unsupported number format pattern (sandbox subset): "{pattern}"')
    ip, _, fp = pattern.partition(".")
    group = len(ip) - ip.rfind(",") - 1 if "," in ip else 0
    min_int = ip.count("0")
    min_frac = fp.count("0")
    max_frac = len(fp)
    with localcontext() as ctx:
        ctx.prec = 80
        d = _dec(n).quantize(Decimal(1).scaleb(-max_frac), rounding=ROUND_HALF_EVEN)
    negative = d < 0
    s = format(abs(d), "f")
    int_part, _, frac = s.partition(".")
    frac = frac.rstrip("0")
    frac = frac + "0" * (min_frac - len(frac))
    int_part = int_part.lstrip("0")
    int_part = "0" * (min_int - len(int_part)) + int_part
    if group and len(int_part) > group:
        head = len(int_part) % group or group
        parts = [int_part[:head]] + [int_part[i:i + group] for i in range(head, len(int_part), group)]
        int_part = ",".join(parts)
    out = int_part + ("." + frac if frac else "")
    if not out:
        out = "0"
    if negative and out.strip("0.,"):
        out = "-" + out
    return out


def _fmt_c(n) -> str:
    """?c: no grouping, at most 16 fraction digits, never an exponent."""
    if isinstance(n, int):
        return str(n)
    with localcontext() as ctx:
        ctx.prec = 80
        d = _dec(n)
        if d == d.to_integral_value():
            return str(int(d))
        d = d.quantize(Decimal(1).scaleb(-16), rounding=ROUND_HALF_EVEN)
    s = format(d, "f")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


_DATE_TOKEN = re.compile(r"y+|M+|d+|H+|h+|m+|s+|S+|a|E+|'[^']*'|.", re.S)
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_DEFAULT_DATE_FORMATS = {"date": "MMM d, yyyy", "datetime": "MMM d, yyyy h:mm:ss a", "time": "h:mm:ss a"}


def _fmt_date(v: datetime, pattern: str) -> str:
    out = []
    for tok in _DATE_TOKEN.findall(pattern):
        c, k = tok[0], len(tok)
        if c == "y":
            out.append(str(v.year)[-2:] if k == 2 else str(v.year).zfill(k))
        elif c == "M":
            name = _MONTHS[v.month - 1]
            out.append(name if k >= 4 else name[:3] if k == 3 else str(v.month).zfill(k))
        elif c == "d":
            out.append(str(v.day).zfill(k))
        elif c == "H":
            out.append(str(v.hour).zfill(k))
        elif c == "h":
            out.append(str((v.hour % 12) or 12).zfill(k))
        elif c == "m":
            out.append(str(v.minute).zfill(k))
        elif c == "s":
            out.append(str(v.second).zfill(k))
        elif c == "S":
            out.append(str(v.microsecond // 1000).zfill(k))
        elif c == "a":
            out.append("AM" if v.hour < 12 else "PM")
        elif c == "E":
            out.append(_DAYS[v.weekday()] if k >= 4 else _DAYS[v.weekday()][:3])
        elif c == "'":
            out.append(tok[1:-1] or "'")
        else:
            out.append(tok)
    return "".join(out)


def _parse_date(s: str, pattern: str, kind: str) -> FmDate | None:
    rx = []
    names = []
    for tok in _DATE_TOKEN.findall(pattern):
        c = tok[0]
        if c in "yMdHhmsS" and not (c == "M" and len(tok) >= 3):
            rx.append(r"(\d{1,%d})" % max(len(tok), 4 if c == "y" else 2))
            names.append(c)
        elif c == "M":
            rx.append(r"([A-Za-z]{3,9})")
            names.append("Mtext")
        elif c == "a":
            rx.append(r"(AM|PM|am|pm)")
            names.append("a")
        elif c == "E":
            rx.append(r"[A-Za-z]+")
        elif c == "'":
            rx.append(re.escape(tok[1:-1] or "'"))
        else:
            rx.append(re.escape(tok))
    # SimpleDateFormat.parse(String) reads a prefix and ignores the rest (so "… 18:02:11"?date("yyyy-MM-dd") works)
    m = re.match("".join(rx), s.strip())
    if not m:
        return None
    parts = dict(year=1970, month=1, day=1, hour=0, minute=0, second=0, microsecond=0)
    pm = None
    for name, val in zip(names, m.groups()):
        if name == "y":
            parts["year"] = int(val)
        elif name == "M":
            parts["month"] = int(val)
        elif name == "Mtext":
            matches = [i for i, mo in enumerate(_MONTHS) if mo.lower().startswith(val.lower()[:3])]
            if not matches:
                return None
            parts["month"] = matches[0] + 1
        elif name == "d":
            parts["day"] = int(val)
        elif name in "Hh":
            parts["hour"] = int(val)
        elif name == "m":
            parts["minute"] = int(val)
        elif name == "s":
            parts["second"] = int(val)
        elif name == "S":
            parts["microsecond"] = int(val) * 1000
        elif name == "a":
            pm = val.upper() == "PM"
    if pm is not None:
        parts["hour"] = parts["hour"] % 12 + (12 if pm else 0)
    try:
        return FmDate(datetime(**parts), kind)
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------------------------
# Expression lexer and parser
# ---------------------------------------------------------------------------------------------------------------

_SYMBOLS = ("..<", "..!", "..*", "??", "!=", "==", "<=", ">=", "&&", "||", "+=", "-=", "*=", "/=", "%=", "++", "--",
            "/>", "..", "=", "!", "<", ">", "+", "-", "*", "/", "%", "?", ".", ",", ":", "(", ")", "[", "]", "{",
            "}", ";")
_NAME_RE = re.compile(r"[A-Za-z_$@][A-Za-z0-9_$@]*")
_NUM_RE = re.compile(r"\d+(\.\d+)?")


@dataclass
class _Tok:
    kind: str  # num, str, name, op, eof
    value: object
    start: int
    end: int


class _Parser:
    def __init__(self, src: str, pos: int, tag_mode: bool):
        self.src = src
        self.pos = pos
        self.tag_mode = tag_mode
        self.depth = 0
        self._peeked: tuple[int, int, _Tok] | None = None

    # -- lexing --
    def _lex(self) -> _Tok:
        src, i, n = self.src, self.pos, len(self.src)
        while i < n and src[i] in " \t\r\n":
            i += 1
        if i >= n:
            return _Tok("eof", None, i, i)
        c = src[i]
        if c in "\"'" or (c == "r" and i + 1 < n and src[i + 1] in "\"'"):
            raw = c == "r"
            q = src[i + 1] if raw else c
            j = i + (2 if raw else 1)
            while j < n and src[j] != q:
                j += 1 if raw or src[j] != "\\" else 2
            if j >= n:
                raise _SyntaxFail("String literal was not closed", i)
            return _Tok("str", (i + (2 if raw else 1), j, raw), i, j + 1)
        m = _NUM_RE.match(src, i)
        if m:
            # "1..3" is a range, not the number "1."
            return _Tok("num", m.group(), i, m.end())
        m = _NAME_RE.match(src, i)
        if m:
            return _Tok("name", m.group(), i, m.end())
        if c == ">" and self.tag_mode and self.depth == 0:
            return _Tok("op", ">", i, i + 1)  # at top level of a tag, ">" closes it (even in ">=")
        for sym in _SYMBOLS:
            if src.startswith(sym, i):
                return _Tok("op", sym, i, i + len(sym))
        raise _SyntaxFail(f'Unexpected character "{c}"', i)

    def peek(self) -> _Tok:
        key = (self.pos, self.depth)
        if self._peeked is None or self._peeked[:2] != key:
            self._peeked = (self.pos, self.depth, self._lex())
        return self._peeked[2]

    def next(self) -> _Tok:
        tok = self.peek()
        self.pos = tok.end
        return tok

    def at(self, kind: str, value=None) -> bool:
        tok = self.peek()
        return tok.kind == kind and (value is None or tok.value == value)

    def expect(self, kind: str, value=None) -> _Tok:
        tok = self.peek()
        if not self.at(kind, value):
            found = "end of template" if tok.kind == "eof" else repr(self.src[tok.start:tok.end])
            raise _SyntaxFail(f"Expected {value or kind}, but found {found}", tok.start)
        return self.next()

    def _open(self):
        self.depth += 1

    def _close(self, sym: str):
        self.depth -= 1
        self.expect("op", sym)

    # -- grammar --
    def parse_expression(self):
        return self._or()

    def _bin(self, sub, ops):
        left = sub()
        while True:
            tok = self.peek()
            if not ((tok.kind == "op" and tok.value in ops) or (tok.kind == "name" and tok.value in ops)):
                return left
            if tok.value == ">" and self.tag_mode and self.depth == 0:
                return left  # closes the tag; write "gt" or use parentheses to compare (FreeMarker manual)
            self.next()
            right = sub()
            left = _BinOp(tok.value, left, right, left.start, right.end)

    def _or(self):
        return self._bin(self._and, ("||",))

    def _and(self):
        return self._bin(self._eq, ("&&",))

    def _eq(self):
        return self._bin(self._rel, ("==", "=", "!="))

    def _rel(self):
        return self._bin(self._range, ("<", "<=", ">", ">=", "lt", "lte", "gt", "gte"))

    def _range(self):
        left = self._add()
        tok = self.peek()
        if tok.kind == "op" and tok.value in ("..", "..<", "..!", "..*"):
            self.next()
            right = None
            if self._starts_expression():
                right = self._add()
            return _Range(left, right, tok.value != "..", left.start, (right or left).end)
        return left

    def _add(self):
        return self._bin(self._mul, ("+", "-"))

    def _mul(self):
        return self._bin(self._unary, ("*", "/", "%"))

    def _unary(self):
        tok = self.peek()
        if tok.kind == "op" and tok.value in ("!", "-", "+"):
            self.next()
            operand = self._unary()
            return _Unary(tok.value, operand, tok.start, operand.end)
        return self._postfix()

    def _starts_expression(self) -> bool:
        tok = self.peek()
        if tok.kind in ("num", "str"):
            return True
        if tok.kind == "name":
            return tok.value not in ("as", "in", "using", "lt", "lte", "gt", "gte")
        return tok.kind == "op" and tok.value in ("(", "[", "{", "!", "-", "+")

    def _postfix(self):
        node = self._primary()
        while True:
            tok = self.peek()
            if tok.kind != "op":
                return node
            if tok.value == ".":
                self.next()
                name = self.peek()
                if name.kind != "name":
                    raise _SyntaxFail("Expected a name after '.'", name.start)
                self.next()
                node = _Dot(node, name.value, node.start, name.end)
            elif tok.value == "[":
                self.next()
                self._open()
                key = self.parse_expression()
                end = self.peek().end
                self._close("]")
                node = _Index(node, key, node.start, end)
            elif tok.value == "(":
                self.next()
                self._open()
                args = self._args(")")
                end = self.peek().end
                self._close(")")
                node = _Call(node, args, node.start, end)
            elif tok.value == "?":
                self.next()
                name = self.peek()
                if name.kind != "name":
                    raise _SyntaxFail("Expected a built-in name after '?'", name.start)
                self.next()
                if name.value not in _BUILTINS:
                    raise _SyntaxFail(f'Unknown built-in: "{name.value}"', name.start)
                args = None
                end = name.end
                if self.at("op", "("):
                    self.next()
                    self._open()
                    args = self._args(")")
                    end = self.peek().end
                    self._close(")")
                node = _BuiltIn(node, name.value, args, node.start, end)
            elif tok.value == "??":
                self.next()
                node = _Exists(node, node.start, tok.end)
            elif tok.value == "!":
                # FreeMarker 2.3.x: the right side of "!" has very low precedence: x!1 + y means x!(1 + y)
                self.next()
                default = self.parse_expression() if self._starts_expression() else None
                return _Default(node, default, node.start, default.end if default else tok.end)
            else:
                return node

    def _args(self, closer: str) -> list:
        args = []
        if self.at("op", closer):
            return args
        while True:
            args.append(self.parse_expression())
            if not self.at("op", ","):
                return args
            self.next()

    def _primary(self):
        tok = self.next()
        if tok.kind == "num":
            value = int(tok.value) if "." not in tok.value else Decimal(tok.value)
            return _Const(value, tok.start, tok.end)
        if tok.kind == "str":
            return self._string_literal(tok)
        if tok.kind == "name":
            if tok.value == "true":
                return _Const(True, tok.start, tok.end)
            if tok.value == "false":
                return _Const(False, tok.start, tok.end)
            return _Name(tok.value, tok.start, tok.end)
        if tok.kind == "op" and tok.value == "(":
            self._open()
            inner = self.parse_expression()
            end = self.peek().end
            self._close(")")
            return _Paren(inner, tok.start, end)
        if tok.kind == "op" and tok.value == "[":
            self._open()
            items = self._args("]")
            end = self.peek().end
            self._close("]")
            return _SeqLit(items, tok.start, end)
        if tok.kind == "op" and tok.value == "{":
            self._open()
            pairs = []
            while not self.at("op", "}"):
                k = self.parse_expression()
                self.expect("op", ":")
                v = self.parse_expression()
                pairs.append((k, v))
                if not self.at("op", ","):
                    break
                self.next()
            end = self.peek().end
            self._close("}")
            return _HashLit(pairs, tok.start, end)
        if tok.kind == "op" and tok.value == ".":
            name = self.expect("name")
            return _Special(name.value, tok.start, name.end)
        what = "end of template" if tok.kind == "eof" else repr(self.src[tok.start:tok.end])
        raise _SyntaxFail(f"Expected an expression, but found {what}", tok.start)

    def _string_literal(self, tok: _Tok):
        start, end, raw = tok.value
        src = self.src
        if raw:
            return _Const(src[start:end], tok.start, tok.end)
        parts: list = []
        buf: list[str] = []
        i = start
        while i < end:
            c = src[i]
            if c == "\\":
                if i + 1 >= end:
                    raise _SyntaxFail("Unfinished escape in string literal", i)
                e = src[i + 1]
                simple = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "b": "\b", '"': '"', "'": "'", "\\": "\\",
                          "$": "$", "{": "{", "l": "<", "g": ">", "a": "&"}
                if e in simple:
                    buf.append(simple[e])
                    i += 2
                elif e == "x":
                    m = re.match(r"[0-9A-Fa-f]{1,4}", src[i + 2:end])
                    if not m:
                        raise _SyntaxFail("Invalid \\x escape in string literal", i)
                    buf.append(chr(int(m.group(), 16)))
                    i += 2 + len(m.group())
                else:
                    raise _SyntaxFail(f"Unsupported escape sequence \\{e} in string literal", i)
            elif c == "$" and src.startswith("${", i):
                if buf:
                    parts.append("".join(buf))
                    buf = []
                sub = _Parser(src, i + 2, tag_mode=False)
                expr = sub.parse_expression()
                close = sub.expect("op", "}")
                parts.append(_Interp(expr, i, close.end))
                i = close.end
            else:
                buf.append(c)
                i += 1
        if buf:
            parts.append("".join(buf))
        if all(isinstance(p, str) for p in parts):
            return _Const("".join(parts), tok.start, tok.end)
        return _StrTemplate(parts, tok.start, tok.end)


# ---------------------------------------------------------------------------------------------------------------
# Expression nodes
# ---------------------------------------------------------------------------------------------------------------


class _Expr(ABC):
    start = 0
    end = 0

    def ev(self, env: "_Env"):
        v = self.ev_maybe(env)
        if v is MISSING:
            raise _Fail("The following has evaluated to null or missing:", self, tip=_MISSING_TIP)
        return v

    @abstractmethod
    def ev_maybe(self, env: "_Env"):
        """The expression's value, or MISSING where FreeMarker would see null or missing."""


@dataclass
class _Const(_Expr):
    value: object
    start: int
    end: int

    def ev_maybe(self, env):
        return self.value


@dataclass
class _StrTemplate(_Expr):
    parts: list
    start: int
    end: int

    def ev_maybe(self, env):
        return "".join(p if isinstance(p, str) else env.to_output(p.expr) for p in self.parts)


@dataclass
class _Name(_Expr):
    name: str
    start: int
    end: int

    def ev_maybe(self, env):
        return env.lookup(self.name)


@dataclass
class _Special(_Expr):
    name: str
    start: int
    end: int

    def ev_maybe(self, env):
        if self.name == "now":
            return FmDate(env.now(), "datetime")
        if self.name in ("vars", "data_model"):
            return env.model
        raise _Fail(f'Unknown special variable: ".{self.name}" (not supported by the sandbox)', self)


@dataclass
class _Paren(_Expr):
    inner: _Expr
    start: int
    end: int

    def ev_maybe(self, env):
        # Parentheses let !, ?? and ?has_content cover every step of the inner expression (FreeMarker manual)
        try:
            return self.inner.ev_maybe(env)
        except _Fail as exc:
            if exc.tip is _MISSING_TIP:
                return MISSING
            raise


@dataclass
class _Dot(_Expr):
    target: _Expr
    key: str
    start: int
    end: int

    def ev_maybe(self, env):
        container = self.target.ev(env)
        return _get_key(container, self.key, self.target)


def _get_key(container, key, node):
    if container is EMPTY:
        return MISSING
    if isinstance(container, Mapping):
        v = container.get(key, MISSING)
        return MISSING if v is None else _norm_number(v)
    raise _Fail(f"Expected a hash, but this has evaluated to a {_type_name(container)}:", node)


@dataclass
class _Index(_Expr):
    target: _Expr
    key: _Expr
    start: int
    end: int

    def ev_maybe(self, env):
        container = self.target.ev(env)
        if isinstance(self.key, _Range):
            lo, hi = self.key.bounds(env, container)
            if isinstance(container, str):
                return container[lo:hi]
            if _is_seq(container):
                return list(container[lo:hi])
            raise _Fail(f"Expected a sequence or string, but this has evaluated to a {_type_name(container)}:",
                        self.target)
        key = self.key.ev(env)
        if isinstance(key, str):
            return _get_key(container, key, self.target)
        if _is_number(key):
            idx = int(key)
            if isinstance(container, str) and container is not EMPTY:
                return container[idx] if 0 <= idx < len(container) else MISSING
            if _is_seq(container):
                seq = [] if container is EMPTY else container
                return _norm_number(seq[idx]) if 0 <= idx < len(seq) and seq[idx] is not None else MISSING
            raise _Fail(f"Expected a sequence, but this has evaluated to a {_type_name(container)}:", self.target)
        raise _Fail(f"Expected a string or number as key, but this has evaluated to a {_type_name(key)}:", self.key)


@dataclass
class _Range(_Expr):
    lo: _Expr
    hi: _Expr | None
    exclusive: bool
    start: int
    end: int

    def bounds(self, env, container):
        lo = int(_need_number(self.lo.ev(env), self.lo))
        if self.hi is None:
            return lo, len(container)
        hi = int(_need_number(self.hi.ev(env), self.hi))
        return lo, hi if self.exclusive else hi + 1

    def ev_maybe(self, env):
        lo = int(_need_number(self.lo.ev(env), self.lo))
        if self.hi is None:
            raise _Fail("Right-unbounded ranges are not supported by the sandbox outside [] slicing", self)
        hi = int(_need_number(self.hi.ev(env), self.hi))
        if self.exclusive:
            return list(range(lo, hi)) if hi >= lo else list(range(lo, hi, -1))
        return list(range(lo, hi + 1)) if hi >= lo else list(range(lo, hi - 1, -1))


@dataclass
class _Call(_Expr):
    target: _Expr
    args: list
    start: int
    end: int

    def ev_maybe(self, env):
        fn = self.target.ev(env)
        if not callable(fn) or isinstance(fn, (Mapping, list, tuple, str)):
            raise _Fail(f"Expected a method, but this has evaluated to a {_type_name(fn)}:", self.target)
        result = fn(*[a.ev(env) for a in self.args])
        return MISSING if result is None else _norm_number(result)


@dataclass
class _Exists(_Expr):
    target: _Expr
    start: int
    end: int

    def ev_maybe(self, env):
        return self.target.ev_maybe(env) is not MISSING


@dataclass
class _Default(_Expr):
    target: _Expr
    default: _Expr | None
    start: int
    end: int

    def ev_maybe(self, env):
        v = self.target.ev_maybe(env)
        if v is not MISSING:
            return v
        return EMPTY if self.default is None else self.default.ev(env)


@dataclass
class _Unary(_Expr):
    op: str
    operand: _Expr
    start: int
    end: int

    def ev_maybe(self, env):
        v = self.operand.ev(env)
        if self.op == "!":
            return not _need_bool(v, self.operand)
        n = _need_number(v, self.operand)
        return -n if self.op == "-" else n


@dataclass
class _SeqLit(_Expr):
    items: list
    start: int
    end: int

    def ev_maybe(self, env):
        return [i.ev(env) for i in self.items]


@dataclass
class _HashLit(_Expr):
    pairs: list
    start: int
    end: int

    def ev_maybe(self, env):
        out = {}
        for k, v in self.pairs:
            key = k.ev(env)
            if not isinstance(key, str):
                raise _Fail(f"Expected a string as hash key, but this has evaluated to a {_type_name(key)}:", k)
            out[key] = v.ev(env)
        return out


@dataclass
class _Interp:
    expr: _Expr
    start: int
    end: int


def _need_number(v, node):
    if _is_number(v):
        return _norm_number(v)
    raise _Fail(f"Expected a number, but this has evaluated to a {_type_name(v)}:", node)


def _need_bool(v, node):
    if isinstance(v, bool):
        return v
    raise _Fail(f"Expected a boolean, but this has evaluated to a {_type_name(v)}:", node)


def _need_string(v, node, what="string"):
    if isinstance(v, str):
        return str(v)
    raise _Fail(f"Expected a {what}, but this has evaluated to a {_type_name(v)}:", node)


def _divide(a, b):
    # FreeMarker's default BigDecimal arithmetic: scale max(12, operand scales), HALF_UP (ArithmeticEngine docs)
    da, db = _dec(a), _dec(b)
    scale = max(12, -da.as_tuple().exponent, -db.as_tuple().exponent)
    with localcontext() as ctx:
        ctx.prec = 100
        return (da / db).quantize(Decimal(1).scaleb(-scale), rounding=ROUND_HALF_UP)


@dataclass
class _BinOp(_Expr):
    op: str
    left: _Expr
    right: _Expr
    start: int
    end: int

    def ev_maybe(self, env):
        op = self.op
        if op in ("&&", "||"):
            lv = _need_bool(self.left.ev(env), self.left)
            if op == "&&" and not lv:
                return False
            if op == "||" and lv:
                return True
            return _need_bool(self.right.ev(env), self.right)
        a = self.left.ev(env)
        b = self.right.ev(env)
        if op in ("==", "=", "!="):
            return _equals(a, b, self) == (op != "!=")
        if op in ("<", "<=", ">", ">=", "lt", "lte", "gt", "gte"):
            if _is_number(a) and _is_number(b):
                x, y = _dec(a), _dec(b)
            elif isinstance(a, FmDate) and isinstance(b, FmDate):
                x, y = a.value, b.value
            else:
                raise _Fail(f'Can\'t use operator "{op}" on {_type_name(a)} and {_type_name(b)} values; '
                            "only numbers and dates can be compared that way.", self)
            sym = {"lt": "<", "lte": "<=", "gt": ">", "gte": ">="}.get(op, op)
            return {"<": x < y, "<=": x <= y, ">": x > y, ">=": x >= y}[sym]
        if op == "+":
            if _is_number(a) and _is_number(b):
                return _norm_number(a) + _norm_number(b)
            if isinstance(a, str) or isinstance(b, str):
                return env.scalar_to_string(a, self.left) + env.scalar_to_string(b, self.right)
            if _is_seq(a) and _is_seq(b):
                return list(a) + list(b)
            if _is_hash(a) and _is_hash(b):
                return {**a, **b}
            raise _Fail(f"Can't add a {_type_name(a)} and a {_type_name(b)}.", self)
        x = _need_number(a, self.left)
        y = _need_number(b, self.right)
        try:
            if op == "-":
                return x - y
            if op == "*":
                return x * y
            if op == "/":
                return _divide(x, y)
            if op == "%":
                return _dec(x) % _dec(y) if not (isinstance(x, int) and isinstance(y, int)) else int(_dec(x) % _dec(y))
        except (DivisionByZero, InvalidOperation, ZeroDivisionError):
            raise _Fail("Arithmetic operation failed: division by zero", self) from None
        raise _Fail(f"Unknown operator {op}", self)


def _equals(a, b, node) -> bool:
    if _is_number(a) and _is_number(b):
        return _dec(a) == _dec(b)
    if isinstance(a, bool) and isinstance(b, bool):
        return a == b
    if isinstance(a, str) and isinstance(b, str):
        return str(a) == str(b)
    if isinstance(a, FmDate) and isinstance(b, FmDate):
        return a.value == b.value
    raise _Fail("Can't compare values of these types. Allowed comparisons are between two numbers, two strings, "
                f"two dates, or two booleans.\nLeft hand operand is a {_type_name(a)}.\n"
                f"Right hand operand is a {_type_name(b)}.", node)


# ---------------------------------------------------------------------------------------------------------------
# Built-ins
# ---------------------------------------------------------------------------------------------------------------

_LOOP_BUILTINS = {"index", "counter", "has_next", "is_last", "is_first", "item_parity", "item_parity_cap",
                  "is_even_item", "is_odd_item", "item_cycle"}
# Built-ins that accept a missing left side (like ?? and !, they cover only the last step unless parenthesised)
_MISSING_OK = {"has_content", "if_exists", "default", "exists"}


def _args(node, env, lo, hi=None):
    args = node.args or []
    hi = lo if hi is None else hi
    if not lo <= len(args) <= hi:
        want = str(lo) if lo == hi else f"{lo} to {hi}"
        raise _Fail(f'?{node.name} expects {want} argument(s), but has received {len(args)}.', node)
    return [a.ev(env) for a in args]


def _bi_string(v, node, env):
    if node.args is None:
        if isinstance(v, bool):
            return "true" if v else "false"  # legacy boolean_format "true,false"
        return env.scalar_to_string(v, node.target)
    args = _args(node, env, 1, 2)
    if isinstance(v, bool):
        if len(args) != 2:
            raise _Fail("?string(...) on a boolean expects 2 arguments.", node)
        return _need_string(args[0 if v else 1], node)
    if _is_number(v):
        return _fmt_pattern(v, _need_string(args[0], node))
    if isinstance(v, FmDate):
        return _fmt_date(v.value, _need_string(args[0], node))
    if isinstance(v, str):
        return str(v)
    raise _Fail(f"Expected a string, number, date or boolean, but this has evaluated to a {_type_name(v)}:",
                node.target)


def _bi_replace(s, node, env):
    args = _args(node, env, 2, 3)
    old, new = _need_string(args[0], node), _need_string(args[1], node)
    flags = _need_string(args[2], node) if len(args) == 3 else ""
    if "r" in flags:
        return re.sub(old, new.replace("$", "\\"), s, count=1 if "f" in flags else 0,
                      flags=re.I if "i" in flags else 0)
    if "i" in flags:
        return re.sub(re.escape(old), lambda _m: new, s, count=1 if "f" in flags else 0, flags=re.I)
    if old == "":
        return new + new.join(s) + new
    return s.replace(old, new, 1 if "f" in flags else -1)


def _bi_number(s, node):
    text = s.strip()
    if not re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", text):
        raise _Fail(f"Can't convert this string to number: \"{s}\"", node.target)
    d = Decimal(text)
    return int(d) if re.fullmatch(r"[+-]?\d+", text) else d


def _bi_date(v, node, env, kind):
    if isinstance(v, FmDate):
        return FmDate(v.value, kind)
    s = _need_string(v, node.target, "string or date")
    if not node.args:
        raise _Fail(f'Can\'t convert the string to {kind}, because the "{kind}_format" setting is not set; '
                    f'use ?{kind}("pattern").', node)
    pattern = _need_string(_args(node, env, 1)[0], node)
    parsed = _parse_date(s, pattern, kind)
    if parsed is None:
        raise _Fail(f'The string doesn\'t match the expected date/time/date-time format. The string to parse was: '
                    f'"{s}". The expected format was: "{pattern}".', node.target)
    return parsed


def _has_content(v) -> bool:
    if v is MISSING or v is None:
        return False
    if isinstance(v, (str, list, tuple, Mapping)):
        return len(v) > 0
    return True


def _round_int(n, mode):
    with localcontext() as ctx:
        ctx.prec = 80
        return int(_dec(n).quantize(Decimal(1), rounding=mode))


def _apply_builtin(node: "_BuiltIn", env: "_Env"):
    name = node.name
    if name in _LOOP_BUILTINS:
        return _loop_builtin(node, env)
    if name in _MISSING_OK:
        v = node.target.ev_maybe(env)
        if name == "has_content":
            return _has_content(v)
        if name == "exists":
            return v is not MISSING
        if name == "if_exists":
            return EMPTY if v is MISSING else v
        args = _args(node, env, 1)
        return args[0] if v is MISSING else v
    v = node.target.ev(env)
    t = node.target
    if name == "c":
        if isinstance(v, bool):
            return "true" if v else "false"
        # Older FreeMarker (before 2.3.32) has no ?c for strings: a quoted ID printed with ?c fails
        return _fmt_c(_need_number(v, t))
    if name == "string":
        return _bi_string(v, node, env)
    if name == "then":
        a, b = _args(node, env, 2)
        return a if _need_bool(v, t) else b
    if name in ("is_string", "is_number", "is_boolean", "is_hash", "is_sequence", "is_date", "is_method"):
        return {"is_string": isinstance(v, str), "is_number": _is_number(v), "is_boolean": isinstance(v, bool),
                "is_hash": _is_hash(v), "is_sequence": _is_seq(v), "is_date": isinstance(v, FmDate),
                "is_method": callable(v) and not isinstance(v, (Mapping, str, list, tuple))}[name]
    if name in ("size",):
        if _is_seq(v) or isinstance(v, Mapping):
            return len(v)
        raise _Fail(f"Expected a sequence or hash, but this has evaluated to a {_type_name(v)}:", t)
    if name in ("first", "last", "join", "reverse", "sort", "sort_by", "seq_contains", "seq_index_of", "chunk"):
        if not _is_seq(v):
            raise _Fail(f"Expected a sequence, but this has evaluated to a {_type_name(v)}:", t)
        seq = list(v) if v is not EMPTY else []
        if name == "first":
            return seq[0] if seq else MISSING
        if name == "last":
            return seq[-1] if seq else MISSING
        if name == "reverse":
            return seq[::-1]
        if name == "join":
            args = _args(node, env, 1, 3)
            sep = _need_string(args[0], node)
            if not seq and len(args) > 1:
                return _need_string(args[1], node)
            return sep.join(env.scalar_to_string(x, node) for x in seq)
        if name == "seq_contains":
            (x,) = _args(node, env, 1)
            return any(type(x) is type(y) and x == y for y in seq)
        if name == "seq_index_of":
            (x,) = _args(node, env, 1)
            return next((i for i, y in enumerate(seq) if type(x) is type(y) and x == y), -1)
        if name == "sort":
            return sorted(seq, key=lambda x: (_dec(x) if _is_number(x) else x))
        if name == "sort_by":
            (key,) = _args(node, env, 1)
            return sorted(seq, key=lambda x: x.get(key) if isinstance(x, Mapping) else x)
        raise _Fail("?chunk is not supported by the sandbox", node)
    if name in ("keys", "values"):
        if not isinstance(v, Mapping):
            raise _Fail(f"Expected a hash, but this has evaluated to a {_type_name(v)}:", t)
        return list(v.keys()) if name == "keys" else list(v.values())
    if name in ("round", "floor", "ceiling", "abs", "int", "is_infinite", "is_nan"):
        n = _need_number(v, t)
        if name == "abs":
            return abs(n)
        if name == "is_infinite" or name == "is_nan":
            return False
        mode = {"round": ROUND_HALF_UP, "floor": "ROUND_FLOOR", "ceiling": "ROUND_CEILING", "int": "ROUND_DOWN"}[name]
        return _round_int(n, mode)
    if name in ("date", "datetime", "time", "date_if_unknown", "datetime_if_unknown"):
        return _bi_date(v, node, env, name.replace("_if_unknown", ""))
    if name == "boolean":
        s = _need_string(v, t)
        if s not in ("true", "false"):
            raise _Fail(f'Can\'t convert this string to boolean: "{s}"', t)
        return s == "true"
    # everything left works on strings
    s = _need_string(v, t)
    if name == "length":
        return len(s)
    if name == "upper_case":
        return s.upper()
    if name == "lower_case":
        return s.lower()
    if name == "cap_first":
        return s[:1].upper() + s[1:]
    if name == "uncap_first":
        return s[:1].lower() + s[1:]
    if name == "capitalize":
        return re.sub(r"\S+", lambda m: m.group()[:1].upper() + m.group()[1:].lower(), s)
    if name == "trim":
        return s.strip(" \t\r\n\f\v\x00")
    if name == "json_string":
        return json_string(s)
    if name == "js_string":
        return js_string(s)
    if name in ("html", "xhtml", "xml"):
        out = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
        return out.replace("'", "&#39;" if name == "html" else "&#39;")
    if name == "url":
        from urllib.parse import quote
        return quote(s, safe="")
    if name == "replace":
        return _bi_replace(s, node, env)
    if name == "number":
        return _bi_number(s, node)
    if name in ("contains", "starts_with", "ends_with", "index_of", "last_index_of", "keep_before", "keep_after",
                "keep_before_last", "keep_after_last", "remove_beginning", "remove_ending", "ensure_starts_with",
                "ensure_ends_with", "split"):
        (arg,) = _args(node, env, 1)
        a = _need_string(arg, node)
        if name == "contains":
            return a in s
        if name == "starts_with":
            return s.startswith(a)
        if name == "ends_with":
            return s.endswith(a)
        if name == "index_of":
            return s.find(a)
        if name == "last_index_of":
            return s.rfind(a)
        if name == "keep_before":
            return s.split(a, 1)[0] if a in s else s
        if name == "keep_after":
            return s.split(a, 1)[1] if a in s else ""
        if name == "keep_before_last":
            return s.rsplit(a, 1)[0] if a in s else s
        if name == "keep_after_last":
            return s.rsplit(a, 1)[1] if a in s else ""
        if name == "remove_beginning":
            return s[len(a):] if s.startswith(a) else s
        if name == "remove_ending":
            return s[: len(s) - len(a)] if a and s.endswith(a) else s
        if name == "ensure_starts_with":
            return s if s.startswith(a) else a + s
        if name == "ensure_ends_with":
            return s if s.endswith(a) else s + a
        return s.split(a)
    if name in ("left_pad", "right_pad"):
        args = _args(node, env, 1, 2)
        width = int(_need_number(args[0], node))
        fill = _need_string(args[1], node) if len(args) == 2 else " "
        pad = (fill * width)[: max(0, width - len(s))]
        return pad + s if name == "left_pad" else s + pad
    if name == "substring":
        args = [int(_need_number(a, node)) for a in _args(node, env, 1, 2)]
        return s[args[0]:args[1]] if len(args) == 2 else s[args[0]:]
    if name == "chop_linebreak":
        return s[:-2] if s.endswith("\r\n") else s[:-1] if s.endswith(("\n", "\r")) else s
    if name == "word_list":
        return s.split()
    raise _Fail(f'Built-in "?{name}" is not supported by the sandbox', node)


_BUILTINS = _LOOP_BUILTINS | _MISSING_OK | {
    "c", "string", "then", "is_string", "is_number", "is_boolean", "is_hash", "is_sequence", "is_date", "is_method",
    "size", "first", "last", "join", "reverse", "sort", "sort_by", "seq_contains", "seq_index_of", "chunk", "keys",
    "values", "round", "floor", "ceiling", "abs", "int", "is_infinite", "is_nan", "date", "datetime", "time",
    "date_if_unknown", "datetime_if_unknown", "boolean", "length", "upper_case", "lower_case", "cap_first",
    "uncap_first", "capitalize", "trim", "json_string", "js_string", "html", "xhtml", "xml", "url", "replace",
    "number", "contains", "starts_with", "ends_with", "index_of", "last_index_of", "keep_before", "keep_after",
    "keep_before_last", "keep_after_last", "remove_beginning", "remove_ending", "ensure_starts_with",
    "ensure_ends_with", "split", "left_pad", "right_pad", "substring", "chop_linebreak", "word_list",
}


def _loop_builtin(node, env):
    if not isinstance(node.target, _Name):
        raise _Fail(f"The left hand operand of ?{node.name} must be a loop variable.", node)
    frame = env.loop_frame(node.target.name)
    if frame is None:
        raise _Fail(f"The left hand operand of ?{node.name} must be a loop variable, but there's no loop "
                    f"variable in scope with this name: {node.target.name}", node)
    i, has_next = frame.index, frame.has_next
    name = node.name
    if name == "item_cycle":
        args = _args(node, env, 1, 99)
        return args[i % len(args)]
    return {"index": i, "counter": i + 1, "has_next": has_next, "is_last": not has_next, "is_first": i == 0,
            "item_parity": "odd" if i % 2 == 0 else "even", "item_parity_cap": "Odd" if i % 2 == 0 else "Even",
            "is_even_item": i % 2 == 1, "is_odd_item": i % 2 == 0}[name]


@dataclass
class _BuiltIn(_Expr):
    target: _Expr
    name: str
    args: list | None
    start: int
    end: int

    def ev_maybe(self, env):
        return _apply_builtin(self, env)


# ---------------------------------------------------------------------------------------------------------------
# Template structure
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Text:
    text: str
    start: int = 0
    end: int = 0


@dataclass
class _If:
    branches: list  # [(cond, body)]
    else_body: list | None
    start: int
    end: int


@dataclass
class _List:
    seq: _Expr
    loop_vars: list | None
    body: list
    else_body: list | None
    start: int
    end: int


@dataclass
class _Items:
    loop_vars: list
    body: list
    start: int
    end: int


@dataclass
class _Sep:
    body: list
    start: int
    end: int


@dataclass
class _Assign:
    ops: list  # [(name, op, expr|None)]
    capture: list | None
    start: int
    end: int


@dataclass
class _Setting:
    name: str
    expr: _Expr
    start: int
    end: int


@dataclass
class _BreakNode:
    start: int
    end: int


@dataclass
class _Compress:
    body: list
    start: int
    end: int


@dataclass
class _RawTok:
    kind: str  # text, interp, tag, end, comment
    name: str
    start: int
    end: int
    data: object = None


_DIRECTIVES = {"if", "elseif", "else", "list", "items", "sep", "assign", "global", "local", "setting", "break",
               "t", "lt", "rt", "nt", "compress", "ftl"}
_CLOSABLE = {"if", "list", "items", "sep", "assign", "global", "local", "compress"}


def _scan(src: str) -> list[_RawTok]:
    toks: list[_RawTok] = []
    pos = 0
    n = len(src)
    opener = re.compile(r"<#--|</#|<#|\$\{|</@|<@")
    while pos < n:
        m = opener.search(src, pos)
        if not m:
            toks.append(_RawTok("text", "", pos, n, src[pos:]))
            break
        if m.start() > pos:
            toks.append(_RawTok("text", "", pos, m.start(), src[pos:m.start()]))
        kind = m.group()
        if kind == "<#--":
            end = src.find("-->", m.end())
            if end < 0:
                raise _SyntaxFail("Unclosed comment", m.start())
            toks.append(_RawTok("comment", "", m.start(), end + 3))
            pos = end + 3
        elif kind == "${":
            p = _Parser(src, m.end(), tag_mode=False)
            expr = p.parse_expression()
            close = p.expect("op", "}")
            toks.append(_RawTok("interp", "", m.start(), close.end, expr))
            pos = close.end
        elif kind in ("<@", "</@"):
            raise _SyntaxFail("User-defined directives (<@...>) and macros are not supported by the sandbox",
                              m.start())
        else:
            nm = re.compile(r"[A-Za-z_]+").match(src, m.end())
            if not nm:
                toks.append(_RawTok("text", "", m.start(), m.end(), kind))
                pos = m.end()
                continue
            name = nm.group()
            if name not in _DIRECTIVES:
                raise _SyntaxFail(f'Unknown directive: #{name}', m.start())
            if kind == "</#":
                if name not in _CLOSABLE:
                    raise _SyntaxFail(f"#{name} has no closing tag", m.start())
                close = re.compile(r"\s*>").match(src, nm.end())
                if not close:
                    raise _SyntaxFail(f"Malformed closing tag </#{name}", m.start())
                toks.append(_RawTok("end", name, m.start(), close.end()))
                pos = close.end()
            else:
                data, end = _parse_tag_params(src, name, nm.end())
                toks.append(_RawTok("tag", name, m.start(), end, data))
                pos = end
    return toks


def _parse_tag_params(src: str, name: str, pos: int):
    p = _Parser(src, pos, tag_mode=True)

    def finish():
        tok = p.peek()
        if tok.kind == "op" and tok.value in (">", "/>"):
            return tok.end
        found = "end of template" if tok.kind == "eof" else repr(src[tok.start:tok.end])
        raise _SyntaxFail(f'Expected ">" to end the #{name} tag, but found {found}', tok.start)

    if name in ("if", "elseif"):
        expr = p.parse_expression()
        return expr, finish()
    if name in ("else", "sep", "break", "t", "lt", "rt", "nt", "compress"):
        return None, finish()
    if name == "ftl":
        while not (p.at("op", ">") or p.at("op", "/>") or p.at("eof")):
            p.next()
        return None, finish()
    if name == "list":
        seq = p.parse_expression()
        loop_vars = None
        if p.at("name", "as"):
            p.next()
            loop_vars = [p.expect("name").value]
            if p.at("op", ","):
                p.next()
                loop_vars.append(p.expect("name").value)
        return (seq, loop_vars), finish()
    if name == "items":
        p.expect("name", "as")
        loop_vars = [p.expect("name").value]
        if p.at("op", ","):
            p.next()
            loop_vars.append(p.expect("name").value)
        return loop_vars, finish()
    if name == "setting":
        key = p.expect("name").value
        p.expect("op", "=")
        return (key, p.parse_expression()), finish()
    # assign / global / local
    ops = []
    while p.at("name") or p.at("str"):
        tok = p.next()
        var = tok.value if tok.kind == "name" else p.src[tok.value[0]:tok.value[1]]
        if p.at("op") and p.peek().value in ("=", "+=", "-=", "*=", "/=", "%="):
            op = p.next().value
            ops.append((var, op, p.parse_expression()))
        elif p.at("op") and p.peek().value in ("++", "--"):
            ops.append((var, p.next().value, None))
        else:
            ops.append((var, "capture", None))
            break
        if p.at("op", ","):
            p.next()
    if not ops:
        raise _SyntaxFail(f"#{name} needs a variable name", pos)
    return ops, finish()


def _strip_whitespace(toks: list[_RawTok]) -> list[_RawTok]:
    """FreeMarker's white-space stripping plus <#t>/<#lt>/<#rt>, applied line by line."""
    pieces: list[_RawTok] = []
    for t in toks:
        if t.kind != "text":
            pieces.append(t)
            continue
        text = t.data
        start = t.start
        for line in re.findall(r"[^\r\n]*(?:\r\n|\n|\r)|[^\r\n]+", text):
            pieces.append(_RawTok("text", "", start, start + len(line), line))
            start += len(line)
    lines: list[list[_RawTok]] = [[]]
    for t in pieces:
        lines[-1].append(t)
        if t.kind == "text" and t.data.endswith(("\n", "\r")):
            lines.append([])
    out: list[_RawTok] = []
    for line in lines:
        names = {t.name for t in line if t.kind == "tag"}
        has_interp = any(t.kind == "interp" for t in line)
        has_ftl = any(t.kind in ("tag", "end", "comment") for t in line)
        texts_blank = all(t.data.strip(" \t\r\n") == "" for t in line if t.kind == "text")
        if "nt" not in names and has_ftl and not has_interp and texts_blank:
            line = [t for t in line if t.kind != "text"]
        else:
            if names & {"t", "lt"}:
                _trim(line, leading=True)
            if names & {"t", "rt"}:
                _trim(line, leading=False)
        out.extend(t for t in line if not (t.kind == "tag" and t.name in ("t", "lt", "rt", "nt")))
    return out


def _trim(line: list[_RawTok], leading: bool) -> None:
    order = range(len(line)) if leading else range(len(line) - 1, -1, -1)
    for i in order:
        t = line[i]
        if t.kind == "interp":
            return
        if t.kind != "text":
            continue
        stripped = t.data.lstrip(" \t") if leading else t.data.rstrip(" \t\r\n")
        line[i] = _RawTok("text", "", t.start, t.end, stripped)
        if stripped:
            return


class _TreeBuilder:
    def __init__(self, toks: list[_RawTok]):
        self.toks = toks
        self.i = 0

    def block(self, stop: set[str]) -> tuple[list, _RawTok | None]:
        nodes: list = []
        while self.i < len(self.toks):
            t = self.toks[self.i]
            key = ("/" + t.name) if t.kind == "end" else t.name if t.kind == "tag" else None
            if key in stop:
                return nodes, t
            self.i += 1
            if t.kind == "text":
                if t.data:
                    nodes.append(_Text(t.data, t.start, t.end))
            elif t.kind == "interp":
                nodes.append(_Interp(t.data, t.start, t.end))
            elif t.kind == "comment":
                continue
            elif t.kind == "end":
                raise _SyntaxFail(f"Unexpected closing tag </#{t.name}>", t.start)
            else:
                nodes.append(self.directive(t))
        return nodes, None

    def _need(self, tok, name, opener):
        if tok is None:
            raise _SyntaxFail(f"Unclosed #{name}; expected </#{name}> before the end of the template", opener.start)

    def directive(self, t: _RawTok):
        name = t.name
        if name == "if":
            branches = []
            cond = t.data
            else_body = None
            while True:
                body, stop = self.block({"elseif", "else", "/if"})
                self._need(stop, "if", t)
                self.i += 1
                branches.append((cond, body))
                if stop.name == "elseif" and stop.kind == "tag":
                    cond = stop.data
                    continue
                if stop.kind == "tag" and stop.name == "else":
                    else_body, stop2 = self.block({"/if"})
                    self._need(stop2, "if", t)
                    self.i += 1
                return _If(branches, else_body, t.start, t.end)
        if name == "list":
            seq, loop_vars = t.data
            body, stop = self.block({"else", "/list"})
            self._need(stop, "list", t)
            self.i += 1
            else_body = None
            if stop.kind == "tag":
                else_body, stop2 = self.block({"/list"})
                self._need(stop2, "list", t)
                self.i += 1
            return _List(seq, loop_vars, body, else_body, t.start, t.end)
        if name == "items":
            body, stop = self.block({"/items"})
            self._need(stop, "items", t)
            self.i += 1
            return _Items(t.data, body, t.start, t.end)
        if name == "sep":
            # <#sep> may omit its end tag; then it runs to the end of the enclosing list/items body
            body, stop = self.block({"/sep", "/list", "else", "/items"})
            if stop is not None and stop.kind == "end" and stop.name == "sep":
                self.i += 1
            return _Sep(body, t.start, t.end)
        if name in ("assign", "global", "local"):
            capture = None
            if t.data[-1][1] == "capture":
                capture, stop = self.block({"/" + name})
                self._need(stop, name, t)
                self.i += 1
            return _Assign(t.data, capture, t.start, t.end)
        if name == "setting":
            key, expr = t.data
            return _Setting(key, expr, t.start, t.end)
        if name == "break":
            return _BreakNode(t.start, t.end)
        if name == "compress":
            body, stop = self.block({"/compress"})
            self._need(stop, "compress", t)
            self.i += 1
            return _Compress(body, t.start, t.end)
        if name == "ftl":
            return _Text("", t.start, t.end)
        if name in ("elseif", "else"):
            raise _SyntaxFail(f"#{name} is not inside #if" + (" or #list" if name == "else" else ""), t.start)
        raise _SyntaxFail(f"Unexpected directive #{name}", t.start)


# ---------------------------------------------------------------------------------------------------------------
# Runtime
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Frame:
    vars: dict
    index: int
    has_next: bool


@dataclass
class _Env:
    model: Mapping
    now: Callable[[], datetime]
    globals: dict = field(default_factory=dict)
    loops: list = field(default_factory=list)
    items_stack: list = field(default_factory=list)
    number_format: str = "number"
    boolean_format: str = "true,false"
    date_formats: dict = field(default_factory=lambda: dict(_DEFAULT_DATE_FORMATS))

    def lookup(self, name: str):
        for frame in reversed(self.loops):
            if name in frame.vars:
                v = frame.vars[name]
                return MISSING if v is None else _norm_number(v)
        for suffix, attr in (("_index", "index"), ("_has_next", "has_next")):
            if name.endswith(suffix):
                frame = self.loop_frame(name[: -len(suffix)])
                if frame is not None:
                    return getattr(frame, attr)
        if name in self.globals:
            return self.globals[name]
        v = self.model.get(name, MISSING)
        return MISSING if v is None else _norm_number(v)

    def loop_frame(self, name: str) -> _Frame | None:
        for frame in reversed(self.loops):
            if name in frame.vars:
                return frame
        return None

    def scalar_to_string(self, v, node) -> str:
        if isinstance(v, bool):
            if self.boolean_format != "true,false":
                if self.boolean_format == "c":
                    return "true" if v else "false"
                yes, _, no = self.boolean_format.partition(",")
                return yes if v else no
            raise _Fail('Can\'t convert boolean to string automatically, because the "boolean_format" setting was '
                        '"true,false", which is the legacy deprecated default, and we treat it as if no format was '
                        "set. This is the default configuration; you should provide the format explicitly for each "
                        'place where you print a boolean, like ?c (for computer audience) or ?string("yes", "no").',
                        node)
        if isinstance(v, str):
            return str(v)
        if _is_number(v):
            return _fmt_pattern(v, self.number_format)
        if isinstance(v, FmDate):
            return _fmt_date(v.value, self.date_formats[v.kind])
        raise _Fail('Expected a string or something automatically convertible to string (number, date or boolean), '
                    f"but this has evaluated to a {_type_name(v)}:", node)

    def to_output(self, expr: _Expr) -> str:
        return self.scalar_to_string(expr.ev(self), expr)


class Template:
    """A parsed template. Parsing errors raise TemplateSyntaxError; render() raises TemplateError."""

    def __init__(self, source: str, name: str = "template"):
        self.source = source
        self.name = name
        try:
            raw = _strip_whitespace(_scan(source))
            builder = _TreeBuilder(raw)
            nodes, stop = builder.block(set())
            self.nodes = nodes
        except _SyntaxFail as exc:
            line, col = self._line_col(exc.pos)
            text = (f'FreeMarker template error:\nSyntax error in template "{name}" in line {line}, column {col}:\n'
                    f"{exc.message}")
            raise TemplateSyntaxError(exc.message, text) from None

    def _line_col(self, pos: int) -> tuple[int, int]:
        line = self.source.count("\n", 0, pos) + 1
        col = pos - (self.source.rfind("\n", 0, pos) + 1) + 1
        return line, col

    def _where(self, node) -> str:
        line, col = self._line_col(node.start)
        return f'[in template "{self.name}" at line {line}, column {col}]'

    def render(self, model: Mapping, now: Callable[[], datetime] | None = None) -> str:
        env = _Env(model=model, now=now or (lambda: datetime.now()))
        out: list[str] = []
        self._current = None
        try:
            self._exec(self.nodes, env, out)
        except _Fail as exc:
            text = ["FreeMarker template error:", exc.message]
            if exc.node is not None and hasattr(exc.node, "start"):
                text.append(f"==> {self.source[exc.node.start:exc.node.end]}  {self._where(exc.node)}")
            if exc.tip:
                text += ["", "----", exc.tip, "----"]
            if self._current is not None:
                snippet = self.source[self._current.start:self._current.end]
                text += ["", "----", 'FTL stack trace ("~" means nesting-related):',
                         f"\t- Failed at: {snippet}  {self._where(self._current)}", "----"]
            raise TemplateError(exc.message, "\n".join(text)) from None
        except _Break:
            pass
        return "".join(out)

    def _exec(self, nodes: list, env: _Env, out: list[str]) -> None:
        for node in nodes:
            if isinstance(node, _Text):
                out.append(node.text)
                continue
            self._current = node
            if isinstance(node, _Interp):
                out.append(env.to_output(node.expr))
            elif isinstance(node, _If):
                for cond, body in node.branches:
                    if _need_bool(cond.ev(env), cond):
                        self._exec(body, env, out)
                        break
                else:
                    if node.else_body is not None:
                        self._exec(node.else_body, env, out)
            elif isinstance(node, _List):
                self._exec_list(node, env, out)
            elif isinstance(node, _Items):
                if not env.items_stack:
                    raise _Fail("#items must be inside a #list that has no \"as\"", None)
                self._loop(env.items_stack[-1], node.loop_vars, node.body, env, out)
            elif isinstance(node, _Sep):
                if env.loops and env.loops[-1].has_next:
                    self._exec(node.body, env, out)
            elif isinstance(node, _Assign):
                self._assign(node, env, out)
            elif isinstance(node, _Setting):
                value = node.expr.ev(env)
                if node.name == "number_format":
                    env.number_format = _need_string(value, node.expr)
                elif node.name == "boolean_format":
                    env.boolean_format = _need_string(value, node.expr)
                elif node.name in ("date_format", "datetime_format", "time_format"):
                    env.date_formats[node.name[:-7]] = _need_string(value, node.expr)
                elif node.name not in ("locale", "time_zone", "url_escaping_charset", "output_encoding"):
                    raise _Fail(f'Unknown setting: "{node.name}"', None)
            elif isinstance(node, _BreakNode):
                raise _Break()
            elif isinstance(node, _Compress):
                buf: list[str] = []
                self._exec(node.body, env, buf)
                text = "".join(buf).strip()
                text = re.sub(r"[ \t\r\n]*\n[ \t\r\n]*", "\n", text)
                out.append(re.sub(r"[ \t]+", " ", text))

    def _items(self, value, node, hash_form: bool) -> list:
        if value is EMPTY:
            return []
        if hash_form:
            if not isinstance(value, Mapping):
                raise _Fail(f"Expected a hash, but this has evaluated to a {_type_name(value)}:", node)
            return list(value.items())
        if isinstance(value, (list, tuple)):
            return list(value)
        raise _Fail(f"Expected a sequence or collection, but this has evaluated to a {_type_name(value)}:", node)

    def _exec_list(self, node: _List, env: _Env, out: list[str]) -> None:
        value = node.seq.ev(env)
        hash_form = node.loop_vars is not None and len(node.loop_vars) == 2
        if node.loop_vars is None and isinstance(value, Mapping):
            hash_form = True
        items = self._items(value, node.seq, hash_form)
        if not items:
            if node.else_body is not None:
                self._exec(node.else_body, env, out)
            return
        if node.loop_vars is None:
            env.items_stack.append(items)
            try:
                self._exec(node.body, env, out)
            finally:
                env.items_stack.pop()
            return
        self._loop(items, node.loop_vars, node.body, env, out)

    def _loop(self, items: list, loop_vars: list, body: list, env: _Env, out: list[str]) -> None:
        try:
            for i, item in enumerate(items):
                if len(loop_vars) == 2:
                    if not isinstance(item, tuple):
                        raise _Fail("Listing a sequence with two loop variables (key, value) is not possible", None)
                    frame_vars = {loop_vars[0]: item[0], loop_vars[1]: item[1]}
                else:
                    frame_vars = {loop_vars[0]: item}
                env.loops.append(_Frame(frame_vars, i, i < len(items) - 1))
                try:
                    self._exec(body, env, out)
                finally:
                    env.loops.pop()
        except _Break:
            pass

    def _assign(self, node: _Assign, env: _Env, out: list[str]) -> None:
        for name, op, expr in node.ops:
            if op == "capture":
                buf: list[str] = []
                self._exec(node.capture or [], env, buf)
                env.globals[name] = "".join(buf)
                continue
            if op == "=":
                env.globals[name] = expr.ev(env)
                continue
            current = env.lookup(name)
            if current is MISSING:
                raise _Fail(f"The target variable of the assignment, {name}, is null or missing.", node)
            if op in ("++", "--"):
                env.globals[name] = _need_number(current, node) + (1 if op == "++" else -1)
                continue
            rhs = expr.ev(env)
            fake = _BinOp(op[0], _Const(current, node.start, node.end), _Const(rhs, expr.start, expr.end),
                          node.start, node.end)
            env.globals[name] = fake.ev(env)


def render(source: str, model: Mapping, *, name: str = "template", now: Callable[[], datetime] | None = None) -> str:
    """Parse and render in one step; raises TemplateError (or its TemplateSyntaxError subclass)."""
    return Template(source, name).render(model, now=now)

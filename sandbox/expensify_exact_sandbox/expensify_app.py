"""A local simulator of the Expensify Integration Server (one POST endpoint), as awkward as the real one.

Written only from shared/reference/expensify.md. Uncertain behaviour ([INF] in the sheet) is a knob.

Knobs (``sim.set_knobs(...)`` or ``POST /_sandbox/expensify/knobs``), defaults first:
    render_delay_seconds=2.0        export files become downloadable this long after the job (§2.2, async render)
    not_ready_behaviour="empty"     "empty": HTTP 200 empty body; "error": 404 "File not found" envelope (§2.2)
    empty_result_behaviour="render" "render": template over an empty ``reports``; "error": download says 404 (§2.3)
    render_error_behaviour="text"   "text": the download is FreeMarker's error text; "envelope": a 500 envelope
    auth_error_code=404             responseCode for a wrong credential pair (404 observed, 401 assumed by some, §7)
    tag_shape="levels"              policy getter tags: "levels", "flat", or "both" (levels + flat personal policy)
    rate_limit_10s=5, rate_limit_60s=20, rate_limiting=True   sliding windows per partnerUserID (§7)
    approved_after_keeps_unapproved=True   approvedAfter "is only used against approved reports" (§2.1, D-old)
    untaxed_fields="missing"        expense taxAmount/taxRate when hasTax is false: "missing" or "zero" (§3.2)
    reconciliation_spend_sign="negative"   raw reconciliation amounts: spend negative per §3.2/§6.3, or "positive"
    add_header=True                 the ``addHeader`` template variable
    number_typing="documented"      how numeric-looking export fields are typed (§3.1-3.2 types are loose):
                                    "documented" as the sheet lists them (amounts, cardID, rates numbers; IDs text),
                                    "strings" every one of them as text (empty text where unset), "numbers" the
                                    all-digit IDs (transactionID, accountID, user and receipt IDs) as numbers too
    category_gl_codes="as_set"      policy getter categories: "as_set" omits ``glCode`` where none is set (D-old
                                    sample carries none), "always" sends ``"glCode": ""`` then

Fault targets (``FaultSwitches``):
    "expensify.any":      "rate_limit" (HTTP 429), "html_500" (Tomcat HTML page, HTTP 500),
                          "envelope_500" (HTTP 200, responseCode 500)
    "expensify.download": "not_ready" (the file answers not-ready once more)

Control API (JSON, same port): GET  /_sandbox/expensify/stats | knobs | reports
                                POST /_sandbox/expensify/knobs | faults | reports | reports/<reportID>

Partner logins: the demo one, plus any `add_partner` adds (scale.ScaleScenario does). Each administers its own
policies and sees only their reports (the demo login: every policy no other login owns), and has its own rate-limit
windows. Stats per login: ``requests_by_credential``, ``rate_limited_by_credential``, and
``export_jobs_by_credential`` ({login: {UTC day the job ran: jobs}}).
"""

from __future__ import annotations

import hashlib
import html
import json
import random
import re
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from email.parser import BytesParser
from email.policy import HTTP
from urllib.parse import parse_qsl

from expensify_exact_sandbox import seed as seedmod
from expensify_exact_sandbox.clock import SandboxClock
from expensify_exact_sandbox.faults import FaultSwitches
from expensify_exact_sandbox.freemarker import Template, TemplateError

ENDPOINT = "/Integration-Server/ExpensifyIntegrations"
CONTROL_PREFIX = "/_sandbox/expensify/"
RATE_LIMIT_MESSAGE = ("You have been rate-limited. Please try again later or contact help@expensify.com for "
                      "assistance.")
TEXT_PLAIN = "text/plain;charset=utf-8"  # expensify.md §1: envelopes arrive as text/plain
RENDER_WAIT_SECONDS = 2.0  # how long a download waits for a render still running before it answers not-ready

DEFAULT_KNOBS: dict[str, object] = {
    "render_delay_seconds": 2.0,
    "not_ready_behaviour": "empty",
    "empty_result_behaviour": "render",
    "render_error_behaviour": "text",
    "auth_error_code": 404,
    "tag_shape": "levels",
    "rate_limit_10s": 5,
    "rate_limit_60s": 20,
    "rate_limiting": True,
    "approved_after_keeps_unapproved": True,
    "untaxed_fields": "missing",
    "reconciliation_spend_sign": "negative",
    "add_header": True,
    "number_typing": "documented",
    "category_gl_codes": "as_set",
}
_KNOB_CHOICES = {
    "not_ready_behaviour": ("empty", "error"),
    "empty_result_behaviour": ("render", "error"),
    "render_error_behaviour": ("text", "envelope"),
    "auth_error_code": (401, 404),
    "tag_shape": ("levels", "flat", "both"),
    "untaxed_fields": ("missing", "zero"),
    "reconciliation_spend_sign": ("negative", "positive"),
    "number_typing": ("documented", "strings", "numbers"),
    "category_gl_codes": ("as_set", "always"),
}

REPORT_STATES = ("OPEN", "SUBMITTED", "APPROVED", "REIMBURSED", "ARCHIVED")
# expensify.md §2.1: the website names for reportState values; §6.3 lists Archived for the closed state
STATUS_NAMES = {"OPEN": "Open", "SUBMITTED": "Processing", "APPROVED": "Approved", "REIMBURSED": "Reimbursed",
                "ARCHIVED": "Archived"}
RECON_STATES = {"OPEN": "OPEN", "SUBMITTED": "SUBMITTED", "APPROVED": "APPROVED", "REIMBURSED": "MANUALREIMBURSED",
                "ARCHIVED": "CLOSED"}
EXPORT_EXTENSIONS = ("csv", "xls", "xlsx", "txt", "pdf", "json", "xml")
RECON_EXTENSIONS = ("csv", "txt", "json", "xml")
PERSONAL_POLICY_ID = "F1E2D3C4B5A69788"
OFFICE_GL = {"Amsterdam": "AMS", "Rotterdam": "RTM", "Utrecht": "UTR", "Eindhoven": "EHV"}
_TS = "%Y-%m-%d %H:%M:%S"
# Export fields whose values look numeric (§3.1, §3.2): numbers per the sheet, or all-digit IDs typed as text.
NUMERIC_FIELDS = ("total", "amount", "convertedAmount", "currencyConversionRate", "modifiedAmount", "taxAmount",
                  "modifiedTaxAmount", "taxRate", "mcc", "cardID", "accountID")
DIGIT_ID_FIELDS = ("transactionID", "managerUserID", "submitterUserID", "receiptID")
# Policy getter sections (expensify.md §4.2): the four of the official doc, plus employees, observed live (XRL).
POLICY_FIELDS = ("categories", "reportFields", "tags", "tax", "employees")

# Used for template:"default" (PD sends it for xls/xlsx/pdf; §2.1); a plain CSV is close enough for rehearsal.
DEFAULT_EXPORT_TEMPLATE = """<#if addHeader>Report ID,Report Name,Status,Merchant,Amount,Currency,Category,Tag
</#if><#list reports as report><#list report.transactionList as expense>\
${report.reportID},"${report.reportName}",${report.status},"${expense.merchant}",${(expense.amount/100)?c},\
${expense.currency},"${expense.category}","${expense.tag}"
</#list></#list>"""


class _Reject(Exception):
    """A verdict in the JSON envelope (HTTP 200, responseCode inside), expensify.md §1 and §7."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class _ServletError(Exception):
    """A Tomcat-level HTML error page (expensify.md §1: 'HTTP Status 500 - requestJobDescription…')."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class _Response:
    status: int
    body: bytes
    content_type: str = TEXT_PLAIN
    # the real answer, worked out after the simulator's lock is released (a download waiting for its render)
    finish: Callable[[], "_Response"] | None = None


def _envelope(code: int, message: str) -> _Response:
    return _Response(200, json.dumps({"responseMessage": message, "responseCode": code},
                                      separators=(",", ":"), ensure_ascii=False).encode())


def _ok(payload: dict) -> _Response:
    return _Response(200, json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode())


def _tomcat_page(status: int, message: str) -> _Response:
    msg = html.escape(message)
    page = (f"<html><head><title>Apache Tomcat/7.0.52 - Error report</title></head><body>"
            f"<h1>HTTP Status {status} - {msg}</h1><HR size=\"1\" noshade=\"noshade\">"
            f"<p><b>type</b> Exception report</p><p><b>message</b> <u>{msg}</u></p>"
            f"<p><b>description</b> <u>The server encountered an internal error that prevented it from fulfilling "
            f"this request.</u></p><HR size=\"1\" noshade=\"noshade\"><h3>Apache Tomcat/7.0.52</h3></body></html>")
    return _Response(status, page.encode(), "text/html;charset=utf-8")


_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 429: "Too Many Requests",
            500: "Internal Server Error"}


# ---------------------------------------------------------------------------------------------------------------
# Lenient JSON (org.json JSONObject): single quotes and bare keys pass, Python True/False do not (expensify.md §1)
# ---------------------------------------------------------------------------------------------------------------


class _JsonError(Exception):
    pass


class _LenientJson:
    def __init__(self, text: str):
        self.s = text
        self.i = 0

    def parse(self) -> dict:
        self._ws()
        if not self.s[self.i:self.i + 1] == "{":
            raise _JsonError("JSONObject text must begin with '{' at character 1")
        value = self._value()
        self._ws()
        if self.i < len(self.s):
            raise _JsonError(f"JSONObject text has unexpected characters at character {self.i + 1}")
        return value

    def _ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t\r\n":
            self.i += 1

    def _fail(self, what: str):
        raise _JsonError(f"JSONObject parse error: {what} at character {self.i + 1}")

    def _value(self):
        self._ws()
        if self.i >= len(self.s):
            self._fail("unexpected end of text")
        c = self.s[self.i]
        if c == "{":
            return self._object()
        if c == "[":
            return self._array()
        if c in "\"'":
            return self._string()
        m = re.compile(r"-?\d+(\.\d+)?([eE][+-]?\d+)?").match(self.s, self.i)
        if m:
            self.i = m.end()
            text = m.group()
            return int(text) if re.fullmatch(r"-?\d+", text) else float(text)
        m = re.compile(r"[A-Za-z_][A-Za-z0-9_]*").match(self.s, self.i)
        if m and m.group() in ("true", "false", "null"):
            self.i = m.end()
            return {"true": True, "false": False, "null": None}[m.group()]
        if m:
            self._fail(f"unquoted value '{m.group()}' (only true, false and null may be bare)")
        self._fail(f"unexpected character '{c}'")

    def _object(self) -> dict:
        self.i += 1
        out: dict = {}
        self._ws()
        if self.s[self.i:self.i + 1] == "}":
            self.i += 1
            return out
        while True:
            self._ws()
            if self.s[self.i:self.i + 1] in ("\"", "'"):
                key = self._string()
            else:
                m = re.compile(r"[A-Za-z_$][A-Za-z0-9_$\-]*").match(self.s, self.i)
                if not m:
                    self._fail("expected a key")
                key = m.group()
                self.i = m.end()
            self._ws()
            if self.s[self.i:self.i + 1] != ":":
                self._fail("expected ':' after a key")
            self.i += 1
            out[key] = self._value()
            self._ws()
            c = self.s[self.i:self.i + 1]
            self.i += 1
            if c == "}":
                return out
            if c != ",":
                self._fail("expected ',' or '}'")

    def _array(self) -> list:
        self.i += 1
        out: list = []
        self._ws()
        if self.s[self.i:self.i + 1] == "]":
            self.i += 1
            return out
        while True:
            out.append(self._value())
            self._ws()
            c = self.s[self.i:self.i + 1]
            self.i += 1
            if c == "]":
                return out
            if c != ",":
                self._fail("expected ',' or ']'")

    def _string(self) -> str:
        q = self.s[self.i]
        self.i += 1
        buf = []
        while True:
            if self.i >= len(self.s):
                self._fail("unterminated string")
            c = self.s[self.i]
            if c == q:
                self.i += 1
                return "".join(buf)
            if c == "\\":
                e = self.s[self.i + 1:self.i + 2]
                if e == "u":
                    buf.append(chr(int(self.s[self.i + 2:self.i + 6], 16)))
                    self.i += 6
                    continue
                buf.append({"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f"}.get(e, e))
                self.i += 2
                continue
            buf.append(c)
            self.i += 1


# ---------------------------------------------------------------------------------------------------------------
# The simulator's own (mutable) records
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Expense:
    transaction_id: str
    merchant: str  # what the card/bank said; the employee's edit goes to modified_merchant
    category: str
    tag: str
    amount: int  # cents, original currency, as first recorded
    currency: str
    converted_amount: int
    rate: float
    created: date
    reimbursable: bool
    card: seedmod.Card | None
    comment: str
    tax_name: str
    tax_amount: int
    billable: bool
    receipt_filename: str
    inserted: datetime
    modified_amount: int | None = None
    modified_merchant: str | None = None
    modified_created: date | None = None
    external_id: str = ""

    @property
    def effective_amount(self) -> int:
        return self.amount if self.modified_amount is None else self.modified_amount


@dataclass
class _Report:
    report_id: str
    old_id: int
    name: str
    employee: seedmod.Employee
    currency: str
    created: datetime
    submitted: datetime | None
    approved: datetime | None
    reimbursed: datetime | None
    state: str
    policy_id: str
    expenses: list[_Expense]
    labels: list[dict] = field(default_factory=list)
    hidden_until: datetime | None = None  # naive UTC: exports leave the report out before then (a lagging export)

    @property
    def total(self) -> int:
        return sum(e.converted_amount for e in self.expenses)

    @property
    def filter_day(self) -> date:
        # expensify.md §2.1: startDate/endDate look at "submitted or created, whichever later"
        moments = [self.created] + ([self.submitted] if self.submitted else [])
        return max(moments).date()


class _Record(Mapping):
    """A hashable hash for the template engine: the reconciliation model keys `cards` by card objects (§6.3)."""

    def __init__(self, **values):
        self._values = values

    def __getitem__(self, key):
        return self._values[key]

    def __iter__(self) -> Iterator:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __hash__(self) -> int:
        return hash(tuple(sorted((k, repr(v)) for k, v in self._values.items())))


def _set_event() -> threading.Event:
    event = threading.Event()
    event.set()
    return event


@dataclass
class _File:
    ready_at: datetime
    body: bytes | None = None
    envelope: tuple[int, str] | None = None
    rendered: threading.Event = field(default_factory=_set_event)  # unset while a background render runs


def _numeric_id(text: str, digits: int) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % (9 * 10 ** (digits - 1)) + 10 ** (digits - 1)


def _account_id(email: str) -> int:
    return _numeric_id("account:" + email, 8)


def _split_tag(tag: str) -> list[str]:
    # A literal ":" inside a tag level is written "\:" (expensify.md §3.2)
    return [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", tag)] if tag else []


def _ts(moment: datetime | None) -> str:
    return moment.strftime(_TS) if moment else ""


def _one_year_before(d: date) -> date:
    try:
        return d.replace(year=d.year - 1)
    except ValueError:
        return d.replace(year=d.year - 1, day=28)


def _one_year_after(d: date) -> date:
    try:
        return d.replace(year=d.year + 1)
    except ValueError:
        return d.replace(year=d.year + 1, day=28)


def _parse_day(value, name: str) -> date:
    if not isinstance(value, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        raise _Reject(410, f"Malformed date '{value}'. Expected format is yyyy-MM-dd")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise _Reject(410, f"Malformed date '{value}'. Expected format is yyyy-MM-dd") from None


def _csv_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def _truthy_flag(value) -> bool:
    # `test` is documented as the string "true"; org.json's optString turns a JSON true into "true" as well
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


# ---------------------------------------------------------------------------------------------------------------
# The simulator
# ---------------------------------------------------------------------------------------------------------------


class ExpensifySimulator:
    """WSGI app simulating the Expensify Integration Server over the demo seed.

    Args:
        seed: the demo data (`seed.build_seed(today)`).
        clock: the sandbox clock; every timestamp and rate window comes from it.
        faults: shared fault switches (targets in the module docstring).
    """

    def __init__(self, seed: seedmod.Seed, clock: SandboxClock | None = None, faults: FaultSwitches | None = None):
        self.clock = clock or SandboxClock()
        self.faults = faults or FaultSwitches()
        self.knobs: dict[str, object] = dict(DEFAULT_KNOBS)
        self._lock = threading.RLock()
        self._rng = random.Random(seed.today.toordinal())
        self._files: dict[tuple[str, str], _File] = {}
        self._reports: dict[str, _Report] = {}
        self._reports_by_policy: dict[str, list[_Report]] = {}
        # partnerUserID -> partnerUserSecret; the demo login sees every policy no other login owns
        self._partners = {seedmod.EXPENSIFY_PARTNER_USER_ID: seedmod.EXPENSIFY_PARTNER_USER_SECRET}
        self._policy_owner: dict[str, str] = {}  # policy ID -> the partnerUserID that administers it
        self._policy_names: dict[str, str] = {seedmod.POLICY_ID: seedmod.POLICY_NAME}
        self._edited_counter = 0
        self._unreported = list(seed.unreported_card_transactions)
        self._accepted: dict[str, deque] = {}
        self._attempts: dict[str, deque] = {}
        self._stats: dict = {"requests": 0, "requests_by_job": {}, "export_jobs": 0, "downloads": 0,
                             "reconciliation_jobs": 0, "rate_limited": 0, "max_in_10s": {}, "max_in_60s": {},
                             "ignored_onfinish_actions": 0, "faults_fired": 0,
                             # per partnerUserID: requests, 429s, export jobs by the (UTC) day they ran
                             "requests_by_credential": {}, "rate_limited_by_credential": {},
                             "export_jobs_by_credential": {}}
        self._load_seed(seed)

    # -- seed -----------------------------------------------------------------------------------------------------

    def _load_seed(self, seed: seedmod.Seed) -> None:
        self._load_reports(seed.reports, seedmod.POLICY_ID)

    def _load_reports(self, reports, policy_id: str) -> None:
        for rep in reports:
            expenses = []
            for exp in rep.expenses:
                expense = _Expense(
                    transaction_id=exp.transaction_id, merchant=exp.merchant, category=exp.category, tag=exp.tag,
                    amount=exp.amount, currency=exp.currency, converted_amount=exp.converted_amount, rate=exp.rate,
                    created=exp.created, reimbursable=exp.reimbursable, card=exp.card, comment=exp.comment,
                    tax_name=exp.tax_name, tax_amount=exp.tax_amount, billable=exp.billable,
                    receipt_filename=exp.receipt_filename,
                    inserted=datetime.combine(exp.created, datetime.min.time()) + timedelta(hours=19, minutes=5))
                # Every 7th same-currency expense was edited by its submitter, so the seed's values sit in the
                # modified* fields and the originals differ: templates must honour the precedence (§3.2, HELP).
                if self._edited_counter % 7 == 3 and exp.currency == rep.currency:
                    bump = 150 if exp.amount >= 0 else -150
                    expense.amount = exp.amount + bump
                    expense.modified_amount = exp.amount
                    expense.merchant = f"{exp.merchant.upper()} *{exp.transaction_id[-4:]}"
                    expense.modified_merchant = exp.merchant
                    expense.created = exp.created - timedelta(days=1)
                    expense.modified_created = exp.created
                self._edited_counter += 1
                expenses.append(expense)
            reimbursed = rep.approved + timedelta(hours=26) if rep.state == "REIMBURSED" else None
            self._keep(_Report(
                report_id=rep.report_id, old_id=_numeric_id("old:" + rep.report_id, 16), name=rep.name,
                employee=rep.employee, currency=rep.currency, created=rep.created, submitted=rep.submitted,
                approved=rep.approved if rep.state in ("APPROVED", "REIMBURSED", "ARCHIVED") else None,
                reimbursed=reimbursed, state=rep.state, policy_id=policy_id, expenses=expenses))

    def _keep(self, report: _Report) -> None:
        self._reports[report.report_id] = report
        self._reports_by_policy.setdefault(report.policy_id, []).append(report)

    # -- public Python API ----------------------------------------------------------------------------------------

    def add_partner(self, user_id: str, secret: str, policies: dict[str, str]) -> None:
        """Another partner login, administering `policies` (policy ID -> name): it sees their reports and nothing
        else, and has its own rate limits. The demo login no longer sees these policies."""
        with self._lock:
            if user_id == seedmod.EXPENSIFY_PARTNER_USER_ID:
                raise ValueError("the demo login is there already")
            self._partners[user_id] = secret
            for policy_id, name in policies.items():
                self._policy_owner[policy_id] = user_id
                self._policy_names[policy_id] = name

    def load_reports(self, reports, policy_id: str) -> None:
        """Add seed-style reports (`seed.Report`) to one policy, as the demo seed's are added to the demo policy."""
        with self._lock:
            self._load_reports(reports, policy_id)

    def set_knobs(self, **knobs) -> dict:
        """Change knobs (see the module docstring); unknown names or values raise ValueError."""
        with self._lock:
            for name, value in knobs.items():
                if name not in DEFAULT_KNOBS:
                    raise ValueError(f"unknown knob {name!r}; known: {sorted(DEFAULT_KNOBS)}")
                if name in _KNOB_CHOICES and value not in _KNOB_CHOICES[name]:
                    raise ValueError(f"knob {name!r} must be one of {_KNOB_CHOICES[name]}, not {value!r}")
                self.knobs[name] = value
            return dict(self.knobs)

    @property
    def stats(self) -> dict:
        with self._lock:
            return json.loads(json.dumps(self._stats))

    def labels(self, report_id: str) -> list[str]:
        with self._lock:
            return [lab["label"] for lab in self._report(report_id).labels]

    def reports(self) -> list[dict]:
        """The current reports as the control API shows them (state, times, labels, expenses)."""
        with self._lock:
            return [self._report_summary(r) for r in self._sorted_reports()]

    def edit_expense(self, report_id: str, transaction_id: str, *, amount: int | None = None,
                     category: str | None = None, tag: str | None = None, merchant: str | None = None) -> None:
        """Edit an expense as its submitter would: amount and merchant land in the modified* fields."""
        with self._lock:
            report = self._report(report_id)
            exp = next((e for e in report.expenses if e.transaction_id == transaction_id), None)
            if exp is None:
                raise KeyError(f"no expense {transaction_id} on report {report_id}")
            if amount is not None:
                exp.modified_amount = int(amount)
                exp.converted_amount = round(int(amount) * exp.rate)
            if merchant is not None:
                exp.modified_merchant = merchant
            if category is not None:
                exp.category = category
            if tag is not None:
                exp.tag = tag

    def set_report_state(self, report_id: str, state: str, *, approved: datetime | None = None) -> None:
        """Move a report (e.g. OPEN to reopen, then APPROVED again); approving stamps `approved` (default now)."""
        state = state.upper()
        if state not in REPORT_STATES:
            raise ValueError(f"state must be one of {REPORT_STATES}")
        with self._lock:
            report = self._report(report_id)
            now = self._now()
            report.state = state
            if state == "OPEN":
                report.submitted = report.approved = report.reimbursed = None
            elif state == "SUBMITTED":
                report.submitted = now
                report.approved = report.reimbursed = None
            elif state in ("APPROVED", "REIMBURSED", "ARCHIVED"):
                if report.submitted is None:
                    report.submitted = now
                if approved is not None:
                    report.approved = approved.astimezone(timezone.utc).replace(tzinfo=None) \
                        if approved.tzinfo else approved
                elif state == "APPROVED" or report.approved is None:
                    report.approved = now
                if state == "REIMBURSED":
                    report.reimbursed = now
                elif state == "APPROVED":
                    report.reimbursed = None

    def hide_from_exports(self, report_id: str, until: datetime) -> None:
        """Leave a report out of every export until `until` (sandbox clock), as an export that lags behind an
        approval (or a report retracted and re-approved) would: the report turns up days after its approval day."""
        with self._lock:
            self._report(report_id).hidden_until = until.astimezone(timezone.utc).replace(tzinfo=None) \
                if until.tzinfo else until

    def add_report(self, *, name: str, employee_email: str, expenses: list[dict], state: str = "APPROVED",
                   approved: datetime | None = None, currency: str = "EUR", submitted: datetime | None = None,
                   policy_id: str = seedmod.POLICY_ID) -> str:
        """Add a report; each expense dict has merchant, category, tag, amount (cents), optional currency/created.

        `submitted` (naive UTC, default now) also dates the report's creation, e.g. to add a report that was
        submitted and approved days ago but reaches the export only now."""
        with self._lock:
            employee = next((e for e in seedmod.EMPLOYEES if e.email == employee_email),
                            seedmod.Employee(employee_email, employee_email.split("@")[0], ""))
            n = len(self._reports)
            report_id = "R00" + "".join(self._rng.choice(seedmod._BASE62) for _ in range(9))
            now = self._now()
            records = []
            for k, spec in enumerate(expenses):
                created = spec.get("created")
                created = date.fromisoformat(created) if isinstance(created, str) else (created or now.date())
                amount = int(spec["amount"])
                records.append(_Expense(
                    transaction_id=str(4056343049290000000 + n * 100 + k), merchant=spec.get("merchant", "Merchant"),
                    category=spec.get("category", ""), tag=spec.get("tag", ""), amount=amount,
                    currency=spec.get("currency", currency), converted_amount=int(spec.get("convertedAmount", amount)),
                    rate=float(spec.get("rate", 1.0)), created=created, reimbursable=spec.get("reimbursable", True),
                    card=None, comment=spec.get("comment", ""), tax_name=spec.get("taxName", ""),
                    tax_amount=int(spec.get("taxAmount", 0)), billable=bool(spec.get("billable", False)),
                    receipt_filename="", inserted=now))
            report = _Report(report_id=report_id, old_id=_numeric_id("old:" + report_id, 16), name=name,
                             employee=employee, currency=currency, created=submitted or now,
                             submitted=submitted if state.upper() != "OPEN" else None, approved=None,
                             reimbursed=None, state="OPEN", policy_id=policy_id, expenses=records)
            self._keep(report)
        if state.upper() != "OPEN":
            self.set_report_state(report_id, state, approved=approved)
        return report_id

    def export_model(self, report_ids: list[str] | None = None) -> dict:
        """The exporter's template data model (expensify.md §3) for some or all reports."""
        with self._lock:
            reports = [r for r in self._sorted_reports() if report_ids is None or r.report_id in report_ids]
            return {"reports": [self._report_model(r) for r in reports], "addHeader": bool(self.knobs["add_header"])}

    # -- WSGI -----------------------------------------------------------------------------------------------------

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "") or "/"
        method = environ.get("REQUEST_METHOD", "GET").upper()
        if path.startswith(CONTROL_PREFIX):
            status, payload = self._control(method, path[len(CONTROL_PREFIX):], environ)
            body = json.dumps(payload, default=str).encode()
            start_response(f"{status} {'OK' if status == 200 else 'Error'}",
                           [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        if path.rstrip("/") != ENDPOINT:
            response = _tomcat_page(404, path)
        elif method != "POST":
            response = _tomcat_page(405, f"HTTP method {method} is not supported by this URL")
        else:
            response = self._handle(environ)
        reason = _REASONS.get(response.status, "Error")
        start_response(f"{response.status} {reason}", [("Content-Type", response.content_type),
                                                       ("Content-Length", str(len(response.body)))])
        return [response.body]

    def _handle(self, environ) -> _Response:
        try:
            params = self._read_params(environ)
        except _ServletError as exc:
            return _tomcat_page(exc.status, exc.message)
        with self._lock:
            self._stats["requests"] += 1
            fault = self.faults.take("expensify.any")
            if fault:
                self._stats["faults_fired"] += 1
            if fault == "html_500":
                return _tomcat_page(500, "java.lang.NullPointerException")
            if fault == "rate_limit":
                self._stats["rate_limited"] += 1
                return _Response(429, RATE_LIMIT_MESSAGE.encode())
            raw_job = params.get("requestJobDescription")
            if not raw_job:
                return _tomcat_page(500, "requestJobDescription is missing or empty")
            try:
                job = _LenientJson(raw_job).parse()
            except _JsonError as exc:
                return _tomcat_page(500, str(exc))
            except (ValueError, IndexError):
                return _tomcat_page(500, "JSONObject parse error: malformed text")
            job_type = job.get("type") if isinstance(job.get("type"), str) else "?"
            by_job = self._stats["requests_by_job"]
            by_job[job_type] = by_job.get(job_type, 0) + 1
            creds = job.get("credentials") if isinstance(job.get("credentials"), dict) else {}
            user = str(creds.get("partnerUserID") or "")
            self._bump("requests_by_credential", user or "(none)")
            if not self._admit(user):
                self._stats["rate_limited"] += 1
                self._bump("rate_limited_by_credential", user or "(none)")
                return _Response(429, RATE_LIMIT_MESSAGE.encode())
            if fault == "envelope_500":
                return _envelope(500, "Internal error. Please try again later.")
            try:
                self._authenticate(creds)
                response = self._dispatch(job, job_type, params, user)
            except _Reject as exc:
                return _envelope(exc.code, exc.message)
            except Exception as exc:  # noqa: BLE001 - the servlet answers an HTML 500 rather than dropping the line
                return _tomcat_page(500, f"{type(exc).__name__}: {exc}")
        return response.finish() if response.finish else response

    def _bump(self, stat: str, key: str) -> None:
        self._stats[stat][key] = self._stats[stat].get(key, 0) + 1

    def _sees(self, user: str, policy_id: str) -> bool:
        """Whether a partner login administers this policy: its own, or for the demo login every other one."""
        return self._policy_owner.get(policy_id, seedmod.EXPENSIFY_PARTNER_USER_ID) == user

    def _read_params(self, environ) -> dict[str, str]:
        # Servlet parameters come from the query string and the body alike (GO client, expensify.md §1)
        params: dict[str, str] = {}
        for key, value in parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True):
            params.setdefault(key, value)
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        body = environ["wsgi.input"].read(length) if length > 0 else b""
        ctype = environ.get("CONTENT_TYPE", "") or ""
        if body and ctype.startswith("multipart/form-data"):
            message = BytesParser(policy=HTTP).parsebytes(
                b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + body)
            for part in message.iter_parts():
                name = part.get_param("name", header="content-disposition")
                if name:
                    payload = part.get_payload(decode=True) or b""
                    params.setdefault(name, payload.decode("utf-8", "replace"))
        elif body and (ctype.startswith("application/x-www-form-urlencoded") or not ctype):
            for key, value in parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True):
                params.setdefault(key, value)
        return params

    def _admit(self, user: str) -> bool:
        now = self.clock.now().timestamp()
        attempts = self._attempts.setdefault(user, deque())
        attempts.append(now)
        while attempts and attempts[0] <= now - 60:
            attempts.popleft()
        in10 = sum(1 for t in attempts if t > now - 10)
        label = user or "(none)"
        self._stats["max_in_10s"][label] = max(self._stats["max_in_10s"].get(label, 0), in10)
        self._stats["max_in_60s"][label] = max(self._stats["max_in_60s"].get(label, 0), len(attempts))
        if not self.knobs["rate_limiting"]:
            return True
        accepted = self._accepted.setdefault(user, deque())
        while accepted and accepted[0] <= now - 60:
            accepted.popleft()
        if len(accepted) >= int(self.knobs["rate_limit_60s"]) or \
                sum(1 for t in accepted if t > now - 10) >= int(self.knobs["rate_limit_10s"]):
            return False  # a refused request does not use up the allowance [INF]
        accepted.append(now)
        return True

    def _authenticate(self, creds: dict) -> None:
        user, secret = creds.get("partnerUserID"), creds.get("partnerUserSecret")
        if not user or not secret:
            raise _Reject(403, "No authentication method specified")  # expensify.md §7 [OBS]
        if self._partners.get(user) != secret:
            raise _Reject(int(self.knobs["auth_error_code"]), "Authentication error")

    def _dispatch(self, job: dict, job_type: str, params: dict, user: str) -> _Response:
        settings = job.get("inputSettings") if isinstance(job.get("inputSettings"), dict) else {}
        input_type = settings.get("type")
        if job_type == "file":
            return self._export(job, settings, params, user)
        if job_type == "download":
            return self._download(job)
        if job_type == "reconciliation":
            return self._reconciliation(job, settings, params, user)
        if job_type == "get":
            if input_type == "policyList":
                return self._policy_list(settings, user)
            if input_type == "policy":
                return self._policy(settings, user)
            if input_type == "domainCardList":
                return self._domain_cards(settings, user)
            raise _Reject(410, "Argument 'type' is missing or malformed")
        if job_type == "update" and input_type == "reportStatus":
            return self._report_status(settings, user)
        if job_type in ("create", "update"):
            raise _Reject(500, f"Job '{job_type}/{input_type}' is not simulated by the sandbox")
        raise _Reject(410, "Argument 'type' is missing or malformed")

    # -- Report Exporter (§2.1) -----------------------------------------------------------------------------------

    def _export(self, job: dict, settings: dict, params: dict, user: str) -> _Response:
        if settings.get("type") != "combinedReportData":
            raise _Reject(410, "Argument 'type' is missing or malformed")
        template_src = params.get("template")
        if not template_src:
            raise _Reject(410, "No Template Submitted")  # template nested inside the JSON counts as missing
        output = job.get("outputSettings") if isinstance(job.get("outputSettings"), dict) else {}
        ext = str(output.get("fileExtension", "")).lower()
        if ext not in EXPORT_EXTENSIONS:
            raise _Reject(410, "Argument 'fileExtension' is missing or malformed")
        reports = self._select_reports(settings, user)
        on_finish = job.get("onFinish", [])
        if not isinstance(on_finish, list):
            raise _Reject(410, "Bad request. Verify the request parameters.")
        self._stats["export_jobs"] += 1
        by_day = self._stats["export_jobs_by_credential"].setdefault(user, {})
        by_day[self._now().date().isoformat()] = by_day.get(self._now().date().isoformat(), 0) + 1
        # fileBasename is the documented spelling; fileBaseName is an unknown key and silently ignored (§2.1)
        basename = output.get("fileBasename") if isinstance(output.get("fileBasename"), str) else "export"
        ready_at = self._now_aware() + timedelta(seconds=float(self.knobs["render_delay_seconds"]))
        source = _template_source(template_src)
        groups = [[r] for r in reports] if ext == "pdf" and reports else [reports]
        names = []
        for group in groups:
            name = f"{basename}{uuid.UUID(int=self._rng.getrandbits(128), version=4)}.{ext}"
            self._files[("integrationServer", name)] = self._start_render(source, group, ready_at)
            names.append(name)
        if not _truthy_flag(job.get("test")):
            for action in on_finish:
                if isinstance(action, dict) and action.get("actionName") == "markAsExported":
                    label = action.get("label")
                    if not isinstance(label, str) or not label:
                        raise _Reject(410, "Bad request. Verify the request parameters.")
                    # Labels land when the job runs, not when the file is downloaded (expensify.md §2.2)
                    for report in reports:
                        report.labels.append({"label": label, "at": _ts(self._now())})
                elif isinstance(action, dict):
                    self._stats["ignored_onfinish_actions"] += 1
        # Success is the bare file name, not JSON (expensify.md §2.2 [OBS]); several files are comma-joined
        return _Response(200, ",".join(names).encode())

    def _start_render(self, source: str, reports: list[_Report], ready_at: datetime) -> _File:
        """The job's data as it is now, rendered in the background, as Expensify renders (§2.2): thousands of
        reports take seconds, during which the job has long answered and the file is not ready."""
        if not reports and self.knobs["empty_result_behaviour"] == "error":
            return _File(ready_at, envelope=(404, "File not found"))
        model = {"reports": [self._report_model(r) for r in reports], "addHeader": bool(self.knobs["add_header"])}
        as_envelope = self.knobs["render_error_behaviour"] == "envelope"
        file = _File(ready_at, rendered=threading.Event())

        def render() -> None:
            try:
                file.body = Template(source, name="expensify-export").render(model, now=self._now).encode()
            except TemplateError as exc:
                if as_envelope:
                    file.envelope = (500, exc.message)
                else:
                    file.body = exc.text.encode()
            finally:
                file.rendered.set()

        threading.Thread(target=render, name="expensify-render", daemon=True).start()
        return file

    def _select_reports(self, settings: dict, user: str) -> list[_Report]:
        filters = settings.get("filters")
        if not isinstance(filters, dict) or not any(filters.get(k) for k in ("reportIDList", "startDate",
                                                                               "approvedAfter")):
            raise _Reject(410, "Bad request. Verify the request parameters.")
        start = _parse_day(filters["startDate"], "startDate") if filters.get("startDate") else None
        end = _parse_day(filters["endDate"], "endDate") if filters.get("endDate") else None
        approved_after = _parse_day(filters["approvedAfter"], "approvedAfter") if filters.get("approvedAfter") \
            else None
        today = self._now().date()
        lower = min(d for d in (start, approved_after) if d) if (start or approved_after) else None
        if lower and lower < _one_year_before(today) and end is None:
            raise _Reject(410, "endDate is required when startDate or approvedAfter is more than one year ago")
        if lower and end and end > _one_year_after(lower):
            raise _Reject(410, "The date range cannot be longer than one year")
        states = [s.upper() for s in _csv_list(settings.get("reportState"))]
        if any(s not in REPORT_STATES for s in states):
            raise _Reject(410, "Argument 'reportState' is missing or malformed")
        limit = settings.get("limit")
        if limit is not None and limit != "":
            if not re.fullmatch(r"\d+", str(limit)) or int(limit) < 1:
                raise _Reject(410, "Argument 'limit' is missing or malformed")
            limit = int(limit)
        else:
            limit = None
        ids = set(_csv_list(filters.get("reportIDList")))
        policies = set(_csv_list(filters.get("policyIDList")))
        employee = settings.get("employeeEmail")
        exported_label = filters.get("markedAsExported")
        selected = []
        for report in self._candidates(user, policies):
            if not self._sees(user, report.policy_id):
                continue
            if ids and report.report_id not in ids and str(report.old_id) not in ids:
                continue
            if states:
                if report.state not in states:
                    continue
            elif report.state == "OPEN" and not ids:
                continue  # drafts only come out when named by ID (expensify.md §2.3, BKP)
            if employee and (report.employee.email != employee or report.state == "OPEN"):
                continue
            if policies and report.policy_id not in policies:
                continue
            if start and report.filter_day < start:
                continue
            if end and report.filter_day > end:
                continue
            if approved_after:
                if report.approved is None:
                    if not self.knobs["approved_after_keeps_unapproved"]:
                        continue
                elif report.approved.date() <= approved_after:
                    continue  # strictly after: approved on that very day is dropped
            if exported_label and any(lab["label"] == exported_label for lab in report.labels):
                continue
            if report.hidden_until is not None and self._now() < report.hidden_until:
                continue
            selected.append(report)
        return selected[:limit] if limit else selected

    def _candidates(self, user: str, policies: set[str]) -> list[_Report]:
        """The reports an export can select from, in report-ID order: those of the named policies, or of every
        policy the login administers; only the demo login's unnamed export looks at all of them."""
        if not policies and user != seedmod.EXPENSIFY_PARTNER_USER_ID:
            policies = {p for p, owner in self._policy_owner.items() if owner == user}
        if not policies:
            return self._sorted_reports()
        pool = [r for p in policies for r in self._reports_by_policy.get(p, ())]
        return sorted(pool, key=lambda r: r.report_id)

    # -- Downloader (§2.2) ----------------------------------------------------------------------------------------

    def _download(self, job: dict) -> _Response:
        self._stats["downloads"] += 1
        name = job.get("fileName")
        if not isinstance(name, str) or not name:
            raise _Reject(410, "Argument 'fileName' is missing or malformed")
        system = job.get("fileSystem", "integrationServer")
        stored = self._files.get((system, name))
        if stored is None:
            raise _Reject(404, "File not found")
        if self.faults.take("expensify.download") == "not_ready" or self._now_aware() < stored.ready_at:
            return self._not_ready()
        if not stored.rendered.is_set():
            return _Response(200, b"", finish=lambda: self._when_rendered(stored))
        return self._file_answer(stored)

    def _when_rendered(self, stored: _File) -> _Response:
        """Outside the lock: a file whose render delay is over but whose render still runs is waited for a
        little, so a small export is never a race; a large one answers not-ready until it is done."""
        done = stored.rendered.wait(RENDER_WAIT_SECONDS)
        with self._lock:
            return self._file_answer(stored) if done else self._not_ready()

    def _not_ready(self) -> _Response:
        self._stats["downloads_not_ready"] = self._stats.get("downloads_not_ready", 0) + 1
        if self.knobs["not_ready_behaviour"] == "error":
            return _envelope(404, "File not found")
        return _Response(200, b"")

    @staticmethod
    def _file_answer(stored: _File) -> _Response:
        if stored.envelope:
            return _envelope(*stored.envelope)
        return _Response(200, stored.body or b"", "application/octet-stream")

    # -- data model (§3.1, §3.2) ----------------------------------------------------------------------------------

    def _report_model(self, report: _Report) -> dict:
        approver = next(e for e in seedmod.EMPLOYEES if e.email == seedmod.APPROVER)
        first, _, last = report.employee.name.partition(" ")
        m_first, _, m_last = approver.name.partition(" ")
        approvers = [] if report.approved is None else [{
            "email": approver.email, "date": _ts(report.approved), "firstName": m_first, "lastName": m_last,
            "fullName": approver.name, "employeeUserID": str(_account_id(approver.email)),
            "employeePayrollID": approver.employee_id}]
        model = {
            "reportID": report.report_id,
            "oldReportID": f"R{report.old_id}",
            "reportName": report.name,
            "status": STATUS_NAMES[report.state],
            "total": report.total,
            "currency": report.currency,
            "created": _ts(report.created),
            "submitted": _ts(report.submitted),
            "approved": _ts(report.approved),
            "reimbursed": _ts(report.reimbursed),
            "policyID": report.policy_id,
            "policyName": self._policy_names.get(report.policy_id, seedmod.POLICY_NAME),
            "accountEmail": report.employee.email,
            "accountID": _account_id(report.employee.email),
            "managerEmail": approver.email,
            "managerUserID": str(_account_id(approver.email)),
            "managerPayrollID": approver.employee_id,
            "manager": {"firstName": m_first, "lastName": m_last, "fullName": approver.name},
            "approvers": approvers,
            "actionList": [],
            "customField": {},
            "entryID": "",
            "isACHReimbursed": False,
            "submitter": {"firstName": first, "lastName": last, "fullName": report.employee.name},
            "submitterUserID": str(_account_id(report.employee.email)),
            "submitterPayrollID": report.employee.employee_id,
            "employeeCustomField1": report.employee.employee_id,
            "employeeCustomField2": "",
            "transactionList": [self._expense_model(report, e) for e in report.expenses],
        }
        return self._retyped(model)

    def _expense_model(self, report: _Report, exp: _Expense) -> dict:
        gl = dict(seedmod.CATEGORIES)
        levels = _split_tag(exp.tag)
        tag_gl = [self._tag_gl(i, name) for i, name in enumerate(levels)]
        rates = {name: (rate_id, rate) for name, rate_id, rate in seedmod.TAX_RATES}
        has_tax = bool(exp.tax_name)
        untaxed = None if self.knobs["untaxed_fields"] == "missing" else 0
        receipt = {}
        if exp.receipt_filename:
            url = f"https://www.expensify.com/receipts/{exp.receipt_filename}"
            receipt = {"url": url, "thumbnail": url.replace(".jpg", ".jpg.1024.jpg"),
                       "smallThumbnail": url.replace(".jpg", ".jpg.320.jpg"), "type": "image",
                       "transactionID": exp.transaction_id}
        model = {
            "transactionID": exp.transaction_id,
            "reportID": report.report_id,
            "amount": exp.amount,
            "currency": exp.currency,
            "convertedAmount": exp.converted_amount,
            "currencyConversionRate": exp.rate,
            # Unmodified expenses carry empty strings here; templates need ?has_content (§3.2)
            "modifiedAmount": "" if exp.modified_amount is None else exp.modified_amount,
            "modifiedCreated": "" if exp.modified_created is None else exp.modified_created.isoformat(),
            "modifiedMerchant": "" if exp.modified_merchant is None else exp.modified_merchant,
            "modifiedMCC": "",
            "created": exp.created.isoformat(),
            "inserted": _ts(exp.inserted),
            "merchant": exp.merchant,
            "category": exp.category,
            "categoryGlCode": gl.get(exp.category, ""),
            "categoryPayrollCode": "",
            "tag": exp.tag,
            "tagGlCode": ":".join(tag_gl),
            "comment": exp.comment,
            "billable": exp.billable,
            "reimbursable": exp.reimbursable,
            "hasTax": has_tax,
            "taxAmount": exp.tax_amount if has_tax else untaxed,
            "modifiedTaxAmount": "",
            "taxName": exp.tax_name,
            "taxRate": rates.get(exp.tax_name, ("", 0.0))[1] if has_tax else untaxed,
            "taxRateName": exp.tax_name,
            "taxCode": rates.get(exp.tax_name, ("", 0))[0] if has_tax else "",
            "mcc": 0,
            "bank": exp.card.bank if exp.card else "",
            "cardID": exp.card.card_id if exp.card else "",
            "cardName": exp.card.name if exp.card else "",
            "cardNumber": exp.card.masked_number if exp.card else "",
            "receiptID": _numeric_id("receipt:" + exp.receipt_filename, 10) if exp.receipt_filename else "",
            "receiptFilename": exp.receipt_filename,
            "receiptObject": receipt,
            "attendees": [{"email": report.employee.email, "displayName": report.employee.name}]
            if exp.category == "Meals" else [],
            "type": "card" if exp.card else "cash",  # exact values unknown (§3.2 [INF])
            "units": {},
            "externalID": exp.external_id,
        }
        for i, name in enumerate(levels):
            model[f"ntag{i + 1}"] = name
            model[f"ntag{i + 1}GlCode"] = tag_gl[i]
        return self._retyped(model)

    def _retyped(self, model: dict) -> dict:
        """The ``number_typing`` knob: the same values, typed as another Expensify might type them."""
        typing = self.knobs["number_typing"]
        if typing == "strings":
            for key in NUMERIC_FIELDS:
                if key in model and not isinstance(model[key], bool):
                    value = model[key]
                    model[key] = "" if value is None else str(value)
        elif typing == "numbers":
            for key in DIGIT_ID_FIELDS:
                if isinstance(model.get(key), str) and model[key].isdigit():
                    model[key] = int(model[key])
        return model

    @staticmethod
    def _tag_gl(level: int, name: str) -> str:
        if level == 0:
            return OFFICE_GL.get(name, "")
        return name.split(" ")[0] if name.startswith("P") else "INT"

    # -- policies (§4) --------------------------------------------------------------------------------------------

    def _policies(self, user: str) -> list[dict]:
        if user != seedmod.EXPENSIFY_PARTNER_USER_ID:
            return [{"outputCurrency": "EUR", "owner": user, "role": "admin", "name": self._policy_names[policy_id],
                     "id": policy_id, "type": "corporate"}
                    for policy_id, owner in self._policy_owner.items() if owner == user]
        return [
            {"outputCurrency": "EUR", "owner": seedmod.APPROVER, "role": "admin", "name": seedmod.POLICY_NAME,
             "id": seedmod.POLICY_ID, "type": "corporate"},
            {"outputCurrency": "EUR", "owner": seedmod.APPROVER, "role": "admin", "name": "Finance Team's Expenses",
             "id": PERSONAL_POLICY_ID, "type": "personalPolicy"},
        ]

    def _policy_list(self, settings: dict, user: str) -> _Response:
        policies = self._policies(user)
        if settings.get("adminOnly") in (True, "true"):
            policies = [p for p in policies if p["role"] == "admin"]
        return _ok({"policyList": policies, "responseCode": 200})

    def _policy(self, settings: dict, user: str) -> _Response:
        fields = settings.get("fields")
        # Only the documented sections; what Expensify does with others is unknown, so the strict reading refuses.
        if not isinstance(fields, list) or not fields or any(f not in POLICY_FIELDS for f in fields):
            raise _Reject(410, "Argument 'fields' is missing or malformed")
        ids = settings.get("policyIDList")
        if ids is None:
            raise _Reject(410, "Required parameter 'policyIDList' is missing")
        ids = _csv_list(ids)
        known = {p["id"] for p in self._policies(user)}
        found = [i for i in ids if i in known]
        if not found:
            raise _Reject(404, "Policy not found")
        info = {pid: self._policy_info(pid, fields) for pid in found}
        return _ok({"policyInfo": info, "responseCode": 200})

    def _policy_info(self, policy_id: str, fields: list) -> dict:
        personal = policy_id == PERSONAL_POLICY_ID
        out: dict = {}
        if "categories" in fields:
            cats = []
            for name, gl in seedmod.CATEGORIES if not personal else ():
                cat = {"name": name, "enabled": True, "glCode": gl, "payrollCode": "", "areCommentsRequired":
                       name == "Gifts", "commentHint": "", "maxExpenseAmount": 50000 if name == "Meals" else 0}
                if not gl:
                    del cat["enabled"]  # a missing "enabled" means true (expensify.md §4.2)
                    if self.knobs["category_gl_codes"] == "as_set":
                        del cat["glCode"]
                cats.append(cat)
            out["categories"] = cats
        if "tags" in fields:
            shape = self.knobs["tag_shape"]
            flat = shape == "flat" or (shape == "both" and personal)
            if personal:
                out["tags"] = [] if flat else [{"name": "Tags", "tags": []}]
            elif flat:
                out["tags"] = [{"name": f"{o}:{p}", "enabled": True, "glCode": ""}
                               for o in seedmod.OFFICE_TAGS for p in seedmod.PROJECT_TAGS]
            else:
                out["tags"] = [
                    {"name": "Office", "tags": [{"name": o, "enabled": True, "glCode": OFFICE_GL[o]}
                                                for o in seedmod.OFFICE_TAGS]},
                    {"name": "Project", "tags": [{"name": p, "enabled": True, "glCode": self._tag_gl(1, p)}
                                                 for p in seedmod.PROJECT_TAGS]},
                ]
        if "tax" in fields:
            out["tax"] = {} if personal else {
                "name": "Tax", "default": seedmod.TAX_RATES[0][1],
                "rates": [{"rate": rate, "name": name, "rateID": rid} for name, rid, rate in seedmod.TAX_RATES]}
        if "reportFields" in fields:
            out["reportFields"] = [{"name": "title", "type": "formula", "values": []}]
        if "employees" in fields:
            out["employees"] = [] if personal else [
                {"email": e.email, "role": "admin" if e.email == seedmod.APPROVER else "user",
                 "submitsTo": seedmod.APPROVER, "employeeID": e.employee_id} for e in seedmod.EMPLOYEES]
        return out

    # -- cards (§6) -----------------------------------------------------------------------------------------------

    def _check_domain(self, settings: dict, user: str) -> None:
        domain = settings.get("domain")
        if not isinstance(domain, str) or not domain:
            raise _Reject(410, "Argument 'domain' is missing or malformed")
        # the demo firm's card domain is the only one, and only the demo login administers it
        if domain.lower() != seedmod.CARD_DOMAIN or user != seedmod.EXPENSIFY_PARTNER_USER_ID:
            raise _Reject(403, f"You are not an admin of the domain '{domain}'")  # wording unknown (§6.1 [INF])

    def _domain_cards(self, settings: dict, user: str) -> _Response:
        self._check_domain(settings, user)
        cards = [{"bank": c.bank, "cardID": c.card_id, "cardName": c.name, "cardNumber": c.masked_number,
                  "email": c.owner, "externalEmployeeID": "", "created": "2025-01-02 03:04:05",
                  "lastImport": _ts(self._now().replace(hour=4, minute=0, second=0, microsecond=0)),
                  "lastImportResult": 200, "reimbursable": False, "scrapeMinDate": ""} for c in seedmod.CARDS]
        return _ok({"responseCode": 200, "domainCardList": cards})

    def _reconciliation(self, job: dict, settings: dict, params: dict, user: str) -> _Response:
        self._stats["reconciliation_jobs"] += 1
        kind = settings.get("type")
        if kind not in ("Unreported", "All"):
            raise _Reject(410, "Argument 'type' is missing or malformed")
        for key in ("startDate", "endDate"):
            if not settings.get(key):
                raise _Reject(410, f"Required parameter '{key}' is missing")
        start = _parse_day(settings["startDate"], "startDate")
        end = _parse_day(settings["endDate"], "endDate")
        self._check_domain(settings, user)
        feed = settings.get("feed", "export_all_feeds")
        if feed != "export_all_feeds" and feed not in {c.bank for c in seedmod.CARDS}:
            raise _Reject(410, f"Feed '{feed}' not found")
        output = job.get("outputSettings") if isinstance(job.get("outputSettings"), dict) else {}
        ext = str(output.get("fileExtension", "")).lower()
        if ext not in RECON_EXTENSIONS:
            raise _Reject(410, "Argument 'fileExtension' is missing or malformed")
        template_src = params.get("template")
        if not template_src:
            raise _Reject(410, "No Template Submitted")
        model = self._reconciliation_model(kind, start, end, feed, ext, template_src)
        try:
            text = Template(_template_source(template_src), name="reconciliation").render(model, now=self._now)
        except TemplateError:
            # sic "reconcilation": the message as recorded (expensify.md §6.2)
            raise _Reject(500, "Error encountered while trying to write reconcilation report to file.") from None
        name = f"is_reconciliation_{self._rng.randrange(10 ** 18, 10 ** 19)}.{ext}"
        # Reconciliation runs synchronously: the file is there at once (expensify.md §6.2)
        self._files[("reconciliation", name)] = _File(self._now_aware(), body=text.encode())
        return _ok({"filename": name, "responseMessage": "OK", "responseCode": 200})

    def _reconciliation_model(self, kind: str, start: date, end: date, feed: str, ext: str, source: str) -> dict:
        sign = -1 if self.knobs["reconciliation_spend_sign"] == "negative" else 1
        cards: dict = {}
        for card in seedmod.CARDS:
            if feed != "export_all_feeds" and card.bank != feed:
                continue
            reports = []
            if kind == "All":
                for report in self._sorted_reports():
                    if not self._sees(seedmod.EXPENSIFY_PARTNER_USER_ID, report.policy_id):
                        continue  # the card domain is the demo login's: other logins' reports are not its
                    txns = [e for e in report.expenses
                            if e.card and e.card.card_id == card.card_id and start <= e.created <= end]
                    if txns:
                        reports.append(self._recon_report(report, txns, card, sign))
            loose = [u for u in self._unreported if u.card.card_id == card.card_id and start <= u.created <= end]
            if loose:
                reports.append(self._recon_unreported(loose, card, sign))
            if reports:
                key = _Record(bank=card.bank, ID=card.card_id, name=card.name, owner=card.owner)
                cards[key] = reports
        model: dict = {"cards": cards, "addHeader": bool(self.knobs["add_header"]), "isCsv": ext == "csv"}
        # Extra maps only exist when the template imports them with an HTML comment (expensify.md §6.3)
        if "use categoryGLCodeMap" in source:
            model["categoryGLCodeMap"] = dict(seedmod.CATEGORIES)
        if "use cardOwnerData" in source:
            model["cardOwnerData"] = {e.email: {"employeeID": e.employee_id, "data": {}} for e in seedmod.EMPLOYEES}
        if "use reportPolicyData" in source:
            model["reportPolicyData"] = {seedmod.POLICY_ID: {
                "approver": seedmod.APPROVER, "name": seedmod.POLICY_NAME, "owner": seedmod.APPROVER,
                "outputCurrency": "EUR", "technicalContact": seedmod.APPROVER}}
        if "use repordFieldData" in source:
            model["reportFieldData"] = {}
        return model

    def _recon_report(self, report: _Report, txns: list[_Expense], card: seedmod.Card, sign: int) -> dict:
        state = report.state
        return {
            "ID": report.old_id, "currency": report.currency, "name": report.name, "policyID": report.policy_id,
            "managerEmail": seedmod.APPROVER, "submitterEmail": report.employee.email,
            "submitterID": _account_id(report.employee.email), "state": RECON_STATES[state],
            "status": STATUS_NAMES[state], "total": sign * report.total,
            "url": f"https://www.expensify.com/report?reportID={report.report_id}",
            "getApproved": lambda: _ts(report.approved) or None,
            "getSubmitted": lambda: _ts(report.submitted) or None,
            "hasAttachment": lambda: any(e.receipt_filename for e in report.expenses),
            "hasBeenApproved": lambda: report.approved is not None,
            "isACHReimbursed": lambda: False,
            "isClosed": lambda: state == "ARCHIVED",
            "isOpen": lambda: state == "OPEN",
            "isReimbursed": lambda: state == "REIMBURSED",
            "isReimbursementComplete": lambda: state == "REIMBURSED",
            "isSubmitted": lambda: state != "OPEN",
            "transactionList": [self._recon_txn(e, report.old_id, card, sign) for e in txns],
        }

    def _recon_unreported(self, loose: list, card: seedmod.Card, sign: int) -> dict:
        txns = []
        for u in loose:
            txns.append(self._recon_txn(_Expense(
                transaction_id=u.transaction_id, merchant=u.merchant, category=u.category, tag="", amount=u.amount,
                currency=u.currency, converted_amount=u.amount, rate=1.0, created=u.created, reimbursable=False,
                card=card, comment="", tax_name="", tax_amount=0, billable=False, receipt_filename="",
                inserted=datetime.combine(u.created, datetime.min.time())), 0, card, sign))
        return {
            "ID": 0, "currency": "", "name": "", "policyID": "", "managerEmail": "", "submitterEmail": card.owner,
            "submitterID": _account_id(card.owner), "state": "", "status": "", "total": sum(
                t["convertedAmount"] for t in txns), "url": "",
            "getApproved": lambda: None, "getSubmitted": lambda: None, "hasAttachment": lambda: False,
            "hasBeenApproved": lambda: False, "isACHReimbursed": lambda: False, "isClosed": lambda: False,
            "isOpen": lambda: False, "isReimbursed": lambda: False, "isReimbursementComplete": lambda: False,
            "isSubmitted": lambda: False, "transactionList": txns,
        }

    def _recon_txn(self, e: _Expense, report_id: int, card: seedmod.Card, sign: int) -> dict:
        modified = e.modified_amount is not None
        return {
            "ID": int(e.transaction_id), "reportID": report_id, "amount": sign * e.effective_amount,
            "bank": card.bank, "billable": e.billable, "cardID": card.card_id, "category": e.category,
            "comment": e.comment, "convertedAmount": sign * e.converted_amount,
            "created": (e.modified_created or e.created).isoformat(), "currency": e.currency,
            "currencyConversionRate": e.rate, "externalID": e.external_id, "isAmountModified": lambda: modified,
            "amountModified": modified, "isTagged": lambda: bool(e.tag), "originalAmount": sign * e.amount,
            "originalCreated": e.created.isoformat(), "originalCurrencyAmount": sign * e.amount,
            "originalMerchant": e.merchant, "maskedPAN": card.masked_number,
            "merchant": e.modified_merchant or e.merchant,
            "modifiedAmount": sign * e.modified_amount if modified else 0,  # 0, not empty, when unmodified (§6.3)
            "modifiedCreated": e.modified_created.isoformat() if e.modified_created else "",
            "modifiedMerchant": e.modified_merchant or "",
            "posted": (e.created + timedelta(days=1)).isoformat(),
            "receiptID": _numeric_id("receipt:" + e.receipt_filename, 10) if e.receipt_filename else 0,
            "receiptURL": f"https://www.expensify.com/receipts/{e.receipt_filename}" if e.receipt_filename else "",
            "reimbursable": e.reimbursable, "split": False, "tag": e.tag,
            "taxAmount": sign * e.tax_amount, "taxExternalID": "", "taxRate": "",
        }

    # -- Report Status Updater (§5.1) -----------------------------------------------------------------------------

    def _report_status(self, settings: dict, user: str) -> _Response:
        status = settings.get("status")
        if status != "REIMBURSED":
            raise _Reject(410, f"Status '{status}' is not supported")
        filters = settings.get("filters") if isinstance(settings.get("filters"), dict) else {}
        ids = _csv_list(filters.get("reportIDList"))
        if ids:
            targets = ids
        elif filters.get("startDate") and filters.get("endDate"):
            start = _parse_day(filters["startDate"], "startDate")
            end = _parse_day(filters["endDate"], "endDate")
            targets = [r.report_id for r in self._candidates(user, set()) if start <= r.filter_day <= end
                       and self._sees(user, r.policy_id)]
        else:
            raise _Reject(410, "Bad request. Verify the request parameters.")
        done, skipped = [], []
        for rid in targets:
            report = self._reports.get(rid)
            if report is None or not self._sees(user, report.policy_id):
                skipped.append({"reason": "Report not found", "reportID": rid})
            elif report.state != "APPROVED":
                skipped.append({"reason": f"Report is in status '{STATUS_NAMES[report.state]}'", "reportID": rid})
            else:
                report.state = "REIMBURSED"
                report.reimbursed = self._now()
                done.append(rid)
        # Partial runs still answer 200 (observed); 207 is documented but never seen (expensify.md §5.1)
        return _ok({"responseCode": 200, "reportIDs": done, "skippedReports": skipped})

    # -- control API ----------------------------------------------------------------------------------------------

    def _control(self, method: str, route: str, environ) -> tuple[int, object]:
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        raw = environ["wsgi.input"].read(length) if length > 0 else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            return 400, {"error": "body must be JSON"}
        try:
            if method == "GET" and route == "stats":
                return 200, self.stats
            if route == "knobs":
                if method == "POST":
                    return 200, self.set_knobs(**body)
                return 200, dict(self.knobs)
            if method == "POST" and route == "faults":
                if body.get("clear"):
                    self.faults.clear()
                elif "rate" in body:
                    self.faults.set_rate(body["target"], float(body["rate"]), tuple(body["faults"]), body.get("seed"))
                else:
                    self.faults.arm(body["target"], body["fault"], int(body.get("times", 1)))
                return 200, {"ok": True}
            if method == "GET" and route == "reports":
                return 200, self.reports()
            if method == "POST" and route == "reports":
                approved = datetime.fromisoformat(body["approved"]) if body.get("approved") else None
                rid = self.add_report(name=body.get("reportName", "Sandbox report"),
                                      employee_email=body.get("employeeEmail", seedmod.EMPLOYEES[0].email),
                                      expenses=body.get("expenses", []), state=body.get("state", "APPROVED"),
                                      approved=approved, currency=body.get("currency", "EUR"))
                return 200, {"reportID": rid}
            if method == "POST" and route.startswith("reports/"):
                rid = route[len("reports/"):]
                for edit in body.get("expenses", []):
                    self.edit_expense(rid, edit["transactionID"], amount=edit.get("amount"),
                                      category=edit.get("category"), tag=edit.get("tag"),
                                      merchant=edit.get("merchant"))
                if body.get("state"):
                    approved = body.get("approved")
                    approved = datetime.fromisoformat(approved) if approved and approved != "now" else None
                    self.set_report_state(rid, body["state"], approved=approved)
                with self._lock:
                    return 200, self._report_summary(self._report(rid))
        except (KeyError, ValueError, TypeError) as exc:
            return 400, {"error": str(exc)}
        return 404, {"error": f"unknown control route {method} {route}"}

    def _report_summary(self, report: _Report) -> dict:
        return {"reportID": report.report_id, "reportName": report.name, "state": report.state,
                "employeeEmail": report.employee.email, "created": _ts(report.created),
                "submitted": _ts(report.submitted), "approved": _ts(report.approved),
                "reimbursed": _ts(report.reimbursed), "total": report.total, "currency": report.currency,
                "labels": [dict(lab) for lab in report.labels],
                "expenses": [{"transactionID": e.transaction_id, "merchant": e.modified_merchant or e.merchant,
                              "amount": e.effective_amount, "convertedAmount": e.converted_amount,
                              "currency": e.currency, "category": e.category, "tag": e.tag} for e in report.expenses]}

    # -- helpers --------------------------------------------------------------------------------------------------

    def _report(self, report_id: str) -> _Report:
        try:
            return self._reports[report_id]
        except KeyError:
            raise KeyError(f"no report {report_id}") from None

    def _sorted_reports(self) -> list[_Report]:
        # Order by ID, which for base62 IDs is as good as random: clients must not rely on any order [INF]
        return sorted(self._reports.values(), key=lambda r: r.report_id)

    def _now_aware(self) -> datetime:
        return self.clock.now()

    def _now(self) -> datetime:
        """Naive UTC, the way report timestamps print (expensify.md §3 [INF])."""
        return self.clock.now().astimezone(timezone.utc).replace(tzinfo=None)


def _template_source(template_src: str) -> str:
    """The literal template "default" stands for a built-in template (PD sends it, expensify.md §2.1)."""
    return DEFAULT_EXPORT_TEMPLATE if template_src.strip() == "default" else template_src

"""Client for the Expensify Integration Server: report export + download polling, policy getter,
company-card reconciliation and export labels, all paced through one credential's rate limit."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx

from expensify_exact.api.expensify.fields import parse_report_timestamp, split_tag
from expensify_exact.api.http.client import PacedClient
from expensify_exact.api.http.pacing import RequestLog, SlidingWindowLimits
from expensify_exact.api.http.redaction import redact_text
from expensify_exact.clock import Clock
from expensify_exact.errors import (
    ApiError,
    AuthenticationError,
    RejectedByApi,
    TransientApiError,
)

logger = logging.getLogger(__name__)

SERVICE = "expensify"
EXPENSIFY_LIMITS = ((5, 10.0), (20, 60.0))  # requests per seconds, per credential (expensify.md §7)
# endDate may lie at most one year after the earliest selector date (expensify.md §2.1 `endDate`).
MAX_WINDOW_DAYS = 365
DEFAULT_STATES = ("APPROVED", "REIMBURSED")

_HERE = Path(__file__).parent
EXPORT_TEMPLATE = (_HERE / "template.ftl").read_text(encoding="utf-8")
RECONCILIATION_TEMPLATE = (_HERE / "reconciliation.ftl").read_text(encoding="utf-8")
# The labelling export only has to exist (a missing template is a 410, expensify.md §2.3); it is never downloaded.
_LABEL_TEMPLATE = ('{"reportIDs":[<#list reports as report>"${(report.reportID!"")?json_string}"<#sep>,</#sep>'
                   '</#list>],"end":true}')

# The Policy Getter sections the connector uses, all in the documented list ("categories", "reportFields", "tags",
# "tax"; docs/api-facts.md "Expensify policy getter"). Employees are left out: undocumented there, and not needed.
POLICY_FIELDS = ("categories", "tags", "tax")

# Messages Expensify uses for refused credentials, whatever responseCode carries them (expensify.md §7).
_AUTH_MESSAGES = ("authentication error", "no authentication method specified", "invalid credentials")
_HTML_TITLE = re.compile(r"<title>(.*?)</title>|<h1>(.*?)</h1>", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class PolicyCategory:
    name: str
    gl_code: str
    enabled: bool


@dataclass(frozen=True)
class PolicyTag:
    """One tag at one level; `path` is the name as Expensify prints it (``Level1:Level2`` in the flat shape)."""

    level: int
    name: str
    gl_code: str
    enabled: bool = True
    list_name: str = ""
    path: str = ""


@dataclass(frozen=True)
class PolicyTaxRate:
    rate_id: str
    name: str
    rate: float | None


@dataclass(frozen=True)
class PolicyInfo:
    policy_id: str
    categories: tuple[PolicyCategory, ...] = ()
    tags: tuple[PolicyTag, ...] = ()
    tax_rates: tuple[PolicyTaxRate, ...] = ()
    default_tax_rate_id: str = ""


@dataclass(frozen=True)
class ExportWindow:
    """One export job's server-side selection: approved strictly after `approved_after`, submitted by `end_date`."""

    approved_after: date
    end_date: date


def export_windows(start: date, end: date) -> list[ExportWindow]:
    """The export jobs needed to surely cover every report approved on local days `start`..`end`.

    The server filters by whole days of its own (naive, treated as UTC, expensify.md §3 [INF]) timestamps,
    while partitions are days in the connection's timezone, which can begin up to 14 h earlier or end up
    to 14 h later in UTC. So the UTC approval dates to cover are ``start - 1`` .. ``end + 1``.

    - ``approvedAfter`` keeps reports approved strictly after a day (§2.1), so it is one day before that.
    - ``endDate`` drops reports submitted after it (§2.1); submission precedes approval, so ``end + 1`` loses
      nothing. It is sent even when optional, to keep a backfill's jobs from returning everything since.
    - ``startDate`` is deliberately not sent: it filters on *submission*, which may precede approval by any
      amount, so any value would silently drop reports approved late; ``approvedAfter`` alone satisfies the
      "at least one selector" rule (§2.1 `filters`).
    - ``endDate - approvedAfter`` stays within a year (§2.1 `endDate`); a longer range is split, and a
      report whose submission falls in an earlier job is caught by both: callers dedupe on reportID.
    """
    if end < start:
        raise ValueError(f"export range ends ({end}) before it starts ({start})")
    after, last = start - timedelta(days=2), end + timedelta(days=1)
    windows = []
    while after < last:
        window_end = min(after + timedelta(days=MAX_WINDOW_DAYS), last)
        windows.append(ExportWindow(after, window_end))
        after = window_end
    return windows


def _date_windows(start: date, end: date) -> list[tuple[date, date]]:
    """Inclusive ≤ 1-year date ranges covering start..end (the reconciliation job's startDate/endDate)."""
    windows = []
    while start <= end:
        window_end = min(start + timedelta(days=MAX_WINDOW_DAYS - 1), end)
        windows.append((start, window_end))
        start = window_end + timedelta(days=1)
    return windows


class ExpensifyClient(PacedClient):
    """Talks to the Integration Server's single endpoint with one partner credential.

    All requests, download polls included, go through one PacedTransport, so this client never sends
    more than 5 requests per 10 s or 20 per minute (expensify.md §7); with a `request_log` shared by every
    client of the credential, neither do they together. `calls` counts requests per job kind.
    """

    def __init__(self, endpoint_url: str, partner_user_id: str, partner_user_secret: str, clock: Clock,
                 transport: httpx.BaseTransport | None = None, poll_interval_seconds: float = 5.0,
                 poll_timeout_seconds: float = 300, timeout: float = 60, request_log: RequestLog | None = None):
        super().__init__(SlidingWindowLimits(EXPENSIFY_LIMITS, log=request_log), clock, transport, timeout)
        self._endpoint_url = endpoint_url
        self._partner_user_id = partner_user_id
        self._partner_user_secret = partner_user_secret
        self._poll_interval = poll_interval_seconds
        self._poll_timeout = poll_timeout_seconds
        self.calls: dict[str, int] = {"export": 0, "download": 0, "policy": 0, "reconciliation": 0,
                                      "mark_exported": 0}

    def __repr__(self) -> str:
        return f"ExpensifyClient(endpoint_url={self._endpoint_url!r})"

    # ----------------------------------------------------------------------------------------- export

    def export_reports(self, start: date, end: date, policy_ids: Sequence[str],
                       states: Sequence[str] = DEFAULT_STATES, report_ids: Sequence[str] | None = None,
                       *, timezone: str = "UTC", source_timezone: str = "UTC") -> list[dict]:
        """Reports approved on the local days `start`..`end`, with their expenses, as the template renders them.

        Runs one export job per window of `export_windows` (a 365-day backfill takes two), downloads
        each file, dedupes on reportID and keeps the reports whose approval falls in the local range.
        Nothing is labelled: see `mark_exported`.

        Args:
            start: first approval day, in `timezone`.
            end: last approval day (inclusive), in `timezone`.
            policy_ids: the connection's policy IDs (``policyIDList``); empty means every policy.
            states: ``reportState`` values to select.
            report_ids: if given, only these reports (``reportIDList``).
            timezone: the connection's timezone, which defines the approval day.
            source_timezone: the zone of Expensify's naive timestamps (see `parse_report_timestamp`).

        Returns:
            Report dicts with the template's keys (``reportID``, ``approved``, ``transactionList`` …). A
            report whose ``approved`` is empty or unparseable is kept so normalization reports it as malformed.

        Raises:
            AuthenticationError: the credentials were refused.
            RejectedByApi: Expensify refused the job (responseCode 410 and other non-200 codes).
            TransientApiError: 5xx, HTML error pages, 429s after retries, or no file within the poll timeout.
        """
        zone = ZoneInfo(timezone)
        lower = datetime.combine(start, time(), zone)
        upper = datetime.combine(end + timedelta(days=1), time(), zone)
        by_id: dict[str, dict] = {}
        for window in export_windows(start, end):
            filters = {"approvedAfter": window.approved_after.isoformat(), "endDate": window.end_date.isoformat()}
            if policy_ids:
                filters["policyIDList"] = ",".join(policy_ids)
            if report_ids:
                filters["reportIDList"] = ",".join(report_ids)
            filename = self._submit_export("export", states, filters, EXPORT_TEMPLATE)
            document = self._download(filename, "integrationServer", _export_complete, wait_first=True)
            for report in document["reports"]:
                by_id.setdefault(str(report.get("reportID", "")), report)
        return [r for r in by_id.values() if _approved_within(r, lower, upper, source_timezone)]

    def export_reports_by_id(self, report_ids: Sequence[str], policy_ids: Sequence[str], *, approved_since: date,
                             states: Sequence[str] = DEFAULT_STATES, timezone: str = "UTC",
                             source_timezone: str = "UTC") -> list[dict]:
        """The current content of these reports, if they are (still) approved: re-export for a quarantine replay.

        A report may have been reopened and approved again since it was quarantined, so the window runs from
        `approved_since` to today (the client's clock, in `timezone`), in as many ≤ 1-year jobs as that takes,
        each narrowed by ``reportIDList``.

        Args:
            report_ids: the reports to fetch; nothing is sent when empty.
            policy_ids: the connection's policy IDs (``policyIDList``).
            approved_since: the earliest approval day (in `timezone`) any of them can have.
            states: ``reportState`` values; a report in another state (e.g. reopened) is simply not returned.
            timezone: the connection's timezone.
            source_timezone: the zone of Expensify's naive timestamps.

        Returns:
            Report dicts as `export_reports` returns them, only for the requested IDs.

        Raises:
            AuthenticationError, RejectedByApi, TransientApiError: as for `export_reports`.
        """
        wanted = {str(r) for r in report_ids}
        if not wanted:
            return []
        today = self._clock.now().astimezone(ZoneInfo(timezone)).date()
        reports = self.export_reports(min(approved_since, today), today, policy_ids, states,
                                      report_ids=sorted(wanted), timezone=timezone, source_timezone=source_timezone)
        return [r for r in reports if str(r.get("reportID", "")) in wanted]

    def mark_exported(self, report_ids: Sequence[str], label: str,
                      states: Sequence[str] = ("APPROVED", "REIMBURSED", "ARCHIVED")) -> None:
        """Label exactly these reports as exported, with a second export job (expensify.md §2.2 safe pattern).

        The label is applied when the job finishes, not on download, and cannot be removed, so this is
        only called for reports already downloaded, verified and posted. The file is not downloaded.

        Args:
            report_ids: the reports to label (``reportIDList``); nothing is sent when empty.
            label: the ``markAsExported`` label.
            states: ``reportState`` values; wide, so a report reimbursed or closed since still matches.

        Raises:
            AuthenticationError, RejectedByApi, TransientApiError: as for `export_reports`.
        """
        if not report_ids:
            return
        self._submit_export("mark_exported", states, {"reportIDList": ",".join(report_ids)}, _LABEL_TEMPLATE,
                            on_finish=[{"actionName": "markAsExported", "label": label}])

    def _submit_export(self, kind: str, states: Sequence[str], filters: dict[str, str], template: str,
                       on_finish: list[dict] | None = None) -> str:
        job: dict[str, Any] = {
            "type": "file",
            "credentials": self._credentials(),
            "onReceive": {"immediateResponse": ["returnRandomFileName"]},
            "inputSettings": {"type": "combinedReportData", "reportState": ",".join(states), "filters": filters},
            "outputSettings": {"fileExtension": "json"},
        }
        if on_finish:
            job["onFinish"] = on_finish
        text = self._post(kind, job, template).strip()
        # The exporter answers a bare file name; only an error comes as a JSON envelope (expensify.md §2.2).
        if text.startswith("{"):
            envelope = self._envelope(kind, text)
            raise self._error(kind, envelope, text)
        if not text or "\n" in text:
            raise TransientApiError(SERVICE, f"{kind}: the exporter answered no file name",
                                    body_excerpt=self._excerpt(text))
        logger.debug("expensify %s job queued as %s", kind, text)
        return text

    # --------------------------------------------------------------------------------------- download

    def _download(self, filename: str, file_system: str, complete: Callable[[Any], str | None],
                  wait_first: bool) -> Any:
        """Poll the downloader until `complete(document)` returns None (done) or the poll timeout passes.

        Rendering is asynchronous with no ready signal (expensify.md §2.2), so an empty body, an error
        envelope, unparseable text or a document without its trailer all mean "not ready yet".
        """
        deadline = self._clock.now() + timedelta(seconds=self._poll_timeout)
        job = {"type": "download", "credentials": self._credentials(), "fileName": filename,
               "fileSystem": file_system}
        if wait_first:
            self._clock.sleep(self._poll_interval)
        while True:
            text = self._post("download", job)
            not_ready = self._not_ready_reason(text, complete)
            if not_ready is None:
                return json.loads(text)
            if self._clock.now() + timedelta(seconds=self._poll_interval) > deadline:
                raise TransientApiError(
                    SERVICE, f"download: {filename} not ready after {self._poll_timeout:g} s ({not_ready})",
                    body_excerpt=self._excerpt(text))
            logger.debug("expensify download %s not ready: %s", filename, not_ready)
            self._clock.sleep(self._poll_interval)

    def _not_ready_reason(self, text: str, complete: Callable[[Any], str | None]) -> str | None:
        if not text.strip():
            return "empty body"
        try:
            document = json.loads(text)
        except ValueError:
            return "the file does not parse as JSON yet"
        if isinstance(document, dict) and "responseCode" in document and "end" not in document:
            code = _response_code(document)
            if code == 200:
                return "an OK envelope instead of the file"
            error = self._error("download", document, text)
            # Refused credentials or a refused request will not fix themselves by waiting.
            if isinstance(error, AuthenticationError) or code == 410:
                raise error
            return f"responseCode {code}: {document.get('responseMessage', '')}"
        return complete(document)

    # ----------------------------------------------------------------------------------------- policy

    def get_policies(self, policy_ids: Sequence[str]) -> dict[str, PolicyInfo]:
        """Categories, tags and tax rates of these policies (Policy Getter, expensify.md §4.2).

        Only the documented sections are asked for (`POLICY_FIELDS`); a category or tag without a GL code
        (no ``glCode`` key, null or empty) has ``gl_code == ""``.

        Args:
            policy_ids: the policies to read.

        Returns:
            PolicyInfo per policy ID Expensify returned; tags from both shapes (flat ``A:B`` paths and
            per-level lists) flattened to (level, name, glCode).

        Raises:
            AuthenticationError, RejectedByApi, TransientApiError: as for `export_reports`.
        """
        if not policy_ids:
            return {}
        job = {"type": "get", "credentials": self._credentials(),
               "inputSettings": {"type": "policy", "fields": list(POLICY_FIELDS),
                                 "policyIDList": list(policy_ids)}}
        text = self._post("policy", job)
        envelope = self._envelope("policy", text)
        if _response_code(envelope) != 200:
            raise self._error("policy", envelope, text)
        info = envelope.get("policyInfo") or {}
        return {policy_id: _policy_info(policy_id, body or {}) for policy_id, body in info.items()}

    # -------------------------------------------------------------------------------- reconciliation

    def unreported_card_transactions(self, start: date, end: date, domain: str,
                                     feed: str = "export_all_feeds") -> list[dict]:
        """Company-card transactions on no report yet, via the reconciliation job (expensify.md §6.2).

        The reconciliation dialect is negative for spend (§6.3); the returned ``amount_cents`` is
        flipped to this project's convention: positive for spend, negative for refunds and credits.
        ``modifiedAmount`` wins when non-zero (0 means "not modified" in this dialect, §6.3).

        Args:
            start: first transaction day (``startDate``).
            end: last transaction day (``endDate``); ranges over a year run as several jobs.
            domain: the card domain (domain-admin credentials required).
            feed: one feed name, or ``export_all_feeds``.

        Returns:
            One dict per transaction: transaction_id, report_id, card_id, card_name, card_bank, card_owner,
            card_number_masked, amount_cents, currency, transaction_date, posted_date, merchant, category,
            tag, comment. ``amount_cents`` is None if the file carries no amount at all.

        Raises:
            AuthenticationError, RejectedByApi, TransientApiError: as for `export_reports`.
        """
        by_id: dict[str, dict] = {}
        for window_start, window_end in _date_windows(start, end):
            job = {"type": "reconciliation", "credentials": self._credentials(),
                   "inputSettings": {"type": "Unreported", "startDate": window_start.isoformat(),
                                     "endDate": window_end.isoformat(), "domain": domain, "feed": feed,
                                     "async": False},
                   "outputSettings": {"fileExtension": "json"}}
            text = self._post("reconciliation", job, RECONCILIATION_TEMPLATE)
            envelope = self._envelope("reconciliation", text)
            if _response_code(envelope) != 200 or not envelope.get("filename"):
                raise self._error("reconciliation", envelope, text)
            # Reconciliation is synchronous (async:false, §6.2): the file can be fetched at once.
            document = self._download(envelope["filename"], "reconciliation", _reconciliation_complete,
                                      wait_first=False)
            for raw in document["transactions"]:
                if raw is None:  # the template's trailing sentinel
                    continue
                transaction = _card_transaction(raw)
                # reportID 0 is "unreported"; <0 deleted, >0 on a report (§6.3).
                if transaction["report_id"] == "0":
                    by_id.setdefault(transaction["transaction_id"], transaction)
        return list(by_id.values())

    # ---------------------------------------------------------------------------------------- plumbing

    def _credentials(self) -> dict[str, str]:
        return {"partnerUserID": self._partner_user_id, "partnerUserSecret": self._partner_user_secret}

    def _post(self, kind: str, job: dict, template: str | None = None) -> str:
        """Send one job; return the body of an HTTP 200 answer, or raise for transport and HTTP failures."""
        # The template is its own form field, never part of the JSON (expensify.md §2.1, §9.2 #2).
        form = {"requestJobDescription": json.dumps(job)}
        if template is not None:
            form["template"] = template
        self.calls[kind] += 1
        response: httpx.Response | None = None
        try:
            response = self._http.post(self._endpoint_url, data=form)
        except httpx.TransportError as exc:
            what = "request timed out" if isinstance(exc, httpx.TimeoutException) else "connection failed"
            failure = f"{kind}: {what} ({type(exc).__name__}: {self._excerpt(str(exc))})"
        if response is None:
            # Raised outside the except block so neither __cause__ nor __context__ keeps the httpx error:
            # it holds the request, whose body carries the partner secret.
            raise TransientApiError(SERVICE, failure)
        text = response.text
        if response.status_code == 429:
            raise TransientApiError(SERVICE, f"{kind}: still rate-limited after paced retries",
                                    status=429, body_excerpt=self._excerpt(text))
        if response.status_code != 200 or text.lstrip().lower().startswith(("<!doctype", "<html")):
            # Servlet-level failures arrive as Tomcat HTML pages (expensify.md §7).
            title = _html_title(text) or response.reason_phrase
            error = AuthenticationError if response.status_code in (401, 403) else TransientApiError
            raise error(SERVICE, f"{kind}: {title}", status=response.status_code,
                        body_excerpt=self._excerpt(text))
        return text

    def _envelope(self, kind: str, text: str) -> dict:
        try:
            envelope = json.loads(text)
        except ValueError:
            envelope = None
        if not isinstance(envelope, dict) or "responseCode" not in envelope:
            raise TransientApiError(SERVICE, f"{kind}: expected a JSON envelope with a responseCode",
                                    body_excerpt=self._excerpt(text))
        return envelope

    def _error(self, kind: str, envelope: dict, text: str) -> ApiError:
        """The typed error for a non-200 responseCode; HTTP is 200 for all of these (expensify.md §1, §7)."""
        code = _response_code(envelope)
        message = str(envelope.get("responseMessage") or "no responseMessage")
        is_auth_message = any(m in message.lower() for m in _AUTH_MESSAGES)
        if code in (401, 403) or (code == 404 and is_auth_message):
            error_type: type[ApiError] = AuthenticationError
        elif code is not None and 500 <= code < 600:
            error_type = TransientApiError
        else:
            error_type = RejectedByApi
        return error_type(SERVICE, f"{kind}: {self._excerpt(message)}", status=200,
                          reason=f"responseCode {code}", body_excerpt=self._excerpt(text))

    def _excerpt(self, text: str) -> str:
        return redact_text(text, secrets=(self._partner_user_secret, self._partner_user_id), limit=300)


def _response_code(envelope: dict) -> int | None:
    try:
        return int(envelope.get("responseCode"))
    except (TypeError, ValueError):
        return None


def _html_title(text: str) -> str:
    match = _HTML_TITLE.search(text)
    if not match:
        return ""
    return re.sub(r"\s+", " ", match.group(1) or match.group(2) or "").strip()[:200]


def _export_complete(document: Any) -> str | None:
    if not isinstance(document, dict) or not isinstance(document.get("reports"), list):
        return "no reports list"
    if document.get("end") is not True:
        return "no end trailer"
    if document.get("count") != len(document["reports"]):
        raise TransientApiError(SERVICE, f"download: file lists {len(document['reports'])} reports "
                                         f"but its trailer counts {document.get('count')!r}")
    return None


def _reconciliation_complete(document: Any) -> str | None:
    if not isinstance(document, dict) or not isinstance(document.get("transactions"), list):
        return "no transactions list"
    if document.get("end") is not True:
        return "no end trailer"
    return None


def _approved_within(report: dict, lower: datetime, upper: datetime, source_timezone: str) -> bool:
    try:
        approved = parse_report_timestamp(report.get("approved"), source_timezone)
    except ValueError:
        return True  # kept so that normalization reports it, rather than dropped unseen
    return approved is None or lower <= approved < upper


def _text(value: Any) -> str:
    """A code or name as text, whether Expensify typed it as a string or a number (4520, 4520.0 → "4520")."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "" if value is None else str(value)


def _policy_info(policy_id: str, body: dict) -> PolicyInfo:
    categories = tuple(
        PolicyCategory(_text(c.get("name")), _text(c.get("glCode")), c.get("enabled", True) is not False)
        for c in body.get("categories") or [])
    tax = body.get("tax") or {}
    rates = tuple(PolicyTaxRate(_text(r.get("rateID")), _text(r.get("name")),
                                float(r["rate"]) if r.get("rate") not in (None, "") else None)
                  for r in tax.get("rates") or [])
    return PolicyInfo(policy_id, categories, tuple(_policy_tags(body.get("tags") or [])), rates,
                      _text(tax.get("default")))


def _policy_tags(entries: Iterable[dict]) -> list[PolicyTag]:
    """Both tag shapes of expensify.md §4.2, which may be mixed in one response."""
    tags: list[PolicyTag] = []
    implied: dict[tuple[int, str], PolicyTag] = {}
    level = 0
    for entry in entries:
        if isinstance(entry.get("tags"), list):
            # Per-level shape: {"name": "<list name>", "tags": [{name, enabled, glCode}]}; list n is level n.
            level += 1
            for tag in entry["tags"]:
                name = _text(tag.get("name"))
                tags.append(PolicyTag(level, name, _text(tag.get("glCode")), tag.get("enabled", True) is not False,
                                      _text(entry.get("name")), name))
        else:
            # Flat shape: the multi-level path joined by ":" (a literal colon escaped as "\:"), leaves only.
            path = _text(entry.get("name"))
            parts = split_tag(path) or [""]
            tags.append(PolicyTag(len(parts), parts[-1], _text(entry.get("glCode")),
                                  entry.get("enabled", True) is not False, "", path))
            # Its ancestors exist too (an office above its projects), though they carry no GL code here.
            for depth in range(1, len(parts)):
                ancestor = ":".join(part.replace(":", "\\:") for part in parts[:depth])
                implied.setdefault((depth, parts[depth - 1]),
                                   PolicyTag(depth, parts[depth - 1], "", True, "", ancestor))
    explicit = {(t.level, t.name) for t in tags}
    return tags + [t for key, t in implied.items() if key not in explicit]


def _card_amount(raw: dict) -> int | None:
    if raw.get("modifiedAmount") not in (None, "", 0):
        return int(raw["modifiedAmount"])
    for key in ("amount", "originalAmount"):
        if raw.get(key) not in (None, ""):
            return int(raw[key])
    return None


def _card_transaction(raw: dict) -> dict:
    amount = _card_amount(raw)
    return {
        "transaction_id": _text(raw.get("transactionID")),
        "report_id": _text(raw.get("reportID")),
        "card_id": _text(raw.get("cardID")),
        "card_name": _text(raw.get("cardName")),
        "card_bank": _text(raw.get("bank")),
        "card_owner": _text(raw.get("cardOwner")),
        "card_number_masked": _text(raw.get("maskedPAN")),
        # Reconciliation data is negative for spend (expensify.md §6.3); this project's spend is positive.
        "amount_cents": -amount if amount is not None else None,
        "currency": _text(raw.get("currency")),
        "transaction_date": _text(raw.get("modifiedCreated") or raw.get("created")),
        "posted_date": _text(raw.get("posted")),
        "merchant": _text(raw.get("modifiedMerchant") or raw.get("merchant")),
        "category": _text(raw.get("category")),
        "tag": _text(raw.get("tag")),
        "comment": _text(raw.get("comment")),
    }

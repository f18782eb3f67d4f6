"""What deserves an alert, found in the connector's state, and its delivery to e-mail and a chat webhook, once per
alert and channel (the alert's key in the state database). Sensors in `defs/alerts.py` only call these."""

from __future__ import annotations

import hashlib
import html
import json
from dataclasses import dataclass
from datetime import datetime, timedelta

from expensify_exact.config import Connection
from expensify_exact.core.posting import STOPPED_BY_DAILY_BUDGET, STOPPED_BY_REFUSAL
from expensify_exact.notify import ALERT_WEBHOOK_URL
from expensify_exact.notify.chat import chat_payload, post_chat
from expensify_exact.notify.mail import build_message, send_mail, send_once, smtp_login
from expensify_exact.store import QuarantineStatus, StateStore
from expensify_exact.store.vault import CredentialVault

RUN_FAILED = "run_failed"
QUARANTINE_OVERDUE = "quarantine_overdue"
TOKEN_IDLE = "token_idle"
REPORTS_DEFERRED = "reports_deferred"
CONNECTION_REFUSED = "connection_refused"
RECONCILIATION_FINDINGS = "reconciliation_findings"
DEFERRED_LOOKBACK = timedelta(days=7)  # deferred events older than this are not looked at again


@dataclass(frozen=True)
class Alert:
    kind: str
    connection: str
    key: str  # the same problem always gets the same key, so it is told once
    title: str
    text: str


def channels(conn: Connection) -> list[str]:
    """The configured channels of a connection's alerts: "email", "webhook"."""
    alerts = conn.notify.alerts
    return [name for name, on in (("email", bool(alerts.email_to)), ("webhook", alerts.webhook_format is not None))
            if on]


def deliver(alert: Alert, conn: Connection, store: StateStore, vault: CredentialVault, *,
            transport=None) -> list[str]:
    """Send `alert` to each configured channel that has not had it yet; returns the channels it went to now.

    Each channel is its own "sent once" record, so a webhook that fails does not make the e-mail go out twice.
    Raises NotificationError (after trying every channel) if one failed; it is retried on the next call.
    """
    sent, errors = [], []
    alerts = conn.notify.alerts
    for channel in channels(conn):
        if channel == "email":
            def send() -> dict:
                message = build_message(conn.notify.smtp.sender, alerts.email_to, alert.title, alert.text,
                                        _html(alert))
                send_mail(conn.notify.smtp, message, smtp_login(vault, conn.name))
                return {"channel": "email", "recipients": len(alerts.email_to)}
        else:
            def send() -> dict:
                post_chat(vault.get(conn.name, ALERT_WEBHOOK_URL),
                          chat_payload(alerts.webhook_format, alert.title, alert.text), transport=transport)
                return {"channel": "webhook", "format": alerts.webhook_format}
        try:
            if send_once(store, f"{alert.key}|{channel}", kind=alert.kind, connection=conn.name, send=send):
                sent.append(channel)
        except Exception as exc:  # noqa: BLE001 - every channel gets its chance; the first error is raised below
            errors.append(exc)
    if errors:
        raise errors[0]
    return sent


def _html(alert: Alert) -> str:
    body = "".join(f"<p>{html.escape(p)}</p>" for p in alert.text.split("\n") if p.strip())
    return (f'<!DOCTYPE html><html><body style="font-family:Arial,Helvetica,sans-serif;font-size:14px">'
            f"<h1 style=\"font-size:18px\">{html.escape(alert.title)}</h1>{body}</body></html>\n")


# --- what deserves an alert ---------------------------------------------------------------------------

def run_failed(conn: Connection, job_name: str, run_id: str, message: str, partitions: str = "") -> Alert:
    what = f" for {partitions}" if partitions else ""
    return Alert(RUN_FAILED, conn.name, f"{RUN_FAILED}:{run_id}:{conn.name}",
                 f"[expensify-exact] {job_name} failed{what} ({conn.name})",
                 f"The Dagster run {run_id} of {job_name}{what} failed.\n{message.strip()}\n"
                 f"Nothing is posted twice by rerunning it: rerun the run (or its days) once the cause is fixed.")


def overdue_quarantine(conn: Connection, store: StateStore, now: datetime) -> list[Alert]:
    """One alert per open quarantine item waiting longer than `notify.alerts.quarantine_max_age_days`."""
    days = conn.notify.alerts.quarantine_max_age_days
    out = []
    for item in store.quarantine_items(conn.name, status=QuarantineStatus.OPEN):
        age = now - item.first_seen_at
        if age < timedelta(days=days):
            continue
        codes = ", ".join(sorted({str(r.get("code", "")) for r in item.reasons}))
        out.append(Alert(
            QUARANTINE_OVERDUE, conn.name,
            f"{QUARANTINE_OVERDUE}:{conn.name}:{item.report_id}:{item.first_seen_at.isoformat()}",
            f"[expensify-exact] report {item.report_id} waits in quarantine for {age.days} days ({conn.name})",
            f"Report {item.report_id} (approved {item.partition_date or '?'}) has been quarantined since "
            f"{item.first_seen_at:%Y-%m-%d} ({codes}), longer than {days} days.\n"
            f"See `expensify-exact quarantine show {item.report_id}`; fix the cause, then "
            f"`expensify-exact quarantine replay --connection {conn.name}`."))
    return out


def idle_refresh_token(conn: Connection, store: StateStore, now: datetime) -> list[Alert]:
    """An alert once the refresh token has not been renewed for `notify.alerts.token_idle_days` (Exact drops it
    after 30 idle days, and then a person has to re-authorize)."""
    ages = store.token_ages().get(conn.name)
    if ages is None:
        return []
    refresh_issued = ages[1]
    if refresh_issued.year <= 2000:
        return []  # stored by `secrets set` and never exchanged: its real age is unknown
    idle = now - refresh_issued
    limit = conn.notify.alerts.token_idle_days
    if idle < timedelta(days=limit):
        return []
    expires = refresh_issued + timedelta(days=30)
    return [Alert(TOKEN_IDLE, conn.name, f"{TOKEN_IDLE}:{conn.name}:{refresh_issued.isoformat()}",
                  f"[expensify-exact] Exact refresh token idle for {idle.days} days ({conn.name})",
                  f"The Exact refresh token of {conn.name} was last renewed {refresh_issued:%Y-%m-%d %H:%M} UTC and "
                  f"expires unused at {expires:%Y-%m-%d %H:%M} UTC.\nA successful run renews it; if runs keep "
                  f"failing, run `expensify-exact authorize --connection {conn.name}` before it expires.")]


def deferred_reports(conn: Connection, store: StateStore, now: datetime) -> list[Alert]:
    """One alert per run that deferred reports to the next run, saying why for each (audit events `deferred`):
    Exact's daily call budget or an endpoint's hourly error budget was spent, a POST got no certain answer, a
    report was not sent. A run in which Exact refused the connection (a 403 such as a blocked user, missing rights
    or the error-limit block; a 401 after a refresh; the division out of reach) is its own kind: a person must act."""
    runs: dict[str, list[dict]] = {}
    for row in store.audit_rows(conn.name, since=now - DEFERRED_LOOKBACK):
        if row["event"] == "deferred":
            runs.setdefault(row["run_id"] or f"audit-{row['id']}", []).append(row)
    out = []
    for run_id, rows in runs.items():
        why: dict[str, set[str]] = {}  # reason -> reports
        stopped_by, resets = set(), None
        for row in rows:
            detail = json.loads(row["detail"] or "{}")
            reason = detail.get("reason") or "deferred"
            if detail.get("reports"):  # the connection stopped: its reason ends "; N report(s) wait for ..."
                reason = reason.rsplit("; ", 1)[0]
                stopped_by.add(detail.get("stopped_by"))
            why.setdefault(reason, set()).update(r for r in detail.get("reports") or [row["report_id"]] if r)
            resets = detail.get("resets_at") or resets
        reports = sorted(set().union(*why.values()))
        refused = STOPPED_BY_REFUSAL in stopped_by
        kind = CONNECTION_REFUSED if refused else REPORTS_DEFERRED
        if refused:
            title = f"Exact refused the connection: {len(reports)} report(s) deferred"
            then = (f"Exact refuses this connection (its Reason is quoted above). Fix the cause — `expensify-exact "
                    f"preflight --connection {conn.name}` says what to do — and the next run posts them, once.")
        elif stopped_by == {STOPPED_BY_DAILY_BUDGET} and len(why) == 1:
            title = f"Exact's daily budget ran out: {len(reports)} report(s) deferred"
            then = f"The budget resets at {resets or 'the daily reset'}; the next run posts them, once."
        else:
            title = f"{len(reports)} report(s) deferred to the next run"
            then = "The next run settles them first and posts what Exact does not hold, once."
        lines = [f"- {reason}: {_listed(sorted(group))}" for reason, group in why.items()]
        out.append(Alert(
            kind, conn.name, f"{kind}:{conn.name}:{run_id}", f"[expensify-exact] {title} ({conn.name})",
            f"At {rows[0]['at']:%Y-%m-%d %H:%M} UTC (run {run_id}) posting to Exact division {conn.exact.division} "
            f"deferred {len(reports)} report(s) to the next run:\n" + "\n".join(lines)
            + f"\n{then} Nothing is lost."))
    return out


def _listed(reports: list[str], limit: int = 50) -> str:
    return ", ".join(reports[:limit]) + (" …" if len(reports) > limit else "")


def reconciliation_findings(conn: Connection, run_id: str, days: list[str], counts: dict[str, int]) -> Alert:
    """An alert for a reconciliation run that found differences (`counts`: finding code -> number)."""
    fingerprint = hashlib.sha256(repr(sorted(counts.items())).encode()).hexdigest()[:12]
    span = days[0] if len(days) == 1 else f"{days[0]}..{days[-1]}"
    total = sum(counts.values())
    return Alert(RECONCILIATION_FINDINGS, conn.name, f"{RECONCILIATION_FINDINGS}:{conn.name}:{run_id}:{fingerprint}",
                 f"[expensify-exact] reconciliation found {total} difference(s) for {span} ({conn.name})",
                 f"The reconciliation of {span} (run {run_id}) found: "
                 + ", ".join(f"{code} × {n}" for code, n in sorted(counts.items())) + ".\n"
                 f"The day's digest and the asset reconciliation/daily (partitions {conn.name}|<day>) list each "
                 f"finding with what to do.")

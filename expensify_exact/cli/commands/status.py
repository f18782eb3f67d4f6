"""`expensify-exact status`: the overview of every connection, worst first with totals (`core.overview`), and for
one connection (or with `--details`) what an operator checks first — credentials, tokens, Exact's rate budget, the
open quarantine and the ledger — plus the latest runs of the main job on the Dagster instance.

Reads only the state database and the Dagster instance; `--live` spends two Exact calls to read the rate budget.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from datetime import datetime, timedelta, timezone

from expensify_exact.cli.support import EXIT_CONFIG, dagster_home_path, open_connections, print_outcome
from expensify_exact.core.overview import (NEVER_EXCHANGED, Concern, Health, connection_overview, display,
                                           display_totals, totals)
from expensify_exact.errors import ConfigError, ConnectorError
from expensify_exact.store import IntentStatus, QuarantineStatus

RECENT_RUNS = 5
OVERVIEW_LINES = 40  # the worst connections the text shows; `--all` shows every one
RATE_BUDGET_EVENT = "exact_rate_budget"  # audit event `check` and `status --live` write
# The overview's findings that make `status` exit 1: they stop, or will soon stop, a connection's runs.
EXIT_CONCERNS = {Concern.NO_TOKENS, Concern.TOKEN_EXPIRED, Concern.TOKEN_OLD, Concern.RUN_FAILED,
                 Concern.RUN_OVERDUE, Concern.PENDING_INTENTS}


class _At:
    """The clock of one `status`: every "now" and "yesterday" it shows is read at the same moment."""

    def __init__(self, now: datetime):
        self._now = now

    def now(self) -> datetime:
        return self._now

    def sleep(self, seconds: float) -> None:
        raise RuntimeError("status never waits")


def collect_status(connector, connections, instance, now: datetime, live: bool = False,
                   details: bool = True) -> dict:
    """Everything `status` shows, as one JSON-ready dict; `instance` may be None (no Dagster instance yet).

    `overview` has a row per connection, worst first, and the totals; `connections` the details of each connection
    when `details` is set, else nothing: at hundreds of connections the details are the per-connection reads the
    overview avoids (`status` shows them for one connection, or with `--details`).
    """
    store = connector.store()
    config = connector.project().model_copy(update={"connections": list(connections)})
    rows = connection_overview(config, store, _At(now))
    out: dict = {"checked_at": now.isoformat(),
                 "overview": {"rows": [row.as_dict() for row in rows], "totals": totals(rows).as_dict()},
                 "connections": {}, "runs": _recent_runs(instance)}
    if details:
        by_name = {row.connection: row for row in rows}
        out["connections"] = _details(connector, connections, by_name, now, live)
    return out


def _details(connector, connections, rows: dict, now: datetime, live: bool) -> dict:
    from expensify_exact.core.connections import SECRET_NAMES, secret_scope

    required = _required_secrets()
    store = connector.store()
    stored = {(scope, name) for scope, name, _ in store.list_secrets()}
    token_ages = store.token_ages()
    audited_budgets = store.latest_audit_events(RATE_BUDGET_EVENT)
    out = {}
    for conn in connections:
        issued = token_ages.get(conn.name)
        credentials = {name: (secret_scope(conn, name), name) in stored for name in SECRET_NAMES}
        credentials["exact_tokens"] = issued is not None
        notify_needs = _notify_secrets(conn, stored)
        credentials |= {name: (conn.name, name) in stored for name in notify_needs}
        quarantine = store.quarantine_items(connection=conn.name, status=QuarantineStatus.OPEN)
        by_reason = Counter(code for item in quarantine for code in {r.get("code", "?") for r in item.reasons})
        ledger = Counter(row.status for row in store.ledger_rows(connection=conn.name))
        out[conn.name] = {
            "exact_division": conn.exact.division,
            "credentials": credentials,
            # Optional ones (a webhook secret, say) are listed but never reported as missing.
            "missing_credentials": sorted(name for name, present in credentials.items()
                                          if not present and (name in required or name in notify_needs)),
            "notify": _notify(store, conn),
            "tokens": _tokens(connector, conn, issued, now),
            "rate_budget": (_live_budget(connector, conn) if live else None)
                           or _recorded_budget(store, conn, audited_budgets.get(conn.name)),
            "quarantine_open": len(quarantine),
            "quarantine_by_reason": dict(sorted(by_reason.items())),
            "ledger": {"posted": ledger.get(IntentStatus.POSTED, 0), "pending": ledger.get(IntentStatus.PENDING, 0)},
            "error_budget": _error_budget(store, conn, now),
            "last_run": rows[conn.name].as_dict()["last_run"],
            "last_complete_day": _last_complete_day(store, conn),
        }
    return out


def _notify_secrets(conn, stored: set[tuple[str, str]]) -> list[str]:
    """The vault secrets the connection's `notify` settings need: the webhook URL once a webhook format is set,
    the SMTP password once an SMTP user is stored."""
    from expensify_exact.notify import ALERT_WEBHOOK_URL, SMTP_PASSWORD, SMTP_USERNAME

    needs = [ALERT_WEBHOOK_URL] if conn.notify.alerts.webhook_format else []
    return needs + ([SMTP_PASSWORD] if (conn.name, SMTP_USERNAME) in stored else [])


def _notify(store, conn) -> dict:
    from expensify_exact.notify.alerts import channels
    from expensify_exact.notify.mail import DIGEST_KIND

    mailed = store.notifications_sent(DIGEST_KIND, conn.name)
    return {"digest_to": len(conn.notify.digest.to), "alert_channels": channels(conn),
            "last_digest_mailed": max((row["key"].rsplit(":", 1)[1] for row in mailed), default=None)}


def _error_budget(store, conn, now: datetime) -> list[dict]:
    """Errors Exact answered this clock hour per endpoint of the connection's division (exact-online.md §6)."""
    from expensify_exact.api.exact.client import ERROR_BUDGET_PER_ENDPOINT

    hour = now.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)
    prefix = f"exact:{conn.exact.division}:"
    return [{"endpoint": row["scope"][len(prefix):], "errors": row["errors"], "limit": ERROR_BUDGET_PER_ENDPOINT,
             "stopped": row["errors"] >= ERROR_BUDGET_PER_ENDPOINT, "last_status": row["last_status"],
             "last_message": row["last_message"]}
            for row in store.error_budget_rows(hour) if row["scope"].startswith(prefix) and row["hour"] == hour]


def _last_complete_day(store, conn) -> dict:
    """The newest approval day run after it ended in the connection's zone, when, and what still waits."""
    last = store.last_day_posted(conn.name)
    return {"day": last[0] if last else None, "posted_at": last[1].isoformat() if last else None,
            "timezone": conn.timezone, "deferred_reports": len(store.deferred(conn.name))}


def _required_secrets() -> set[str]:
    from expensify_exact.core import connections as c

    return {c.EXPENSIFY_USER_ID, c.EXPENSIFY_USER_SECRET, c.EXACT_CLIENT_ID, c.EXACT_CLIENT_SECRET, "exact_tokens"}


def needs_attention(status: dict) -> list[str]:
    """What makes `status` exit 1: things that stop or will soon stop the next run — the overview's findings of that
    kind for every connection, and what the details show for the connections they cover. Open quarantine does not."""
    reasons = []
    for row in status["overview"]["rows"]:
        reasons += [f"{row['connection']}: {finding['text']}" for finding in row["findings"]
                    if finding["concern"] in EXIT_CONCERNS]
    for name, conn in status["connections"].items():
        if conn["missing_credentials"]:
            reasons.append(f"{name}: missing {', '.join(conn['missing_credentials'])}")
        if conn["tokens"].get("error"):
            reasons.append(f"{name}: {conn['tokens']['error']}")
        for spent in conn.get("error_budget") or []:
            if spent["stopped"]:
                reasons.append(f"{name}: Exact answered {spent['errors']} errors on {spent['endpoint']} this hour; "
                               f"the connector does not call it again before the next hour (Exact blocks at 10)")
    runs = status["runs"].get("latest") or []
    if runs and runs[0]["status"] == "FAILURE":
        reasons.append(f"the latest run {runs[0]['run_id']} failed")
    return reasons


def _tokens(connector, conn, issued, now: datetime) -> dict:
    from expensify_exact.api.exact.auth import TokenRefresher
    from expensify_exact.core.connections import VaultTokenStore

    if issued is None:
        return {"stored": False}
    access_issued, refresh_issued = issued
    if refresh_issued <= NEVER_EXCHANGED:
        return {"stored": True, "issued_at": None, "note": "refresh token stored but not yet exchanged; "
                                                           "the first run trades it for an access token"}
    info = {"stored": True, "issued_at": access_issued.isoformat(), "age_seconds": int((now - access_issued)
                                                                                        .total_seconds()),
            "refresh_issued_at": refresh_issued.isoformat(), "idle_warning": None}
    try:
        # Only the token store is read: no client ID or secret is needed, and nothing is refreshed.
        refresher = TokenRefresher(VaultTokenStore(connector.store(), connector.vault()), conn.name, "", "", "",
                                   connector.clock())
        info["idle_warning"] = refresher.refresh_token_idle_warning(now)
    except ConnectorError as exc:
        info["error"] = f"cannot read the stored tokens: {exc}"
    return info


def _live_budget(connector, conn) -> dict | None:
    """Two cheap calls: current/Me (no rate headers, exact-online.md §6) then system/Divisions, which has them."""
    try:
        with connector.exact_client(conn) as client:
            client.check_division()
            status = client.rate_limits.status()
    except ConnectorError as exc:
        return {"source": "live", "error": str(exc)}
    now = connector.clock().now()
    connector.store().audit(RATE_BUDGET_EVENT, connection=conn.name, detail=status | {"source": "status --live"})
    return {"source": "live", "as_of": now.isoformat(), **_budget_fields(status)}


def _recorded_budget(store, conn, audited) -> dict | None:
    """The newest budget known without calling Exact: the last answer any run got (the shared rate-limit board), or
    the last `check` / `status --live` (`audited`, its audit row)."""
    from expensify_exact.core.connections import StoredRateLimitBoard

    candidates = []
    shared = StoredRateLimitBoard(store, conn.exact.division).load()
    if shared is not None and shared.remaining_daily is not None:
        candidates.append({"source": "the last Exact answer", "as_of": shared.observed_at.isoformat(),
                           "remaining_daily": shared.remaining_daily,
                           "daily_resets_at": shared.daily_resets_at.isoformat() if shared.daily_resets_at else None,
                           "remaining_minutely": shared.remaining_minutely})
    if audited is not None and audited.detail:
        candidates.append({"source": f"audit ({audited.detail.get('source', '?')})", "as_of": audited.at.isoformat(),
                           **_budget_fields(audited.detail)})
    return max(candidates, key=lambda c: c["as_of"]) if candidates else None


def _budget_fields(status: dict) -> dict:
    return {key: status.get(key) for key in ("remaining_daily", "daily_resets_at", "remaining_minutely")}


def _recent_runs(instance) -> dict:
    import dagster as dg

    from expensify_exact.defs.jobs import MAIN_JOB_NAME

    if instance is None:
        return {"dagster_home": os.environ.get("DAGSTER_HOME"), "latest": [],
                "note": "no Dagster instance yet: nothing has run"}
    records = instance.get_run_records(filters=dg.RunsFilter(job_name=MAIN_JOB_NAME), limit=RECENT_RUNS)
    latest = []
    for record in records:
        run = record.dagster_run
        tags = run.tags
        start = tags.get("dagster/asset_partition_range_start") or tags.get("dagster/partition")
        end = tags.get("dagster/asset_partition_range_end") or start
        latest.append({
            "run_id": run.run_id, "status": run.status.value,
            "started_at": _ts(record.start_time or record.create_timestamp.timestamp()),
            "ended_at": _ts(record.end_time), "days": f"{start}..{end}" if start and start != end else start,
        })
    return {"dagster_home": os.environ.get("DAGSTER_HOME"), "job": MAIN_JOB_NAME, "latest": latest}


def _ts(value: float | None) -> str | None:
    return datetime.fromtimestamp(value, timezone.utc).isoformat() if value else None


def render_overview(overview: dict, show_all: bool = False) -> list[str]:
    """The overview as a fixed-width table: the `OVERVIEW_LINES` worst connections (all with `show_all`), what is
    left out counted by health, and the totals."""
    rows = overview["rows"]
    shown = rows if show_all else rows[:OVERVIEW_LINES]
    table = [display(row) for row in shown]
    left_out = Counter(row["health"] for row in rows[len(shown):])
    total = display_totals(overview["totals"])
    columns = list(total)
    widths = {c: max([len(c)] + [len(line[c]) for line in [*table, total]]) for c in columns[:-1]}

    def line(values: dict[str, str]) -> str:
        return "  ".join([values[c].ljust(widths[c]) for c in columns[:-1]] + [values[columns[-1]]]).rstrip()

    out = [line({c: c.upper() for c in columns}), *(line(values) for values in table)]
    if left_out:
        out.append(f"… {sum(left_out.values())} more: "
                   + ", ".join(f"{left_out[str(h)]} {h}" for h in Health if left_out[str(h)])
                   + " (`status --all` lists them, `--json` gives every row)")
    return [*out, line(total)]


def render_text(status: dict, show_all: bool = False) -> str:
    from expensify_exact.core.digest import age_text

    lines = render_overview(status["overview"], show_all)
    for name, conn in status["connections"].items():
        lines.append(f"{name} (Exact division {conn['exact_division']})")
        present = [n for n, ok in conn["credentials"].items() if ok]
        optional = [n for n, ok in conn["credentials"].items() if not ok and n not in conn["missing_credentials"]]
        lines.append(f"  credentials   present: {', '.join(present) or 'none'}"
                     + (f"; MISSING: {', '.join(conn['missing_credentials'])}" if conn["missing_credentials"] else "")
                     + (f"; not set (optional): {', '.join(optional)}" if optional else ""))
        notify = conn["notify"]
        lines.append("  notify        "
                     + (f"digest to {notify['digest_to']} recipient(s), last mailed "
                        f"{notify['last_digest_mailed'] or 'never'}" if notify["digest_to"] else "digest not mailed")
                     + f"; alerts: {', '.join(notify['alert_channels']) or 'none'}")
        tokens = conn["tokens"]
        if not tokens["stored"]:
            lines.append("  exact tokens  none: run `expensify-exact authorize` or `secrets set` with a refresh token")
        elif tokens.get("issued_at") is None:
            lines.append(f"  exact tokens  {tokens['note']}")
        else:
            lines.append(f"  exact tokens  last rotated {age_text(timedelta(seconds=tokens['age_seconds']))} ago "
                         f"({tokens['issued_at'][:16]}Z)")
        for key in ("idle_warning", "error"):
            if tokens.get(key):
                lines.append(f"  WARNING       {tokens[key]}")
        budget = conn["rate_budget"]
        if budget is None:
            lines.append("  rate budget   unknown (no run or check recorded it; `status --live` asks Exact)")
        elif budget.get("error"):
            lines.append(f"  rate budget   could not ask Exact: {budget['error']}")
        else:
            resets = f" (resets {budget['daily_resets_at'][:16]}Z)" if budget.get("daily_resets_at") else ""
            minute = (f", {budget['remaining_minutely']} this minute" if budget.get("remaining_minutely") is not None
                      else "")
            lines.append(f"  rate budget   {budget['remaining_daily']} calls left today{resets}{minute}; "
                         f"as of {budget['as_of'][:16]}Z from {budget['source']}")
        reasons = ", ".join(f"{code} {n}" for code, n in conn["quarantine_by_reason"].items())
        lines.append(f"  quarantine    {conn['quarantine_open']} open report(s)" + (f": {reasons}" if reasons else ""))
        lines.append(f"  ledger        {conn['ledger']['posted']} posted, {conn['ledger']['pending']} pending")
        day = conn["last_complete_day"]
        lines.append(f"  last day      {day['day']} ({day['timezone']}) posted at {day['posted_at'][:16]}Z"
                     if day["day"] else f"  last day      none posted yet ({day['timezone']})")
        if day["deferred_reports"]:
            lines[-1] += (f"; {day['deferred_reports']} deferred report(s) wait to be tried again "
                          f"(sensor post_deferred_after_reset)")
        for spent in conn.get("error_budget") or []:
            state = "STOPPED until the next hour" if spent["stopped"] else "calls go on"
            lines.append(f"  exact errors  {spent['endpoint']}: {spent['errors']}/{spent['limit']} this hour, {state} "
                         f"(last: HTTP {spent['last_status']} {spent['last_message']})")
        run = conn["last_run"]
        if run:
            counts = ", ".join(f"{what} {n}" for what, n in run["counts"].items())
            lines.append(f"  last run      {(run['run_id'] or '-')[:8]} at {run['at'][:16]}Z: {run['outcome']}"
                         + (f" ({run['days']})" if run["days"] else "") + (f"; {counts}" if counts else "")
                         + (f": {run['error']}" if run["error"] else ""))
        else:
            lines.append("  last run      none recorded yet")
    runs = status["runs"]
    lines.append(f"latest runs of {runs.get('job', 'the main job')} (DAGSTER_HOME={runs['dagster_home']})")
    if not runs["latest"]:
        lines.append(f"  {runs.get('note', 'none')}")
    for run in runs["latest"]:
        lines.append(f"  {run['run_id'][:8]}  {run['status']:<9} {(run['started_at'] or '')[:16]}Z  "
                     f"days {run['days'] or '-'}")
    return "\n".join(lines)


def _instance():
    """The Dagster instance at $DAGSTER_HOME (default ./.dagster_home), or None if there is none yet."""
    import dagster as dg

    home = dagster_home_path()
    os.environ["DAGSTER_HOME"] = str(home)
    if not home.is_dir():
        return None
    return dg.DagsterInstance.get()


def cmd_status(args) -> int:
    try:
        connector, _, connections = open_connections(args)
    except ConfigError as exc:
        print(json.dumps({"config_error": str(exc)}) if args.json else f"config error: {exc}")
        return EXIT_CONFIG
    instance = _instance()
    try:
        status = collect_status(connector, connections, instance, connector.clock().now(), live=args.live,
                                details=args.details or len(connections) == 1)
    finally:
        if instance is not None:
            instance.dispose()
    attention = needs_attention(status)
    status["attention"] = attention
    shown = attention if args.all else attention[:OVERVIEW_LINES]
    more = [f"… and {len(attention) - len(shown)} more (`status --all`)"] if len(shown) < len(attention) else []
    return print_outcome(args, status, [render_text(status, args.all), *(f"attention: {r}" for r in shown), *more],
                         failed=bool(attention))


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "status", help="every connection's health worst first, with totals; details per connection",
        description="A table of every connection, worst first, with totals: health (ok, attention, failing) and why, "
                    "reports posted for yesterday in the connection's zone, open quarantine by reason code, the age "
                    "of the Exact refresh token, Exact's calls left today and the last run. For one connection (or "
                    "with --details): which credentials are stored (names only, never values), the Exact tokens and "
                    "a warning when the refresh token nears Exact's 30-day idle expiry, the rate budget as last "
                    "recorded, ledger counts and Exact's errors this hour. Then the latest "
                    f"{RECENT_RUNS} runs of the main job on the Dagster instance at $DAGSTER_HOME.",
        epilog="Everything comes from the state database (and the Dagster instance for the latest runs), in a few "
               "queries for all connections. The rate budget is the newest of: the last Exact answer any run got, "
               "or the last `check` or `status --live` (audit log). `--live` asks Exact with two calls "
               "(current/Me carries no rate headers, system/Divisions does). Exit codes: 0 nothing needs "
               "attention (open quarantine does not count), 1 something does (missing credentials, no or old "
               "refresh token, a connection's last run failed or is overdue, unsettled posting intents, the latest "
               "run failed), 3 invalid configuration.",
    )
    p.add_argument("--connection", help="only this connection (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object (every overview row, and the details)")
    p.add_argument("--live", action="store_true", help="ask Exact for the current rate budget (2 API calls each)")
    p.add_argument("--all", action="store_true", help=f"list every connection, not only the {OVERVIEW_LINES} worst")
    p.add_argument("--details", action="store_true",
                   help="the details of every connection shown (default: only when there is one)")
    p.set_defaults(func=cmd_status)

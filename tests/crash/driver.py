"""A small poster for tests: the plain-Python functions the main job's assets run (export → normalize → fetch
dimensions → build drafts → post_drafts), for one date range, fast enough to start and kill many times.

Also builds a large sandbox seed of valid reports for the crash tests.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from datetime import date, datetime, time, timedelta

from expensify_exact.api.exact.auth import ExactAuth
from expensify_exact.api.exact.client import ExactClient
from expensify_exact.clock import SystemClock
from expensify_exact.config import load_project_config
from expensify_exact.core.connections import build_expensify_client, build_token_refresher, exact_base_url
from expensify_exact.core.pipeline import drafts_for_reports
from expensify_exact.core.posting import PostingRun, post_drafts
from expensify_exact.core.snapshots import fetch_dimensions
from expensify_exact.errors import ConnectorError
from expensify_exact.store import StateStore
from expensify_exact.store.vault import CredentialVault
from expensify_exact_sandbox import seed as S

EXIT_API_ERROR = 3


class HurriedClock(SystemClock):
    """Real time, but no wait longer than 50 ms: an injected 429 announces a reset up to a minute away, and the
    pacing that honours it is tested elsewhere (tests/unit/test_pacing.py); here it would only cost minutes."""

    def sleep(self, seconds: float) -> None:
        super().sleep(min(seconds, 0.05))


def exact_client(conn, vault: CredentialVault, store: StateStore, timeout: float = 30.0) -> ExactClient:
    """The connection's Exact client with a short timeout and backoff, so injected faults cost little time."""
    clock = HurriedClock()
    auth = ExactAuth(build_token_refresher(conn, vault, store, clock))
    return ExactClient(exact_base_url(conn), conn.exact.division, auth, clock, timeout=timeout,
                       backoff_seconds=0.05, max_backoff_seconds=0.2)


def post_window(mappings_dir: str, state_url: str, start: date, end: date, *, timeout: float = 30.0,
                run_id: str | None = None, skip_posted: bool = False) -> dict[str, PostingRun]:
    """Post every approved report of start..end for every connection, as the main job does; returns the runs.

    `skip_posted` hands post_drafts only the reports the ledger does not show as posted. post_drafts would skip
    those as already posted anyway (their content never changes in the crash tests); leaving them out keeps a
    restart of a 200-report poster fast. Pending intents, the subject of the crash tests, are never left out.
    """
    config = load_project_config(mappings_dir)
    store = StateStore(state_url)
    vault = CredentialVault(store)
    runs = {}
    try:
        for conn in config.connections:
            with build_expensify_client(conn, vault) as expensify:
                reports = expensify.export_reports(start, end, conn.expensify.policy_ids, timezone=conn.timezone,
                                                   source_timezone=conn.expensify.timestamp_timezone)
            if skip_posted:
                posted = {r.report_id for r in store.ledger_rows(conn.name, status="posted")}
                reports = [r for r in reports if str(r.get("reportID")) not in posted]
            with exact_client(conn, vault, store, timeout) as exact:
                dims = fetch_dimensions(exact)
                drafts = drafts_for_reports(reports, conn, config, dims, today=end)
                runs[conn.name] = post_drafts(drafts, connection=conn.name, store=store, client=exact,
                                              run_id=run_id, clock=SystemClock())
    finally:
        store.dispose()
    return runs


def poster_process(fernet_key: str, mappings_dir: str, state_url: str, start: date, end: date,
                   timeout: float) -> None:
    """Entry point of a killable poster process: exit 0 when the range is settled, 3 on an API error or when a report
    was deferred to the next run (no certain answer from Exact)."""
    os.environ["EXPENSIFY_EXACT_KEY"] = fernet_key  # the forkserver started under another test's key
    try:
        runs = post_window(mappings_dir, state_url, start, end, timeout=timeout, run_id=f"poster-{os.getpid()}",
                           skip_posted=True)
    except ConnectorError as exc:
        print(f"poster {os.getpid()}: {exc}", file=sys.stderr)
        sys.exit(EXIT_API_ERROR)
    deferred = [o.report_id for run in runs.values() for o in run.outcomes if o.outcome == "deferred"]
    if deferred:
        print(f"poster {os.getpid()}: {len(deferred)} report(s) deferred to the next run", file=sys.stderr)
        sys.exit(EXIT_API_ERROR)
    sys.exit(0)


# (merchant, category, office, project, amount in cents, tax name): all map and validate in the sandbox.
_VALID_LINES = (
    ("NS Reizigers", "Travel", "Amsterdam", "P1001 Rijkswaterstaat", 2340, "Laag 9%"),
    ("Hotel Okura", "Hotel", "Rotterdam", "P1002 Zuidas", 18950, "Laag 9%"),
    ("Restaurant De Kas", "Meals", "Utrecht", "P1003 Havenbedrijf", 8675, "Hoog 21%"),
    ("Uber", "Taxi", "Amsterdam", "Internal", 2712, ""),
    ("Staples", "Office Supplies", "Rotterdam", "Internal", 4599, "Hoog 21%"),
    ("Coursera", "Training", "Utrecht", "Internal", 3900, ""),
)


def many_reports_seed(today: date, count: int, days: int = 10) -> S.Seed:
    """`count` approved, valid reports (1–2 expenses each) spread over the `days` days before `today`."""
    seed = S.Seed(today=today)
    employees = [e for e in S.EMPLOYEES if e.email != S.APPROVER]
    for n in range(count):
        approved_day = today - timedelta(days=1 + n % days)
        approved = datetime.combine(approved_day, time(hour=9 + n % 8, minute=n % 60))
        expenses = []
        for k in range(1 + n % 2):
            merchant, category, office, project, amount, tax = _VALID_LINES[(n + k) % len(_VALID_LINES)]
            amount += n  # every report a different total
            rate = {"Hoog 21%": 0.21, "Laag 9%": 0.09}.get(tax, 0.0)
            expenses.append(S.Expense(
                transaction_id=str(4056343049400000000 + n * 10 + k), merchant=merchant, category=category,
                tag=f"{office}:{project}", amount=amount, currency="EUR", converted_amount=amount, rate=1.0,
                created=approved_day - timedelta(days=2), reimbursable=True, tax_name=tax,
                tax_amount=round(amount * rate / (1 + rate)) if rate else 0))
        seed.reports.append(S.Report(
            report_id=S._report_id(5000 + n), name=f"Crash test {n}", employee=employees[n % len(employees)],
            currency="EUR", created=approved - timedelta(days=2), submitted=approved - timedelta(days=1),
            approved=approved, expenses=tuple(expenses)))
    return seed


def report_of_entry(entry: dict) -> str:
    """The Expensify report ID an Exact entry belongs to: every line's Description starts `report/transaction`."""
    ids = {line["Description"].split("/", 1)[0] for line in entry["lines"]}
    assert len(ids) == 1, f"entry {entry['EntryID']} mixes reports {ids}"
    return ids.pop()


def assert_exactly_once_and_ledger_matches(sandbox, state_url: str, expected: set[str], connection: str,
                                           division: int = S.DIVISION) -> None:
    """Every expected report is in the division exactly once, no intent is left open, and the ledger records for
    each report the entry Exact holds."""
    entries = sandbox.exact.entries(division)
    per_report = Counter(report_of_entry(e) for e in entries)
    duplicates = {r: n for r, n in per_report.items() if n > 1}
    assert duplicates == {}, f"reports posted more than once: {duplicates}"
    assert set(per_report) == expected
    store = StateStore(state_url)
    try:
        ledger = store.ledger_rows(connection)
    finally:
        store.dispose()
    assert [r.report_id for r in ledger if r.status != "posted"] == [], "an intent was left unsettled"
    assert {(r.report_id, r.entry_id.lower(), r.entry_number) for r in ledger} == \
        {(report_of_entry(e), e["EntryID"].lower(), e["EntryNumber"]) for e in entries}

"""Builders for test data: Exact dimension snapshots from the sandbox seed, and expense lines by hand."""

from __future__ import annotations

import io
import threading
from datetime import date, datetime, timedelta, timezone

import pandas as pd
import sqlalchemy as sa

from expensify_exact.core.journal import Dimensions
from expensify_exact_sandbox import seed


def seed_dimensions() -> Dimensions:
    gl = pd.DataFrame([{"id": a.id, "code": a.code, "description": a.description, "type": a.type,
                        "is_blocked": a.blocked, "use_costcenter": a.use_costcenter, "use_costunit": a.use_costunit}
                       for a in seed.GL_ACCOUNTS])
    centers = pd.DataFrame([{"id": d.id("costcenter"), "code": d.code, "description": d.description,
                             "end_date": d.end_date} for d in seed.COST_CENTERS])
    units = pd.DataFrame([{"id": d.id("costunit"), "code": d.code, "description": d.description,
                           "end_date": d.end_date} for d in seed.COST_UNITS])
    journals = pd.DataFrame([{"id": seed.stable_guid("journal", j.code), "code": j.code, "description": j.description,
                              "type": j.type, "allow_vat": j.allow_vat,
                              "allow_variable_currency": j.allow_variable_currency, "is_blocked": False}
                             for j in seed.JOURNALS])
    vat = pd.DataFrame([{"id": seed.stable_guid("vat", v.code), "code": v.code, "description": v.description,
                         "type": v.type, "percentage": v.percentage, "is_blocked": False} for v in seed.VAT_CODES])
    periods = pd.DataFrame([{"fin_year": y, "fin_period": m, "start_date": date(y, m, 1),
                             "end_date": (date(y + (m == 12), m % 12 + 1, 1) - pd.Timedelta(days=1))}
                            for y in seed.FINANCIAL_YEARS for m in range(1, 13)])
    periods["end_date"] = periods["end_date"].map(lambda v: v.date() if hasattr(v, "date") else v)
    return Dimensions(gl_accounts=gl, cost_centers=centers, cost_units=units, journals=journals, vat_codes=vat,
                      financial_periods=periods)


def expense_line(report_id: str = "R00TEST00001", transaction_id: str = "1001", **overrides) -> dict:
    """One normalized expense line (docs/architecture.md), a cash expense in EUR unless overridden."""
    approved = datetime(2026, 11, 10, 9, 30, tzinfo=timezone.utc)
    row = {
        "report_id": report_id, "transaction_id": transaction_id, "policy_id": seed.POLICY_ID,
        "report_name": "Test report", "employee_email": "anna.devries@vermeerhals.nl", "report_state": "APPROVED",
        "report_currency": "EUR", "approved_at": approved, "submitted_at": approved, "reimbursed_at": pd.NaT,
        "partition_date": "2026-11-10", "expense_date": "2026-11-08", "merchant": "NS Reizigers",
        "category": "Travel", "category_gl_code": "4500", "tag": "Amsterdam:P1001 Rijkswaterstaat",
        "tag_1": "Amsterdam", "tag_2": "P1001 Rijkswaterstaat", "tag_3": "", "amount_cents": 2340,
        "currency": "EUR", "converted_amount_cents": 2340, "exchange_rate": 1.0, "reimbursable": True,
        "billable": True, "tax_name": "", "tax_code": "", "tax_amount_cents": 0, "card_bank": "", "card_id": "",
        "card_number_masked": "", "comment": "", "receipt_url": "",
    }
    row.update(overrides)
    return row


def lines(*rows: dict) -> pd.DataFrame:
    return pd.DataFrame(list(rows))


class FakeClock:
    """A Clock whose sleeps move its time forward at once and are recorded, so tests can assert the waits."""

    def __init__(self, start: datetime):
        self.current = start
        self.sleeps: list[float] = []
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self.current

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            self.current += timedelta(seconds=max(0.0, seconds))

    def advance(self, seconds: float) -> None:
        self.sleep(seconds)


def run_cli(mappings, state_url: str, *args: str) -> int:
    """`expensify-exact --mappings M --state-url S ARGS…` in this process; returns the exit code."""
    from expensify_exact.cli.main import main

    return main(["--mappings", str(mappings), "--state-url", state_url, *args])


def store_demo_secrets(mappings, state_url: str, names, *, sandbox=None, monkeypatch=None,
                       credential: str | None = None) -> None:
    """`secrets set --from-env` for each connection of `names` (and once for the shared Expensify login
    `credential`); each connection after the first gets an Exact consent of its own, a refresh token being one
    chain's."""
    if credential:
        assert run_cli(mappings, state_url, "secrets", "set", "--credential", credential, "--from-env") == 0
    for name in names:
        assert run_cli(mappings, state_url, "secrets", "set", "--connection", name, "--from-env") == 0
    for name in names[1:]:
        token = sandbox.exact.auth.issue_consent(refreshable_now=True)["refresh_token"]
        monkeypatch.setattr("sys.stdin", io.StringIO(token + "\n"))
        assert run_cli(mappings, state_url, "secrets", "set", "--connection", name, "--stdin",
                       "exact_refresh_token") == 0


def state_rows(state_url: str) -> dict[str, list[tuple]]:
    """Every row of every table of the state DB, in a stable order: two dumps are equal only if nothing was written
    in between (tokens, ledger, quarantine, audit, deferrals, days posted, snapshots, rate records, locks)."""
    engine = sa.create_engine(state_url)
    try:
        with engine.connect() as conn:
            tables = sa.MetaData()
            tables.reflect(conn)
            return {name: sorted(tuple(str(v) for v in row) for row in conn.execute(table.select()))
                    for name, table in sorted(tables.tables.items())}
    finally:
        engine.dispose()

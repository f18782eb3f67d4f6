"""What the validation passes, Exact accepts: drafts built from the sandbox's own data are all taken by its Exact.

The demo's reports are exported through the Expensify client, normalized, checked against dimension snapshots read
through the Exact client, and every valid draft is POSTed over real HTTP. A refusal here means the connector's
rules let through something Exact refuses (or the reverse would be a missed quarantine): both are bugs. The demo is
run with the shipped mappings (including VAT codes), with an excluding 21 % VAT code (which needs a rounding line on
the demo's 86.75 dinner), and with added USD reports on a variable-currency journal and a EUR-only one.
"""

from datetime import datetime, time, timedelta

import pytest
import yaml

from expensify_exact.cli.main import main
from expensify_exact.config import load_project_config
from expensify_exact.core.connections import build_exact_client, build_expensify_client
from expensify_exact.core.draft_checks import split_invalid_drafts
from expensify_exact.core.expense_lines import normalize_reports
from expensify_exact.core.journal import build_journal_drafts, content_hash, entry_body, entry_id_for
from expensify_exact.core.snapshots import fetch_dimensions
from expensify_exact.store import StateStore
from expensify_exact.store.vault import CredentialVault
from expensify_exact_sandbox import seed
from expensify_exact_sandbox.clock import SandboxClock
from expensify_exact_sandbox.server import SandboxServer
from tests.conftest import write_mappings

CONNECTION = "vermeerhals-nl"


def _edit(mappings, filename: str, change) -> None:
    path = mappings / filename
    document = yaml.safe_load(path.read_text())
    change(document)
    path.write_text(yaml.safe_dump(document, sort_keys=False))


def _run(server: SandboxServer, mappings, state_url: str) -> dict:
    """Export the demo window, build and check drafts, post every valid one; what was posted and what was refused."""
    server.exact.set_knobs(minutely_limit=10_000)  # the pacing is tested elsewhere; here it would only add minutes
    assert main(["--mappings", str(mappings), "--state-url", state_url, "secrets", "set", "--connection", CONNECTION,
                 "--from-env"]) == 0
    config = load_project_config(mappings)
    conn = config.connection(CONNECTION)
    store = StateStore(state_url)
    vault = CredentialVault(store)
    today = server.seed.today
    try:
        with build_expensify_client(conn, vault) as expensify:
            reports = expensify.export_reports(today - timedelta(days=31), today - timedelta(days=1),
                                               conn.expensify.policy_ids, timezone=conn.timezone,
                                               source_timezone=conn.expensify.timestamp_timezone)
        normalized = normalize_reports(reports, conn.timezone, source_timezone=conn.expensify.timestamp_timezone)
        assert normalized.malformed.empty, normalized.malformed
        with build_exact_client(conn, vault, store) as exact:
            dims = fetch_dimensions(exact)
            drafts = build_journal_drafts(normalized.lines, conn, config, dims, run_date=today)
            drafts, failures = split_invalid_drafts(drafts)
            assert failures.empty, failures
            posted, refused = {}, {}
            for report_id, lines in drafts.lines.groupby("report_id"):
                body = entry_body(lines)
                body["EntryID"] = entry_id_for(CONNECTION, report_id, content_hash(body))
                answer = exact.send_general_journal_entry(body)
                if answer.kind == "created":
                    posted[report_id] = answer.entry
                else:
                    refused[report_id] = answer.message
    finally:
        store.dispose()
    return {"drafts": drafts, "posted": posted, "refused": refused, "reports": normalized.lines["report_id"].nunique()}


def _rejected(result) -> dict[str, set[str]]:
    return {r: set(g["code"]) for r, g in result["drafts"].rejections.groupby("report_id")}


def _posted_lines(server: SandboxServer) -> list[dict]:
    return [line for entry in server.exact.entries(seed.DIVISION) for line in entry["transaction_lines"]]


def test_every_demo_report_the_validation_passes_is_accepted_by_exact_with_the_shipped_mappings(
        sandbox, sandbox_mappings, state_url):
    result = _run(sandbox, sandbox_mappings, state_url)
    assert result["refused"] == {}
    assert _rejected(result) == {seed._report_id(101): {"UNMAPPED_CATEGORY"},
                                 seed._report_id(102): {"UNKNOWN_COST_CENTER"}}
    assert len(result["posted"]) == result["reports"] - 2 >= 25
    vat_codes = {line["VATCode"] for line in _posted_lines(sandbox)}
    assert {"1", "2"} <= vat_codes, "the demo's tax names reach Exact as including VAT codes"


def test_with_an_excluding_vat_code_the_demo_posts_nets_and_a_rounding_line_and_exact_takes_all(
        sandbox, sandbox_mappings, state_url):
    _edit(sandbox_mappings, "vat.yaml", lambda d: d["vat_codes"].update({"Hoog 21%": "5"}))
    result = _run(sandbox, sandbox_mappings, state_url)
    assert result["refused"] == {}
    assert len(result["posted"]) == result["reports"] - 2
    lines = result["drafts"].lines
    assert (lines["side"] == "rounding").any(), "86.75 gross at 21 % excluding has no exact net"
    posted = _posted_lines(sandbox)
    assert any(line["GLAccountCode"] == "4990" for line in posted)
    assert any(line["VATCode"] == "5" and line["GLAccountCode"] == "1500" for line in posted), "Exact's VAT line"


def _usd_reports(today) -> list[seed.Report]:
    employee = seed.EMPLOYEES[0]
    approved = datetime.combine(today - timedelta(days=3), time(10, 30))

    def usd(rid: int, k: int, amount: int, **kw) -> seed.Expense:
        return seed.Expense(seed._transaction_id(rid, k), "Amtrak", "Travel", "Utrecht:P1003 Havenbedrijf", amount,
                            "USD", amount, 1.0, today - timedelta(days=5), True, **kw)

    return [
        # Three 10.06 USD lines: 3 × 9.26 EUR converted one by one, 27.77 EUR for the report total at 0.92.
        seed.Report(seed._report_id(200), "US trip", employee, "USD", approved - timedelta(days=2),
                    approved - timedelta(days=1), approved, tuple(usd(200, k, 1006) for k in range(3))),
        # A USD report with an excluding-VAT tax name and a refund.
        seed.Report(seed._report_id(201), "US trip 2", employee, "USD", approved - timedelta(days=2),
                    approved - timedelta(days=1), approved,
                    (usd(201, 0, 1000, tax_name="Hoog 21%"), usd(201, 1, -333, tax_name="Hoog 21%"))),
    ]


@pytest.mark.parametrize(
    ("connection", "currency"),
    [
        # Journal 90 allows variable currency: the USD reports go in as USD and Exact converts them.
        ({}, "USD"),
        # Journal 91 posts only EUR: the connector converts at the configured rate; residues go to 4990.
        ({"exact__journal": "91", "posting__exchange_rates": {"USD": 0.92}}, "EUR"),
    ],
)
def test_foreign_currency_reports_post_in_their_currency_or_converted_and_exact_takes_all(
        tmp_path, state_url, connection, currency):
    clock = SandboxClock()
    data = seed.build_seed(clock.now().date())
    data.reports.extend(_usd_reports(data.today))
    with SandboxServer(clock=clock, seed=data) as server:
        server.expensify.set_knobs(render_delay_seconds=0.3)
        mappings = write_mappings(tmp_path / "mappings", server, expensify__poll_interval_seconds=0.2, **connection)
        _edit(mappings, "vat.yaml", lambda d: d["vat_codes"].update({"Hoog 21%": "5"}))
        result = _run(server, mappings, state_url)
        entries = {e["EntryID"]: e for e in server.exact.entries(seed.DIVISION)}
    assert result["refused"] == {}
    us = [seed._report_id(200), seed._report_id(201)]
    assert set(us) <= set(result["posted"])
    for report_id in us:
        entry = entries[result["posted"][report_id]["EntryID"]]
        assert entry["Currency"] == currency
    lines = result["drafts"].lines
    assert (lines[lines["report_id"].isin(us)]["side"] == "rounding").any()

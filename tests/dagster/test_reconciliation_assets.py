"""The reconciliation through Dagster against the sandbox over real HTTP: after the posting job, the daily
reconciliation's checks pass and the digest is written where the operator finds it; once a posted entry is
deleted in Exact, the check turns red with ERROR severity and the digest and the monthly rollup say what is wrong.

The sandbox's demo data is placed in the last days of the previous month, so the month's partition exists.
"""

from datetime import date, datetime, time, timedelta

import dagster as dg
import pytest

from expensify_exact.cli.main import main
from expensify_exact.config import load_project_config
from expensify_exact.defs import assets, jobs, reconciliation, resources
from expensify_exact.defs.keys import asset_key
from expensify_exact.defs.resources import ConnectorResource
from expensify_exact_sandbox.seed import build_seed
from expensify_exact_sandbox.server import SandboxServer
from tests.conftest import write_mappings

CONNECTION = "vermeerhals-nl"


@pytest.fixture
def last_month_sandbox():
    seed_today = date.today().replace(day=1) - timedelta(days=2)  # demo days end in the previous month
    with SandboxServer(seed=build_seed(seed_today)) as server:
        server.expensify.set_knobs(render_delay_seconds=0.3)
        yield server


def _defs(mappings) -> dg.Definitions:
    # The modules this feature plugs into, built as definitions.build_defs builds them.
    config = load_project_config(mappings)
    return dg.Definitions.merge(*(m.build(config) for m in (assets, jobs, resources, reconciliation)))


def _run(defs, job_name, instance, connector, days=None, partition_key=None):
    job = defs.resolve_job_def(job_name)
    kwargs = ({"partition_key": partition_key} if partition_key else
              {"tags": {"dagster/asset_partition_range_start": days[0],
                        "dagster/asset_partition_range_end": days[-1]}})
    return job.execute_in_process(instance=instance, resources={"connector": connector}, raise_on_error=False,
                                  **kwargs)


def _checks(result) -> dict[str, tuple[bool, str]]:
    return {e.check_name: (e.passed, e.severity.value) for e in result.get_asset_check_evaluations()}


@pytest.fixture
def three_days(last_month_sandbox, tmp_path, monkeypatch):
    """(sandbox, connector, defs, the three days before the seed's today), demo credentials stored."""
    monkeypatch.delenv("EXPENSIFY_EXACT_DIGEST_DIR", raising=False)
    mappings = write_mappings(tmp_path / "mappings", last_month_sandbox, expensify__poll_interval_seconds=0.2)
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    assert main(["--mappings", str(mappings), "--state-url", state_url, "secrets", "set", "--connection",
                 CONNECTION, "--from-env"]) == 0
    today = last_month_sandbox.seed.today
    return (last_month_sandbox, ConnectorResource(mappings_dir=str(mappings), state_url=state_url), _defs(mappings),
            [(today - timedelta(days=n)).isoformat() for n in (3, 2, 1)])


def test_checks_pass_on_clean_books_and_turn_red_when_an_entry_is_deleted_in_exact(three_days, tmp_path, instance):
    sandbox, connector, defs, days = three_days

    posting = _run(defs, "post_approved_expenses", instance, connector, days)
    assert posting.success
    clean = _run(defs, reconciliation.DAILY_JOB_NAME, instance, connector, days)
    assert clean.success
    assert _checks(clean) == {name: (True, "ERROR") for name in reconciliation.DAILY_CHECKS}
    digest_md = tmp_path / "dagster_home" / "digests" / CONNECTION / f"{days[-1]}.md"
    assert digest_md.exists() and digest_md.with_suffix(".html").exists()
    assert "0 findings" in digest_md.read_text()

    ledger = connector.store().ledger_rows(CONNECTION, status="posted")
    victim = next(row for row in ledger if row.partition_date == days[1])
    sandbox.exact.delete_entry(victim.entry_id)
    red = _run(defs, reconciliation.DAILY_JOB_NAME, instance, connector, partition_key=days[1])

    assert red.success, "a finding is a red check, not a failed run"
    checks = _checks(red)
    assert checks["posted_entries_unchanged_in_exact"] == (False, "ERROR")
    assert checks["every_approved_report_posted_or_quarantined"] == (True, "ERROR")
    text = (digest_md.parent / f"{days[1]}.md").read_text()
    assert "MISSING_IN_EXACT" in text and victim.report_id in text
    digest_event = instance.get_latest_materialization_event(asset_key(CONNECTION, "reconciliation",
                                                                       "daily_digest"))
    assert "MISSING_IN_EXACT" in digest_event.asset_materialization.metadata["digest"].value

    month = _run(defs, reconciliation.MONTHLY_JOB_NAME, instance, connector,
                 partition_key=date.fromisoformat(days[0]).replace(day=1).isoformat())
    assert month.success
    assert _checks(month) == {"card_liability_nets_to_zero": (True, "ERROR"), "month_reconciles": (False, "ERROR")}
    rollup = month.output_for_node(asset_key(CONNECTION, "reconciliation", "monthly").to_python_identifier())
    assert rollup.findings.loc[rollup.findings["code"] == "MISSING_IN_EXACT", "report_id"].tolist() == [
        victim.report_id]
    assert rollup.stats["days_reconciled"] == 3


def test_a_report_approved_after_its_day_was_posted_is_found_by_the_reconciliation_job(three_days, tmp_path, instance):
    """Reconciliation re-reads Expensify itself: a report approved for a day after that day's posting run exported
    it (an export edge, or a report retracted and approved again with its old date) is a NOT_POSTED finding, and the
    re-read costs one export job for the whole range."""
    sandbox, connector, defs, days = three_days
    assert _run(defs, "post_approved_expenses", instance, connector, days).success

    late_day = days[1]
    late = sandbox.expensify.add_report(
        name="Approved after the run", employee_email=sandbox.seed.reports[0].employee.email,
        expenses=[{"merchant": "NS Reizigers", "category": "Travel", "tag": "Rotterdam:P1003 Havenbedrijf",
                   "amount": 4210, "created": late_day}],
        submitted=datetime.combine(date.fromisoformat(late_day), time(9, 0)),
        approved=datetime.combine(date.fromisoformat(late_day), time(12, 0)))
    exports_before = sandbox.expensify.stats["export_jobs"]

    result = _run(defs, reconciliation.DAILY_JOB_NAME, instance, connector, days)

    assert result.success
    assert sandbox.expensify.stats["export_jobs"] - exports_before == 1, "one export for the whole range"
    checks = _checks(result)
    assert checks["every_approved_report_posted_or_quarantined"] == (False, "ERROR")
    by_day = result.output_for_node(asset_key(CONNECTION, "reconciliation", "daily").to_python_identifier())
    findings = {(day, f.code, f.report_id) for day, r in by_day.items() for f in r.findings.itertuples()}
    assert findings == {(late_day, "NOT_POSTED", late)}, "nothing else is wrong with the books"
    text = (tmp_path / "dagster_home" / "digests" / CONNECTION / f"{late_day}.md").read_text()
    assert "NOT_POSTED" in text and late in text

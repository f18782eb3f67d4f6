"""Nothing malformed stops the day: real export reports, mutated at random, never make normalization raise.

The reports are what the export template renders for the sandbox's demo seed (simulator → template.ftl → client →
json). Hypothesis then breaks them the way a faulty export could: nulls, wrong types, numbers like 10**30, NaN
strings, dates in year 1 or 9999, missing or odd transaction lists, expenses that are not objects, nested junk,
duplicated expenses. Whatever it does, `normalize_reports` must return; every expense must end as a valid line or
set aside with a reason (none lost); a report with a bad expense must be quarantined whole by the drafts step
(`pipeline.drafts_for_reports`, the same steps as the main job's assets); and the untouched reports of the day must
come through as if nothing had happened. Once this found 8 crashes in 1,000 mutated reports (issue 14).
"""

from __future__ import annotations

import copy
from datetime import date, datetime, timedelta, timezone

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from expensify_exact.api.expensify.client import ExpensifyClient
from expensify_exact.config import load_project_config
from expensify_exact.core.expense_lines import ExpenseLineSchema, MalformedReason, normalize_reports
from expensify_exact.core.journal import Reason
from expensify_exact.core.pipeline import drafts_for_reports
from expensify_exact_sandbox import seed as S
from expensify_exact_sandbox.clock import SandboxClock
from expensify_exact_sandbox.expensify_app import ExpensifySimulator
from tests.conftest import MAPPINGS
from tests.factories import seed_dimensions

T0 = datetime(2026, 8, 3, 9, 0, tzinfo=timezone.utc)
ZONE = "Europe/Amsterdam"
DELETE = object()  # a mutation that removes the key instead of setting it

JUNK = st.one_of(
    st.none(), st.booleans(), st.just(""), st.integers(),
    st.sampled_from([10**30, -10**30, 2**63, -(2**63) - 1, 10**13 + 1, -1, 0, 1e300, -1e300]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["NaN", "nan", "inf", "-Infinity", "1e400", "12.5", "abc", "9" * 30, "-0", " 42 ", "1" * 5000,
                     "0001-01-01 00:00:00", "9999-12-31 23:59:59", "2026-02-30", "2026-07-04T08:00:00+14:00",
                     "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "0001-01-01", "\x00", "🙂", "true",
                     "EURO", "eur"]),
    st.text(max_size=20),
    st.recursive(st.none() | st.integers() | st.text(max_size=5),
                 lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                 max_leaves=6),
)
VALUE = st.one_of(JUNK, st.just(DELETE))


@pytest.fixture(scope="module")
def exported() -> list[dict]:
    """The demo seed's approved reports of the 31 days before T0, as the export template renders them."""
    clock = SandboxClock(T0, frozen=True)
    sim = ExpensifySimulator(seed=S.build_seed(T0.date()), clock=clock)
    with ExpensifyClient("http://sandbox/Integration-Server/ExpensifyIntegrations", S.EXPENSIFY_PARTNER_USER_ID,
                         S.EXPENSIFY_PARTNER_USER_SECRET, clock, transport=httpx.WSGITransport(app=sim),
                         poll_timeout_seconds=60) as client:
        reports = client.export_reports(T0.date() - timedelta(days=31), T0.date() - timedelta(days=1),
                                        [S.POLICY_ID], timezone=ZONE)
    assert len(reports) > 20 and all(r["transactionList"] for r in reports)
    return reports


@pytest.fixture(scope="module")
def drafting():
    config = load_project_config(MAPPINGS)
    return config.connections[0], config, seed_dimensions()


def _set(target: dict, key: str, value) -> None:
    if value is DELETE:
        target.pop(key, None)
    else:
        target[key] = value


@st.composite
def mutated_day(draw, exported: list[dict]) -> tuple[list, set[int]]:
    """A day's reports (a sample of the export) with 1-4 mutations; returns them and the positions touched."""
    positions = draw(st.lists(st.integers(0, len(exported) - 1), min_size=1, max_size=6, unique=True))
    reports: list = [copy.deepcopy(exported[p]) for p in positions]
    touched: set[int] = set()
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(reports) - 1))
        report = reports[i]
        touched.add(i)
        expenses = report.get("transactionList") if isinstance(report, dict) else None
        kind = draw(st.sampled_from(["report_field", "expense_field", "expense_field", "expense_field",
                                     "transaction_list", "replace_report", "replace_expense", "duplicate_expense"]))
        if not isinstance(report, dict) or kind == "replace_report":
            reports[i] = draw(JUNK)
        elif kind == "report_field":
            _set(report, draw(st.sampled_from([*exported[0], "junk"])), draw(VALUE))
        elif kind == "transaction_list":
            report["transactionList"] = draw(st.one_of(JUNK, st.lists(JUNK, max_size=3), st.just([])))
        elif not isinstance(expenses, list) or not expenses:
            report["transactionList"] = draw(st.lists(JUNK, max_size=2))
        else:
            j = draw(st.integers(0, len(expenses) - 1))
            if kind == "replace_expense":
                expenses[j] = draw(JUNK)
            elif kind == "duplicate_expense":
                expenses.append(copy.deepcopy(expenses[j]))
            elif isinstance(expenses[j], dict):
                _set(expenses[j], draw(st.sampled_from([*exported[0]["transactionList"][0], "junk"])), draw(VALUE))
    return reports, touched


def _units(reports: list) -> int:
    """What must come out again: each expense of a report with a transaction list, else the report itself."""
    return sum(len(r["transactionList"]) if isinstance(r, dict) and isinstance(r.get("transactionList"), list) else 1
               for r in reports)


def _report_id(report) -> str | None:
    return str(report.get("reportID")) if isinstance(report, dict) else None


def _check_day(reports: list, touched: set[int], baseline):
    """normalize_reports on a mutated day: returns its result after the checks every example must pass."""
    result = normalize_reports(reports, ZONE)  # must not raise, whatever the reports hold

    assert len(result.lines) + len(result.malformed) == _units(reports), "an expense was lost or doubled"
    assert set(result.malformed["reason"]) <= {r.value for r in MalformedReason}
    assert (result.malformed["detail"].str.len() > 0).all(), "every set-aside expense says why"
    assert (result.malformed["detail"].str.len() <= 400).all(), "a reason is a line, not the junk itself"

    # The untouched reports of the day go on exactly as without the bad ones.
    ids = [_report_id(r) for r in reports]
    for i in range(len(reports)):
        if i in touched or ids.count(ids[i]) > 1:
            continue  # mutated, or a mutation gave another report its ID (then both are suspect)
        assert ids[i] not in set(result.malformed["report_id"])
        got = result.lines[result.lines["report_id"] == ids[i]].reset_index(drop=True)
        assert got.equals(baseline[baseline["report_id"] == ids[i]].reset_index(drop=True))
    return result


@pytest.fixture(scope="module")
def baseline(exported):
    clean = normalize_reports(exported, ZONE)
    assert clean.malformed.empty
    return clean.lines


SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


@pytest.mark.slow
@settings(max_examples=1000, **SETTINGS)
@given(data=st.data())
def test_mutated_reports_never_stop_the_day(data, exported, baseline):
    reports, touched = data.draw(mutated_day(exported))
    _check_day(reports, touched, baseline)


# The drafts step costs three times what normalization does per example; 50 examples cover its one rule.
@settings(max_examples=50, **SETTINGS)
@given(data=st.data())
def test_a_report_with_a_set_aside_expense_is_quarantined_whole(data, exported, baseline, drafting):
    reports, touched = data.draw(mutated_day(exported))
    result = _check_day(reports, touched, baseline)
    conn, config, dims = drafting
    drafts = drafts_for_reports(reports, conn, config, dims, today=date(2026, 8, 3))
    bad = set(result.malformed["report_id"])
    assert not set(drafts.lines["report_id"]) & bad, "no draft line of a report with a set-aside expense"
    flagged = set(drafts.rejections.loc[drafts.rejections["code"] == Reason.MALFORMED_SOURCE.value, "report_id"])
    assert flagged == bad, "each such report is quarantined as MALFORMED_SOURCE"
    ExpenseLineSchema.validate(result.lines)

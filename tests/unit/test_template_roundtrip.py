"""The export template, rendered by the simulator's FreeMarker engine, must carry any text through unchanged.

Hand-rolled JSON templates are the classic Expensify failure (expensify.md §9.2 items 2-3): a quote, a
newline or a tag's escaped colon `\\:` breaks the JSON or changes the value. Here every value makes the
full trip: simulator data model → template.ftl → download → json → normalize_reports.
"""

from datetime import datetime, timedelta, timezone

import httpx
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from expensify_exact.api.expensify.client import EXPORT_TEMPLATE, ExpensifyClient
from expensify_exact.api.expensify.fields import split_tag
from expensify_exact.core.expense_lines import normalize_reports
from expensify_exact_sandbox import seed as sandbox_seed
from expensify_exact_sandbox.clock import SandboxClock
from expensify_exact_sandbox.expensify_app import ExpensifySimulator
from expensify_exact_sandbox.freemarker import Template, TemplateError

T0 = datetime(2026, 8, 3, 9, 0, tzinfo=timezone.utc)
URL = "http://sandbox/Integration-Server/ExpensifyIntegrations"


@pytest.fixture(scope="module")
def sandbox():
    clock = SandboxClock(T0, frozen=True)
    sim = ExpensifySimulator(seed=sandbox_seed.build_seed(T0.date()), clock=clock)
    client = ExpensifyClient(URL, sandbox_seed.EXPENSIFY_PARTNER_USER_ID, sandbox_seed.EXPENSIFY_PARTNER_USER_SECRET,
                             clock, transport=httpx.WSGITransport(app=sim), poll_timeout_seconds=60)
    yield sim, client, clock
    client.close()


def export_one(sandbox, **report) -> dict:
    """Add one approved report to the simulator, export it through the client, return its normalized line."""
    sim, client, clock = sandbox
    report_id = sim.add_report(employee_email="anna.devries@vermeerhals.nl", **report)  # approved now
    day = clock.now().date()
    reports = client.export_reports(day, day, [sandbox_seed.POLICY_ID], report_ids=[report_id])
    result = normalize_reports(reports, "UTC")
    assert result.malformed.empty, result.malformed.to_dict("records")
    [line] = result.lines.to_dict("records")
    return line


# Characters that break naive templates, mixed with arbitrary (non-surrogate) unicode.
TRICKY = st.sampled_from(['"', "\\", ":", "\\:", "\n", "\r", "\t", "'", "{", "}", "${x}", "<#list>", "&", "/",
                          "\u2028", "é", "€", "漢", "🙂", "\x00", ","])
TEXT = st.lists(st.one_of(TRICKY, st.characters(exclude_categories=("Cs",))), max_size=12).map("".join)
# A tag level cannot end with a backslash: "a\" + ":" would read as an escaped colon (only "\:" is an escape).
LEVEL = TEXT.filter(lambda s: not s.endswith("\\"))


def escape_level(level: str) -> str:
    return level.replace(":", "\\:")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(merchant=TEXT, comment=TEXT, name=TEXT, levels=st.lists(LEVEL, min_size=1, max_size=3))
def test_any_text_survives_template_json_and_normalization_unchanged(sandbox, merchant, comment, name, levels):
    tag = ":".join(escape_level(level) for level in levels)
    line = export_one(sandbox, name=name, expenses=[{"merchant": merchant, "comment": comment, "tag": tag,
                                                     "category": "Meals", "amount": 1234}])
    assert (line["merchant"], line["comment"], line["report_name"], line["tag"]) == (merchant, comment, name, tag)
    expected_levels = split_tag(tag)
    assert expected_levels == (levels if tag else [])
    assert [line["tag_1"], line["tag_2"], line["tag_3"]] == (expected_levels + ["", "", ""])[:3]
    assert line["amount_cents"] == 1234


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(amount=st.integers(min_value=-10**9, max_value=10**9).filter(lambda a: a != 0))
def test_amounts_render_without_grouping_or_rounding(sandbox, amount):
    # Without ?c FreeMarker prints 1234567 as "1,234,567", which is no longer a JSON number.
    line = export_one(sandbox, name="amount", expenses=[{"merchant": "m", "category": "Meals", "tag": "",
                                                         "amount": amount}])
    assert (line["amount_cents"], line["converted_amount_cents"]) == (amount, amount)


def test_edited_amount_and_merchant_win_over_the_originals(sandbox):
    sim, client, clock = sandbox
    line = export_one(sandbox, name="edited", expenses=[{"merchant": "Original BV", "category": "Meals",
                                                         "tag": "Amsterdam:Internal", "amount": 5000}])
    sim.edit_expense(line["report_id"], line["transaction_id"], amount=4200, merchant="Edited BV")
    day = clock.now().date()
    reports = client.export_reports(day, day, [sandbox_seed.POLICY_ID], report_ids=[line["report_id"]])
    [edited] = normalize_reports(reports, "UTC").lines.to_dict("records")
    assert (edited["amount_cents"], edited["merchant"]) == (4200, "Edited BV")


KNOB_CASES = [
    # Expenses without tax miss taxAmount/taxRate entirely: the template's null defaults must hold.
    {"untaxed_fields": "missing"},
    # ... or carry zeros.
    {"untaxed_fields": "zero"},
    # addHeader is a CSV concern; the JSON template must not depend on it.
    {"add_header": False},
]


@pytest.mark.parametrize("knobs", KNOB_CASES)
def test_the_whole_seed_renders_and_normalizes_without_malformed_lines(sandbox, knobs):
    sim, client, clock = sandbox
    defaults = sim.set_knobs()
    sim.set_knobs(**knobs)
    try:
        today = clock.now().date()
        reports = client.export_reports(today - timedelta(days=31), today, [sandbox_seed.POLICY_ID],
                                        timezone="Europe/Amsterdam")
    finally:
        sim.set_knobs(**defaults)
    result = normalize_reports(reports, "Europe/Amsterdam")
    assert result.malformed.empty, result.malformed.to_dict("records")
    seeded = {r.report_id for r in sandbox_seed.build_seed(T0.date()).approved_reports}
    assert seeded <= set(result.lines["report_id"])


def _seed_lines(sim, client, clock, **knobs):
    defaults = sim.set_knobs()
    sim.set_knobs(**knobs)
    try:
        today = clock.now().date()
        reports = client.export_reports(today - timedelta(days=31), today, [sandbox_seed.POLICY_ID],
                                        timezone="Europe/Amsterdam")
        model = sim.export_model()
    finally:
        sim.set_knobs(**defaults)
    result = normalize_reports(reports, "Europe/Amsterdam")
    assert result.malformed.empty, result.malformed.to_dict("records")
    return result.lines.sort_values(["report_id", "transaction_id"]).reset_index(drop=True), model


@pytest.mark.parametrize("typing", ["strings", "numbers"])
@pytest.mark.parametrize("untaxed", ["missing", "zero"])
def test_numeric_looking_fields_as_numbers_text_or_empty_normalize_to_the_same_lines(sandbox, typing, untaxed):
    # Expensify's field types are documented loosely (expensify.md §3.2): card ID, tax rate, exchange rate and
    # amounts may come as numbers, as text or empty. Whatever the typing, the normalized lines are the same.
    sim, client, clock = sandbox
    documented, documented_model = _seed_lines(sim, client, clock, untaxed_fields=untaxed)
    retyped, model = _seed_lines(sim, client, clock, untaxed_fields=untaxed, number_typing=typing)
    expense, reference = model["reports"][0]["transactionList"][0], documented_model["reports"][0]["transactionList"][0]
    if typing == "strings":
        # The knob really changed the types, and ?c on such a field is the error a template must avoid.
        assert isinstance(expense["amount"], str) and isinstance(reference["amount"], int)
        with pytest.raises(TemplateError):
            Template("<#list reports as r><#list r.transactionList as e>${e.amount?c}</#list></#list>").render(model)
    else:
        assert isinstance(expense["transactionID"], int) and isinstance(reference["transactionID"], str)
    assert {e["cardID"] for r in model["reports"] for e in r["transactionList"]} & {"", None}, "no cash expense"
    assert len(documented) > 30
    pd.testing.assert_frame_equal(retyped, documented)


def test_the_template_renders_an_empty_export_to_a_complete_document():
    import json

    document = json.loads(Template(EXPORT_TEMPLATE).render({"reports": [], "addHeader": True}))
    assert document == {"reports": [], "count": 0, "end": True}

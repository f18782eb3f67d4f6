"""Property: any report either becomes an entry that balances to the cent or is rejected with a reason.

Reports are generated over everything the rules branch on: amounts and refunds, report and expense currencies,
cash and both card feeds, mapped, unmapped and invalid categories and tags, every tax name against three VAT tables
(none, the shipped including codes, an excluding 21 % code), a VAT and a non-VAT journal, with and without an
exchange rate and a rounding account. "Balances" is computed here, independently of the code under test, the way
Exact does it (exact-online.md §5.10): Σ AmountFC plus, for each excluding-VAT line, net × percentage rounded half
away from zero. An accepted entry is also posted to the sandbox's in-process ledger, which must take it.
"""

from datetime import datetime, timezone
from decimal import ROUND_HALF_UP, Decimal

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from expensify_exact.config import load_project_config
from expensify_exact.core.draft_checks import split_invalid_drafts
from expensify_exact.core.journal import Reason, build_journal_drafts, entry_body
from expensify_exact_sandbox import seed
from expensify_exact_sandbox.exact_app import ExactKnobs
from expensify_exact_sandbox.exact_ledger import Ledger
from tests.conftest import MAPPINGS
from tests.factories import expense_line, lines, seed_dimensions

BASE = load_project_config(MAPPINGS)
DIMS = seed_dimensions()
PERCENT = {v.code: Decimal(str(v.percentage)) for v in seed.VAT_CODES}
TYPE = {v.code: v.type for v in seed.VAT_CODES}
VAT_TABLES = [{}, dict(BASE.vat_codes), {"Hoog 21%": "5", "Laag 9%": "2", "Vrijgesteld": "0"}]
LEDGER = Ledger.from_seed(seed.DIVISION, "Vermeer & Hals", "NL", True, datetime(2026, 1, 1, tzinfo=timezone.utc))
KNOBS = ExactKnobs()
REASONS = {r.value for r in Reason}

# Grosses like 10.00 have no net whose 21 % VAT-on-top adds up to them: they need a rounding line.
amounts = st.one_of(st.integers(-50_000, 250_000), st.sampled_from([0, 1, -1, 1000, 1005, -1011, 12100, 1006]))
expenses = st.fixed_dictionaries({
    "amount": amounts,
    # Mostly valid values, so that most reports post and every report has a fair chance of one bad line.
    "category": st.sampled_from(["Travel", "Hotel", "Meals", "Software", "Training"] * 6 + ["Gifts", "Parking"]),
    "category_gl_code": st.sampled_from(["", "4530", "4999"]),
    "tag_1": st.sampled_from(["Amsterdam", "Rotterdam", "Utrecht"] * 6 + ["", "Eindhoven", "Nowhere"]),
    "tag_2": st.sampled_from(["P1001 Rijkswaterstaat", "P1002 Zuidas", "Internal", ""] * 6 + ["P9 Unknown"]),
    "tax_name": st.sampled_from(["", "Hoog 21%", "Laag 9%", "Vrijgesteld", "Hoog 21%", "Hoog 21%"]),
    "card": st.sampled_from([None, ("ing_corporate", "4242"), ("amex", "5151"), ("other_bank", "1")]),
    "foreign": st.sampled_from([None, ("GBP", 1.1712), ("USD", 0.9213)]),
})
reports = st.fixed_dictionaries({
    "expenses": st.lists(expenses, min_size=1, max_size=5),
    "report_currency": st.sampled_from(["EUR", "EUR", "USD", "GBP"]),
    "journal": st.sampled_from(["90", "91"]),
    "vat_table": st.sampled_from([0, 1, 2, 2, 2]),
    "rates": st.sampled_from([{}, {"USD": 0.92, "GBP": 1.17}, {"USD": 0.9187}]),
    "rounding_account": st.sampled_from(["4990", None]),
    "fallback": st.booleans(),
})


def _expense_lines(report: dict):
    rows = []
    for n, e in enumerate(report["expenses"]):
        currency, rate = e["foreign"] or (report["report_currency"], 1.0)
        if currency == report["report_currency"]:
            rate = 1.0
        card_bank, card_id = e["card"] or ("", "")
        rows.append(expense_line(
            transaction_id=str(9000 + n), report_currency=report["report_currency"], currency=currency,
            amount_cents=round(e["amount"] / rate), converted_amount_cents=e["amount"], exchange_rate=rate,
            category=e["category"], category_gl_code=e["category_gl_code"], tag_1=e["tag_1"], tag_2=e["tag_2"],
            tax_name=e["tax_name"], reimbursable=e["card"] is None, card_bank=card_bank, card_id=card_id))
    return lines(*rows)


def _exact_vat(cents: int, code: str) -> int:
    if not code or TYPE[code] != "E":
        return 0
    return int((Decimal(cents) * PERCENT[code]).quantize(Decimal(1), rounding=ROUND_HALF_UP))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reports)
def test_every_generated_report_balances_to_the_cent_after_exact_vat_or_is_rejected_with_a_reason(report):
    conn = BASE.connections[0]
    conn = conn.model_copy(update={
        "exact": conn.exact.model_copy(update={"journal": report["journal"],
                                               "rounding_account": report["rounding_account"]}),
        "posting": conn.posting.model_copy(update={"exchange_rates": report["rates"],
                                                   "fallback_to_category_gl_code": report["fallback"]})})
    config = BASE.model_copy(update={"vat_codes": VAT_TABLES[report["vat_table"]]})
    drafts = build_journal_drafts(_expense_lines(report), conn, config, DIMS, run_date=datetime(2026, 11, 25).date())
    drafts, _failures = split_invalid_drafts(drafts)

    event("rejected" if len(drafts.rejections) else "posted")
    event(f"rounding line: {(drafts.lines['side'] == 'rounding').any()}")
    if not drafts.rejections.empty:
        assert drafts.lines.empty, "a rejected report is rejected whole"
        assert set(drafts.rejections["code"]) <= REASONS
        # These two mean "a bug": a rule produced an entry it could not balance or that broke the draft schema.
        assert not set(drafts.rejections["code"]) & {Reason.UNBALANCED, Reason.INVALID_DRAFT}, drafts.rejections
        assert all(drafts.rejections["message"].str.len() > 0)
        return
    entry = drafts.lines
    assert len(entry) >= 2 * len(report["expenses"])
    assert sum(int(r.amount_cents) + _exact_vat(int(r.amount_cents), r.vat_code) for r in entry.itertuples()) == 0
    assert (entry["transaction_id"] != "").all() and (entry["gl_account_id"].str.len() > 0).all()
    # What Exact is modelled to do with it: the sandbox ledger posts it or raises with Exact's message.
    LEDGER.post_entry(entry_body(entry), KNOBS, datetime(2026, 11, 25, 12, tzinfo=timezone.utc))

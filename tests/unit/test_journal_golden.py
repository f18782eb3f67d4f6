"""Golden cases: each report gives exactly these journal lines, or exactly this quarantine reason.

A row is one report, as an accountant would check it: which account, how many cents on which side, which cost
center and unit, which VAT code, in which currency. Every accepted entry must also balance to the cent after Exact
adds the VAT of excluding codes (computed here independently: net × percentage, rounded half away from zero) and
pass the pandera draft schema. The shipped mappings/ and the sandbox seed's dimensions are the baseline; a row
changes only what it is about.
"""

from dataclasses import dataclass, field, replace
from datetime import date
from decimal import ROUND_HALF_UP, Decimal

import pytest

from expensify_exact.config import CategoryMapping, Defaults, DimensionDefaults, load_project_config
from expensify_exact.core.draft_checks import split_invalid_drafts
from expensify_exact.core.journal import build_journal_drafts
from tests.conftest import MAPPINGS
from tests.factories import expense_line, lines, seed_dimensions

BASE = load_project_config(MAPPINGS)
RUN_DATE = date(2026, 11, 25)
VAT_PERCENT = {"1": "0.21", "2": "0.09", "5": "0.21", "0": "0"}  # the seed's VAT codes, typed out by hand
EXCLUDING = {"5"}


@dataclass
class Setup:
    exact: dict = field(default_factory=dict)  # overrides of connections.yaml `exact:`
    posting: dict = field(default_factory=dict)  # overrides of `posting:`
    vat: dict | None = None  # replaces vat.yaml
    categories: list = field(default_factory=list)  # rows added to categories.yaml
    tags: dict = field(default_factory=dict)  # level -> extra tag values
    defaults: Defaults | None = None
    dims: list = field(default_factory=list)  # (table, code, changes) applied to the seed snapshot


def L(side, account, cents, cc="", cu="", vat="", currency="EUR"):  # noqa: N802 - reads like a ledger row
    return (side, account, cents, cc, cu, vat, currency)


def reject(code, value):
    return ("REJECT", code, value)


def usd(**kw):
    """An expense on a USD report."""
    return expense_line(report_currency="USD", currency="USD", exchange_rate=1.0, **kw)


J91 = {"journal": "91"}  # type 90, no VAT, no variable currency
RATES = {"exchange_rates": {"USD": 0.92}}
E21 = {"Hoog 21%": "5", "Laag 9%": "2", "Vrijgesteld": "0"}
THREE_USD_LINES = [usd(transaction_id=t, amount_cents=1006, converted_amount_cents=1006) for t in ("1", "2", "3")]
USD_ON_EUR_REPORT = [expense_line(currency="USD", amount_cents=24900, exchange_rate=0.9213,
                                  converted_amount_cents=22940)]

CASES = [
    # The plain case: cash spend, office and project tags on two levels, credit to the employee.
    ([expense_line()], Setup(), [L("debit", "4500", 2340, "AMS", "P1001"), L("credit", "1650", -2340)]),
    # Company-card spend is owed to the card issuer's liability account, not to the employee.
    ([expense_line(reimbursable=False, card_bank="ing_corporate", card_id="4242")], Setup(),
     [L("debit", "4500", 2340, "AMS", "P1001"), L("credit", "1660", -2340)]),
    # A card feed with its own liability account (card_accounts) wins over the default card account.
    ([expense_line(reimbursable=False, card_bank="amex", card_id="5151", category="Software",
                   tag_1="Rotterdam", tag_2="Internal")], Setup(),
     [L("debit", "4610", 2340, "RTM", "INT"), L("credit", "1661", -2340)]),
    # A refund is a negative amount on the same side, in the same entry as the spend it partly undoes.
    ([expense_line(transaction_id="1", amount_cents=4580, converted_amount_cents=4580),
      expense_line(transaction_id="2", amount_cents=-2290, converted_amount_cents=-2290)], Setup(),
     [L("debit", "4500", 4580, "AMS", "P1001"), L("credit", "1650", -4580),
      L("debit", "4500", -2290, "AMS", "P1001"), L("credit", "1650", 2290)]),
    # A USD expense on a EUR report posts Expensify's converted EUR amount (the rate stays in Notes).
    (USD_ON_EUR_REPORT, Setup(),
     [L("debit", "4500", 22940, "AMS", "P1001"), L("credit", "1650", -22940)]),
    # A USD report on a journal that allows variable currency goes in as USD; Exact converts at its own rate.
    ([usd(amount_cents=10000, converted_amount_cents=10000)], Setup(),
     [L("debit", "4500", 10000, "AMS", "P1001", currency="USD"), L("credit", "1650", -10000, currency="USD")]),
    # On a EUR-only journal each line is converted; the payable is the converted report total (30.18 × 0.92 =
    # 27.77, not 3 × 9.26), and the cent between the two goes to the rounding account.
    (THREE_USD_LINES, Setup(exact=J91, posting=RATES),
     [L("debit", "4500", 926, "AMS", "P1001"), L("credit", "1650", -926),
      L("debit", "4500", 926, "AMS", "P1001"), L("credit", "1650", -926),
      L("debit", "4500", 926, "AMS", "P1001"), L("credit", "1650", -925), L("rounding", "4990", -1)]),
    # A foreign report on a EUR-only journal without a configured rate cannot be converted honestly.
    ([usd()], Setup(exact=J91), reject("MISSING_EXCHANGE_RATE", "USD")),
    # An including VAT code posts the gross amount; Exact splits the VAT off itself.
    ([expense_line(tax_name="Laag 9%")], Setup(),
     [L("debit", "4500", 2340, "AMS", "P1001", "2"), L("credit", "1650", -2340)]),
    # An excluding VAT code posts the net so that net + Exact's 21 % VAT line is the gross: 100.00 + 21.00 = 121.00.
    ([expense_line(tax_name="Hoog 21%", amount_cents=12100, converted_amount_cents=12100)], Setup(vat=E21),
     [L("debit", "4500", 10000, "AMS", "P1001", "5"), L("credit", "1650", -12100)]),
    # 10.00 gross has no such net (8.26 + 1.73 = 9.99, 8.27 + 1.74 = 10.01): the cent goes to rounding.
    ([expense_line(tax_name="Hoog 21%", amount_cents=1000, converted_amount_cents=1000)], Setup(vat=E21),
     [L("debit", "4500", 826, "AMS", "P1001", "5"), L("credit", "1650", -1000), L("rounding", "4990", 1)]),
    # An excluding-VAT refund mirrors the spend, residue and all.
    ([expense_line(tax_name="Hoog 21%", amount_cents=-1000, converted_amount_cents=-1000)], Setup(vat=E21),
     [L("debit", "4500", -826, "AMS", "P1001", "5"), L("credit", "1650", 1000), L("rounding", "4990", -1)]),
    # A VAT residue without a rounding account is not absorbed silently.
    ([expense_line(tax_name="Hoog 21%", amount_cents=1000, converted_amount_cents=1000)],
     Setup(vat=E21, exact={"rounding_account": None}), reject("MISSING_ROUNDING_ACCOUNT", "")),
    # On a journal without VAT the gross is posted with no code (Exact refuses one there: "Not allowed: VAT-code").
    ([expense_line(tax_name="Hoog 21%")], Setup(exact=J91), [L("debit", "4500", 2340, "AMS", "P1001"),
                                                             L("credit", "1650", -2340)]),
    # ...unless posting.require_vat says VAT must be claimed: then the report waits.
    ([expense_line(tax_name="Hoog 21%")], Setup(exact=J91, posting={"require_vat": True}),
     reject("VAT_NOT_ALLOWED", "1")),
    # Without a VAT table, gross amounts and no code, even on a VAT journal.
    ([expense_line(tax_name="Hoog 21%")], Setup(vat={}), [L("debit", "4500", 2340, "AMS", "P1001"),
                                                          L("credit", "1650", -2340)]),
    # With a table, a tax name it lacks is a gap in the mapping, not a reason to post gross.
    ([expense_line(tax_name="Super 25%")], Setup(), reject("UNMAPPED_TAX_NAME", "Super 25%")),
    # A mapped VAT code Exact does not have.
    ([expense_line(tax_name="Hoog 21%")], Setup(vat={"Hoog 21%": "7"}), reject("UNKNOWN_VAT_CODE", "7")),
    # A mapped VAT code Exact has blocked.
    ([expense_line(tax_name="Hoog 21%")], Setup(dims=[("vat_codes", "1", {"is_blocked": True})]),
     reject("BLOCKED_VAT_CODE", "1")),
    # The seeded "Gifts" category: no mapping row and no GL code in Expensify.
    ([expense_line(category="Gifts", category_gl_code="")], Setup(), reject("UNMAPPED_CATEGORY", "Gifts")),
    # With the fallback on, an unmapped category posts to the GL code set on it in Expensify.
    ([expense_line(category="Parking", category_gl_code="4530")], Setup(posting={"fallback_to_category_gl_code": True}),
     [L("debit", "4530", 2340, "AMS", "P1001"), L("credit", "1650", -2340)]),
    # A policy-specific row wins over the general one.
    ([expense_line(category="Meals")], Setup(categories=[CategoryMapping(category="Meals", gl_account="4700",
                                                                         policy_id="7A3F9C21B4D05E68")]),
     [L("debit", "4700", 2340, "AMS", "P1001"), L("credit", "1650", -2340)]),
    # A mapped account Exact does not have.
    ([expense_line(category="Legacy")], Setup(categories=[CategoryMapping(category="Legacy", gl_account="4999")]),
     reject("UNKNOWN_GL_ACCOUNT", "4999")),
    # A mapped account Exact has blocked.
    ([expense_line(category="Legacy")], Setup(categories=[CategoryMapping(category="Legacy", gl_account="4800")]),
     reject("BLOCKED_GL_ACCOUNT", "4800")),
    # A tag nobody mapped.
    ([expense_line(tag_2="P9999 Unknown")], Setup(), reject("UNMAPPED_TAG", "P9999 Unknown")),
    # The seeded Eindhoven office: mapped to EHV, which Exact does not have.
    ([expense_line(tag_1="Eindhoven")], Setup(), reject("UNKNOWN_COST_CENTER", "EHV")),
    # A cost center that ended before the entry date (Den Haag closed end 2024).
    ([expense_line(tag_1="Den Haag")], Setup(tags={1: {"Den Haag": "DHG"}}), reject("ENDED_COST_CENTER", "DHG")),
    # A project code mapped in tags.yaml that Exact does not have.
    ([expense_line(tag_2="P2000 Nieuw")], Setup(tags={2: {"P2000 Nieuw": "P2000"}}),
     reject("UNKNOWN_COST_UNIT", "P2000")),
    # A cost unit that ended before the entry date.
    ([expense_line(tag_2="P1002 Zuidas")], Setup(dims=[("cost_units", "P1002", {"end_date": date(2026, 6, 30)})]),
     reject("ENDED_COST_UNIT", "P1002")),
    # 4500 (Travel) makes a cost center mandatory and the expense has no office tag.
    ([expense_line(tag_1="")], Setup(), reject("MISSING_COST_CENTER", "")),
    # An account that makes a cost unit mandatory, and no project tag.
    ([expense_line(tag_2="")], Setup(dims=[("gl_accounts", "4500", {"use_costunit": 1})]),
     reject("MISSING_COST_UNIT", "")),
    # An account that forbids cost centers (UseCostcenter = 2) and an office tag that sets one.
    ([expense_line(category="Meals")], Setup(dims=[("gl_accounts", "4520", {"use_costcenter": 2})]),
     reject("COST_CENTER_NOT_ALLOWED", "AMS")),
    # An account that forbids cost units, and one from a tag: rejected like the cost center above.
    ([expense_line(category="Meals")], Setup(dims=[("gl_accounts", "4520", {"use_costunit": 2})]),
     reject("COST_UNIT_NOT_ALLOWED", "P1001")),
    # A blanket default (Software → INT) is simply not applied where the account forbids cost units.
    ([expense_line(category="Software", tag_2="")], Setup(dims=[("gl_accounts", "4610", {"use_costunit": 2})]),
     [L("debit", "4610", 2340, "AMS"), L("credit", "1650", -2340)]),
    # No project tag: the category default from defaults.yaml fills the cost unit.
    ([expense_line(category="Software", tag_2="")], Setup(), [L("debit", "4610", 2340, "AMS", "INT"),
                                                              L("credit", "1650", -2340)]),
    # No office tag: the employee's default cost center satisfies 4500's mandatory cost center.
    ([expense_line(tag_1="")], Setup(defaults=Defaults(employees={
        "Anna.deVries@vermeerhals.nl": DimensionDefaults(cost_center="UTR")})),
     [L("debit", "4500", 2340, "UTR", "P1001"), L("credit", "1650", -2340)]),
    # A default that names a cost center Exact lacks is as wrong as a tag that does.
    ([expense_line(tag_1="")], Setup(defaults=Defaults(categories={"Travel": DimensionDefaults(cost_center="XXX")})),
     reject("UNKNOWN_COST_CENTER", "XXX")),
    # A closed period quarantines by default.
    ([expense_line(partition_date="2024-03-01")], Setup(posting={"closed_through": "2024-03"}),
     reject("CLOSED_PERIOD", "2024/03")),
    # A date before every financial year Exact knows.
    ([expense_line(partition_date="2019-05-01")], Setup(), reject("MISSING_PERIOD", "2019-05-01")),
    # The configured journal does not exist in Exact.
    ([expense_line()], Setup(exact={"journal": "77"}), reject("UNKNOWN_JOURNAL", "77")),
    # A bank journal is not a general journal.
    ([expense_line()], Setup(exact={"journal": "20"}), reject("INVALID_JOURNAL_TYPE", "20")),
    # A blocked journal.
    ([expense_line()], Setup(dims=[("journals", "90", {"is_blocked": True})]), reject("BLOCKED_JOURNAL", "90")),
    # Everything at once that should still post: card and cash, refund, I and E VAT, three offset accounts.
    ([expense_line(transaction_id="1", tax_name="Laag 9%", amount_cents=5000, converted_amount_cents=5000),
      expense_line(transaction_id="2", tax_name="Hoog 21%", amount_cents=1000, converted_amount_cents=1000,
                   reimbursable=False, card_bank="amex", card_id="5151"),
      expense_line(transaction_id="3", tax_name="Hoog 21%", amount_cents=-12100, converted_amount_cents=-12100,
                   reimbursable=False, card_bank="ing_corporate", card_id="4242")], Setup(vat=E21),
     [L("debit", "4500", 5000, "AMS", "P1001", "2"), L("credit", "1650", -5000),
      L("debit", "4500", 826, "AMS", "P1001", "5"), L("credit", "1661", -1000),
      L("debit", "4500", -10000, "AMS", "P1001", "5"), L("credit", "1660", 12100), L("rounding", "4990", 1)]),
]


def _apply(setup: Setup):
    conn = BASE.connections[0]
    conn = conn.model_copy(update={"exact": conn.exact.model_copy(update=setup.exact),
                                   "posting": conn.posting.model_copy(update=setup.posting)})
    tags = [level.model_copy(update={"values": {**level.values, **setup.tags.get(level.level, {})}})
            for level in BASE.tags]
    config = BASE.model_copy(update={
        "categories": [*BASE.categories, *setup.categories], "tags": tags,
        "vat_codes": BASE.vat_codes if setup.vat is None else setup.vat,
        "defaults": setup.defaults if setup.defaults is not None else BASE.defaults})
    dims = seed_dimensions()
    for table, code, changes in setup.dims:
        frame = getattr(dims, table).copy()
        for column, value in changes.items():
            frame[column] = frame[column].astype(object)
            frame.loc[frame["code"] == code, column] = value
        dims = replace(dims, **{table: frame})
    return conn, config, dims


def _vat_on_top(cents: int, code: str) -> int:
    if code not in EXCLUDING:
        return 0
    return int((Decimal(cents) * Decimal(VAT_PERCENT[code])).quantize(Decimal(1), rounding=ROUND_HALF_UP))


@pytest.mark.parametrize(("rows", "setup", "expected"), CASES,
                         ids=[f"{i:02d}-{e[1] if e[0] == 'REJECT' else 'posts'}" for i, (_, _, e) in enumerate(CASES)])
def test_each_golden_report_gives_exactly_its_lines_or_its_reason(rows, setup, expected):
    conn, config, dims = _apply(setup)
    drafts = build_journal_drafts(lines(*rows), conn, config, dims, run_date=RUN_DATE)
    if expected[0] == "REJECT":
        _, code, value = expected
        assert drafts.lines.empty, "a rejected report must not leave any line behind"
        found = drafts.rejections[drafts.rejections["code"] == code]
        assert len(found) >= 1, drafts.rejections.to_dict("records")
        assert set(drafts.rejections["code"]) == {code}, drafts.rejections.to_dict("records")
        assert found.iloc[0]["value"] == value
        return
    assert drafts.rejections.empty, drafts.rejections.to_dict("records")
    got = [L(r.side, r.gl_account_code, int(r.amount_cents), r.cost_center, r.cost_unit, r.vat_code, r.currency)
           for r in drafts.lines.sort_values("line_no").itertuples()]
    assert got == expected
    after_vat = sum(int(r.amount_cents) + _vat_on_top(int(r.amount_cents), r.vat_code)
                    for r in drafts.lines.itertuples())
    assert after_vat == 0, "the entry must balance to the cent once Exact adds excluding VAT"
    assert list(drafts.lines["vat_amount_cents"]) == [_vat_on_top(int(r.amount_cents), r.vat_code)
                                                      for r in drafts.lines.itertuples()]
    kept, failures = split_invalid_drafts(drafts)
    assert kept.rejections.empty and failures.empty, failures


def test_converted_lines_record_the_report_amount_and_rate_and_the_residue_line_names_its_transaction():
    conn, config, dims = _apply(Setup(exact=J91, posting=RATES))
    drafts = build_journal_drafts(lines(*THREE_USD_LINES), conn, config, dims, run_date=RUN_DATE)
    first = drafts.lines.sort_values("line_no").iloc[0]
    assert "report 10.06 USD @ 0.92 = 9.26 EUR" in first["notes"]
    rounding = drafts.lines[drafts.lines["side"] == "rounding"].iloc[0]
    assert (rounding["report_id"], rounding["transaction_id"]) == ("R00TEST00001", "3")
    assert rounding["description"].startswith("R00TEST00001/3") and "3" in rounding["notes"]


def test_a_foreign_expense_on_a_euro_report_keeps_its_original_amount_and_rate_in_the_notes():
    conn, config, dims = _apply(Setup())
    drafts = build_journal_drafts(lines(*USD_ON_EUR_REPORT), conn, config, dims, run_date=RUN_DATE)
    assert all("original 249.00 USD @ 0.9213" in notes for notes in drafts.lines["notes"])


def test_a_closed_period_moves_to_the_first_open_one_when_configured():
    moved = {"closed_through": "2024-03", "closed_period_policy": "next_open_period"}
    conn, config, dims = _apply(Setup(posting=moved))
    drafts = build_journal_drafts(lines(expense_line(partition_date="2024-02-10")), conn, config, dims, RUN_DATE)
    assert set(zip(drafts.lines["financial_year"], drafts.lines["financial_period"], drafts.lines["entry_date"],
                   strict=True)) == {(2024, 4, "2024-04-01")}


def test_the_golden_table_has_at_least_fifteen_reports_of_both_outcomes():
    outcomes = [expected[0] == "REJECT" for _, _, expected in CASES]
    assert len(CASES) >= 15 and any(outcomes) and not all(outcomes)

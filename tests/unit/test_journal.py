"""Posting rules: each report becomes one balanced entry with traceable lines, or is rejected whole with reasons."""

from datetime import date

import pytest

from expensify_exact.config import load_project_config
from expensify_exact.core.draft_checks import split_invalid_drafts
from expensify_exact.core.journal import build_journal_drafts, content_hash, entry_body, entry_id_for
from tests.conftest import MAPPINGS
from tests.factories import expense_line, lines, seed_dimensions

CONFIG = load_project_config(MAPPINGS)
CONN = CONFIG.connections[0]
DIMS = seed_dimensions()


def build(*rows):
    return build_journal_drafts(lines(*rows), CONN, CONFIG, DIMS, run_date=date(2026, 11, 25))


def test_cash_expense_debits_its_category_account_and_credits_employee_payable():
    drafts = build(expense_line())
    debit, credit = drafts.lines.sort_values("line_no").to_dict("records")
    assert (debit["gl_account_code"], debit["amount_cents"], debit["cost_center"], debit["cost_unit"]) == \
        ("4500", 2340, "AMS", "P1001")
    assert (credit["gl_account_code"], credit["amount_cents"]) == ("1650", -2340)
    assert (debit["financial_year"], debit["financial_period"], debit["entry_date"]) == (2026, 11, "2026-11-10")
    assert drafts.rejections.empty


def test_every_line_carries_report_and_transaction_ids_in_fields_and_texts():
    drafts = build(expense_line(transaction_id="4056343049275000101", merchant="M" * 200))
    for line in drafts.lines.to_dict("records"):
        assert line["report_id"] == "R00TEST00001" and line["transaction_id"] == "4056343049275000101"
        assert "R00TEST00001" in line["description"] and "4056343049275000101" in line["description"]
        assert "R00TEST00001" in line["notes"] and "4056343049275000101" in line["notes"]
        assert len(line["description"]) <= 60 and len(line["notes"]) <= 255


@pytest.mark.parametrize(
    ("overrides", "credit_account"),
    [
        # Company-card spend is owed to the card issuer, not the employee.
        ({"reimbursable": False, "card_bank": "ing_corporate", "card_id": "4242"}, "1660"),
        # A card feed with its own liability account in mappings.
        ({"reimbursable": False, "card_bank": "amex", "card_id": "5151"}, "1661"),
    ],
)
def test_card_spend_credits_the_card_liability_account(overrides, credit_account):
    drafts = build(expense_line(**overrides))
    credit = drafts.lines[drafts.lines["side"] == "credit"].iloc[0]
    assert credit["gl_account_code"] == credit_account


def test_a_refund_is_a_negative_amount_on_the_same_side_and_the_entry_still_balances():
    drafts = build(expense_line(transaction_id="1"),
                   expense_line(transaction_id="2", amount_cents=-1000, converted_amount_cents=-1000))
    debits = drafts.lines[drafts.lines["side"] == "debit"].sort_values("transaction_id")
    assert list(debits["amount_cents"]) == [2340, -1000]
    assert drafts.lines["amount_cents"].sum() == 0


@pytest.mark.parametrize(
    ("overrides", "code", "value"),
    [
        # The seeded "Gifts" category: no mapping row, so no account.
        ({"category": "Gifts"}, "UNMAPPED_CATEGORY", "Gifts"),
        # The seeded Eindhoven office: mapped to EHV, which Exact does not have.
        ({"tag_1": "Eindhoven"}, "UNKNOWN_COST_CENTER", "EHV"),
        # A tag nobody mapped.
        ({"tag_2": "P9999 Unknown"}, "UNMAPPED_TAG", "P9999 Unknown"),
        # A category mapped to a blocked account.
        ({"category": "Legacy"}, "BLOCKED_GL_ACCOUNT", "4800"),
        # 4500 (Travel) makes a cost center mandatory.
        ({"tag_1": ""}, "MISSING_COST_CENTER", ""),
    ],
)
def test_one_bad_line_rejects_the_whole_report_with_a_reason(overrides, code, value):
    config = CONFIG.model_copy(update={"categories": [*CONFIG.categories,
                                                      CONFIG.categories[0].model_copy(update={
                                                          "category": "Legacy", "gl_account": "4800"})]})
    rows = [expense_line(transaction_id="good"), expense_line(transaction_id="bad", **overrides)]
    drafts = build_journal_drafts(lines(*rows), CONN, config, DIMS, run_date=date(2026, 11, 25))
    assert drafts.lines.empty, "nothing of a report with a bad line may be drafted"
    found = drafts.rejections[drafts.rejections["code"] == code]
    assert len(found) >= 1, drafts.rejections.to_dict("records")
    assert found.iloc[0]["value"] == value
    assert found.iloc[0]["transaction_id"] == "bad"


@pytest.mark.parametrize(
    ("day", "posting", "code", "expected"),
    [
        # A date before every financial year Exact knows.
        ("2019-05-01", {}, "MISSING_PERIOD", None),
        # Closed periods quarantine by default...
        ("2024-03-01", {"closed_through": "2024-03"}, "CLOSED_PERIOD", None),
        # ...or move to the first open period when configured.
        ("2024-02-10", {"closed_through": "2024-03", "closed_period_policy": "next_open_period"}, None,
         (2024, 4, "2024-04-01")),
    ],
)
def test_periods_missing_closed_or_moved(day, posting, code, expected):
    conn = CONN.model_copy(update={"posting": CONN.posting.model_copy(update=posting)})
    drafts = build_journal_drafts(lines(expense_line(partition_date=day)), conn, CONFIG, DIMS, date(2026, 11, 25))
    if code:
        assert list(drafts.rejections["code"]) == [code] and drafts.lines.empty
    else:
        first = drafts.lines.iloc[0]
        assert (first["financial_year"], first["financial_period"], first["entry_date"]) == expected


def test_an_ended_cost_center_is_rejected():
    config = CONFIG.model_copy(update={"tags": [CONFIG.tags[0].model_copy(update={
        "values": {**CONFIG.tags[0].values, "Den Haag": "DHG"}}), CONFIG.tags[1]]})
    drafts = build_journal_drafts(lines(expense_line(tag_1="Den Haag")), CONN, config, DIMS,
                                  run_date=date(2026, 11, 25))
    assert list(drafts.rejections["code"]) == ["ENDED_COST_CENTER"]


def test_vat_code_comes_from_the_tax_name_on_a_journal_that_allows_vat():
    drafts = build(expense_line(tax_name="Laag 9%"))
    debit = drafts.lines[drafts.lines["side"] == "debit"].iloc[0]
    assert debit["vat_code"] == "2"


def test_entry_body_and_ids_are_deterministic():
    drafts = build(expense_line())
    body = entry_body(drafts.lines)
    assert body["JournalCode"] == "90" and len(body["GeneralJournalEntryLines"]) == 2
    assert sum(line["AmountFC"] for line in body["GeneralJournalEntryLines"]) == 0
    assert entry_id_for("c", "R1", content_hash(body)) == entry_id_for("c", "R1", content_hash(entry_body(
        build(expense_line()).lines)))
    changed = entry_body(build(expense_line(converted_amount_cents=2341, amount_cents=2341)).lines)
    assert content_hash(changed) != content_hash(body)


def test_schema_check_moves_an_unbalanced_report_to_the_rejections_whole():
    drafts = build(expense_line(report_id="R1"), expense_line(report_id="R2"))
    tampered = drafts.lines.copy()
    index = tampered[(tampered["report_id"] == "R2") & (tampered["side"] == "credit")].index[0]
    tampered.loc[index, ["amount_cents", "amount"]] = [-2339, -23.39]
    kept, failures = split_invalid_drafts(type(drafts)(lines=tampered, rejections=drafts.rejections))
    assert set(kept.lines["report_id"]) == {"R1"}
    assert list(kept.rejections["report_id"]) == ["R2"]
    assert kept.rejections.iloc[0]["code"] == "UNBALANCED"
    assert not failures.empty


@pytest.mark.parametrize(
    ("gross", "percentage", "expected"),
    [
        # 121.00 at 21 % excluding: exactly 100.00 net + 21.00 VAT.
        (12100, "0.21", (10000, 2100, 0)),
        # 10.00 has no exact net: 8.26 + 1.73 = 9.99, so one cent is left for the rounding account.
        (1000, "0.21", (826, 173, 1)),
        # A refund mirrors it (Exact rounds half away from zero).
        (-1000, "0.21", (-826, -173, -1)),
        # A percentage given in whole percents is read as a fraction.
        (1000, "21", (826, 173, 1)),
        # 0 % leaves the gross untouched.
        (4599, "0", (4599, 0, 0)),
    ],
)
def test_excluding_vat_net_is_chosen_so_exacts_vat_line_lands_on_the_gross(gross, percentage, expected):
    from decimal import Decimal

    from expensify_exact.core.journal import net_for_gross, vat_on_top_cents

    net, vat, residue = net_for_gross(gross, Decimal(percentage))
    assert (net, vat, residue) == expected
    assert vat == vat_on_top_cents(net, Decimal(percentage)) and net + vat + residue == gross


@pytest.mark.parametrize(
    ("filename", "text", "line", "message"),
    [
        # A misspelt dimension in defaults.yaml must not be ignored.
        ("defaults.yaml", "defaults:\n  categories:\n    Software: {cost_centre: AMS}\n", 3, "cost_centre"),
        # An exchange rate must be positive.
        ("connections.yaml", None, None, "must be positive"),
    ],
)
def test_new_mapping_keys_report_errors_with_file_and_line(tmp_path, filename, text, line, message):
    import shutil

    from expensify_exact.errors import ConfigError

    folder = tmp_path / "mappings"
    shutil.copytree(MAPPINGS, folder)
    path = folder / filename
    if text is None:
        text = path.read_text().replace("      closed_period_policy: quarantine",
                                        "      closed_period_policy: quarantine\n      exchange_rates: {USD: 0}")
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_project_config(folder)
    assert error.value.path == str(path) and message in str(error.value)
    if line is not None:
        assert error.value.line == line
    else:
        assert error.value.line == text.splitlines().index("      exchange_rates: {USD: 0}") + 1


def test_rejection_reasons_all_say_what_to_do():
    from expensify_exact.core.journal import REASON_FIXES, Reason

    assert set(REASON_FIXES) == set(Reason)

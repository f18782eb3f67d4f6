"""One Exact Online division's books in the simulator: master data, entity schemas, and journal-entry posting.

Posting rules and messages follow exact-online.md §5.8–§5.12; entries are stored as the TransactionLines Exact derives.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from expensify_exact_sandbox import seed as S
from expensify_exact_sandbox.exact_odata import AMSTERDAM, ODataError, is_guid

G, STR, I16, I32, I64, DBL, BOOL, DT, BYTE = ("Edm.Guid", "Edm.String", "Edm.Int16", "Edm.Int32", "Edm.Int64",
                                              "Edm.Double", "Edm.Boolean", "Edm.DateTime", "Edm.Byte")


@dataclass(frozen=True)
class EntitySpec:
    """An endpoint: its path under /api/v1/{division}/, Edm fields (in output order) and paging rules (§4.3, §4.6)."""

    path: str
    type_name: str
    key: str
    fields: dict[str, str]
    methods: tuple[str, ...] = ("GET",)
    page: str = "regular"  # "regular" = 60 rows, "sync" = 1000 rows
    select_required: bool = False
    navigation: tuple[str, ...] = ()
    padded_code: bool = False  # `Code` is space-padded when the pad_codes knob is on

    @property
    def full_type(self) -> str:
        return f"Exact.Web.Api.Models.{self.type_name}"


def _f(spec: str) -> dict[str, str]:
    """'Name:type Name2:type' → ordered field map (keeps the schema tables below readable)."""
    return {name: {"g": G, "s": STR, "i16": I16, "i": I32, "i64": I64, "d": DBL, "b": BOOL, "dt": DT, "y": BYTE}[t]
            for name, t in (item.split(":") for item in spec.split())}


_AUDIT = "Created:dt Creator:g CreatorFullName:s Modified:dt Modifier:g ModifierFullName:s"
_TL_FIELDS = ("ID:g EntryID:g EntryNumber:i LineNumber:i LineType:i16 Date:dt FinancialYear:i16 FinancialPeriod:i16 "
              "JournalCode:s JournalDescription:s Type:i Status:i16 GLAccount:g GLAccountCode:s GLAccountDescription:s "
              "AmountDC:d AmountFC:d AmountVATFC:d AmountVATBaseFC:d Currency:s ExchangeRate:d VATCode:s "
              "VATCodeDescription:s VATPercentage:d VATType:s CostCenter:s CostCenterDescription:s CostUnit:s "
              "CostUnitDescription:s Description:s Notes:s YourRef:s OffsetID:g Account:g AccountCode:s AccountName:s "
              "Division:i " + _AUDIT)

SPECS: tuple[EntitySpec, ...] = (
    EntitySpec("system/Divisions", "Division", "Code", _f(
        "Code:i Current:b Description:s Currency:s Country:s HID:i64 Customer:g CustomerCode:s CustomerName:s "
        "Blocked:b Created:dt Modified:dt")),
    EntitySpec("hrm/Divisions", "Division", "Code", _f(
        "Code:i Description:s Currency:s Country:s HID:i64 Main:b Customer:g CustomerCode:s CustomerName:s "
        "Blocked:b Created:dt Modified:dt")),
    EntitySpec("financial/GLAccounts", "GLAccount", "ID", _f(
        "ID:g Code:s Description:s SearchCode:s Type:i TypeDescription:s BalanceSide:s BalanceType:s IsBlocked:b "
        "UseCostcenter:y UseCostunit:y Costcenter:s CostcenterDescription:s Costunit:s CostunitDescription:s "
        "VATCode:s VATDescription:s Division:i " + _AUDIT)),
    EntitySpec("sync/Financial/GLAccounts", "SyncGLAccount", "Timestamp", _f(
        "Timestamp:i64 ID:g Code:s Description:s SearchCode:s Type:i TypeDescription:s BalanceSide:s BalanceType:s "
        "IsBlocked:b UseCostcenter:y UseCostunit:y Costcenter:s CostcenterDescription:s Costunit:s "
        "CostunitDescription:s VATCode:s VATDescription:s Division:i " + _AUDIT), page="sync", select_required=True),
    EntitySpec("bulk/Financial/GLAccounts", "GLAccount", "ID", _f(
        "ID:g Code:s Description:s SearchCode:s Type:i TypeDescription:s BalanceSide:s BalanceType:s IsBlocked:b "
        "UseCostcenter:y UseCostunit:y Costcenter:s CostcenterDescription:s Costunit:s CostunitDescription:s "
        "VATCode:s VATDescription:s Division:i " + _AUDIT), page="sync", select_required=True),
    EntitySpec("hrm/Costcenters", "Costcenter", "ID", _f(
        "ID:g Code:s Description:s Active:b EndDate:dt Division:i " + _AUDIT), padded_code=True),
    EntitySpec("hrm/Costunits", "Costunit", "ID", _f(
        "ID:g Code:s Description:s EndDate:dt Division:i " + _AUDIT), padded_code=True),
    EntitySpec("financial/Journals", "Journal", "ID", _f(
        "ID:g Code:s Description:s Type:i TypeDescription:s AllowVAT:b AllowVariableCurrency:b "
        "AllowVariableExchangeRate:b AutoSave:b Currency:s CurrencyDescription:s GLAccount:g GLAccountCode:s "
        "IsBlocked:b Division:i " + _AUDIT), padded_code=True),
    EntitySpec("vat/VATCodes", "VATCode", "ID", _f(
        "ID:g Code:s Description:s Percentage:d Type:s VATTransactionType:s GLToClaim:g GLToClaimCode:s "
        "GLToClaimDescription:s GLToPay:g GLToPayCode:s GLToPayDescription:s IsBlocked:b Division:i " + _AUDIT)),
    EntitySpec("financial/FinancialPeriods", "FinancialPeriod", "ID", _f(
        "ID:g FinYear:i16 FinPeriod:i16 StartDate:dt EndDate:dt Division:i " + _AUDIT)),
    EntitySpec("generaljournalentry/GeneralJournalEntries", "GeneralJournalEntry", "EntryID", _f(
        "EntryID:g EntryNumber:i JournalCode:s JournalDescription:s FinancialYear:i16 FinancialPeriod:i16 "
        "Currency:s ExchangeRate:d Reversal:b Status:i16 StatusDescription:s Type:i TypeDescription:s Division:i "
        "Created:dt Modified:dt"), methods=("GET", "POST", "DELETE"), select_required=True,
        navigation=("GeneralJournalEntryLines",)),
    EntitySpec("generaljournalentry/GeneralJournalEntryLines", "GeneralJournalEntryLine", "ID", _f(
        "ID:g EntryID:g EntryNumber:i LineNumber:i GLAccount:g GLAccountCode:s GLAccountDescription:s AmountFC:d "
        "AmountDC:d AmountVATFC:d AmountVATDC:d VATBaseAmountFC:d VATBaseAmountDC:d VATCode:s VATPercentage:d "
        "VATType:s Date:dt Description:s Notes:s OurRef:i CostCenter:s CostCenterDescription:s CostUnit:s "
        "CostUnitDescription:s Account:g Project:g Quantity:d OffsetID:g Division:i " + _AUDIT)),
    EntitySpec("financialtransaction/TransactionLines", "TransactionLine", "ID", _f(_TL_FIELDS),
               select_required=True),
    EntitySpec("sync/Financial/TransactionLines", "SyncTransactionLine", "Timestamp",
               _f("Timestamp:i64 " + _TL_FIELDS), page="sync", select_required=True),
    EntitySpec("bulk/Financial/TransactionLines", "TransactionLine", "ID", _f(_TL_FIELDS), page="sync",
               select_required=True),
)
SPEC_BY_PATH = {spec.path.lower(): spec for spec in SPECS}

GL_TYPE_DESCRIPTIONS = {
    10: "Cash", 12: "Bank", 14: "Credit card", 16: "Payment services", 20: "Accounts receivable",
    22: "Accounts payable", 24: "VAT", 25: "Employees payable", 26: "Prepaid expenses", 27: "Accrued expenses",
    90: "General", 110: "Revenue", 120: "Other costs", 121: "Sales, general administrative expenses",
    125: "Employee costs", 126: "Employment costs",
}
JOURNAL_TYPE_DESCRIPTIONS = {10: "Cash", 12: "Bank", 16: "Payment service", 20: "Sales", 22: "Purchase",
                             90: "General journal"}
KNOWN_CURRENCIES = {"EUR", "USD", "GBP", "CHF", "SEK", "NOK", "DKK", "PLN", "CZK", "JPY", "CAD", "AUD"}
CENT = Decimal("0.01")

# Fields a POST may carry (R C in §5.8/§5.9); anything else is refused like WCF does for unknown properties.
_HEADER_FIELDS = set(SPEC_BY_PATH["generaljournalentry/generaljournalentries"].fields) | {
    "GeneralJournalEntryLines", "__metadata"}
_LINE_FIELDS = set(SPEC_BY_PATH["generaljournalentry/generaljournalentrylines"].fields) | {"__metadata"}


def _guid(division: int, kind: str, key: str) -> str:
    # the main division keeps seed.stable_guid ids so fixtures can name them; others differ like real tenants
    return S.stable_guid(kind if division == S.DIVISION else f"{kind}:{division}", key)


def _cents(value: Decimal) -> Decimal:
    return value.quantize(CENT, rounding=ROUND_HALF_UP)


def nl_amount(value: Decimal) -> str:
    """1000 → '1.000,00' (nl-NL, as in the unbalanced-entry message of §5.10)."""
    text = f"{abs(value):,.2f}".replace(",", "_").replace(".", ",").replace("_", ".")
    return f"-{text}" if value < 0 else text


def _reject(message: str) -> ODataError:
    # exact-online.md §7, §13: business validation and value-conversion errors in a POST body are HTTP 500, not 400
    return ODataError(500, message)


def parse_post_date(value: Any, where: str) -> date:
    """Dates a POST may carry: '2024-03-15', an ISO datetime, or '/Date(ms)/' (§4.5 [?])."""
    if isinstance(value, str):
        m = re.fullmatch(r"/Date\((-?\d+)\)/", value)
        if m:
            return (datetime(1970, 1, 1) + timedelta(milliseconds=int(m.group(1)))).date()
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).date()
        except ValueError:
            pass
    raise _reject(f"Error converting value \"{value}\" to type 'System.DateTime'. Path '{where}'.")


def _number(value: Any, where: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _reject(f"Error converting value \"{value}\" to type 'System.Double'. Path '{where}'.")
    try:
        return Decimal(str(value))
    except ArithmeticError:
        raise _reject(f"Error converting value \"{value}\" to type 'System.Double'. Path '{where}'.") from None


@dataclass
class Ledger:
    """Master data and posted entries of one division; rows are plain dicts keyed by Exact field names."""

    division: int
    description: str
    country: str
    currency: str = S.DIVISION_CURRENCY
    main: bool = True
    gl_accounts: dict[str, dict] = field(default_factory=dict)  # by Code
    cost_centers: dict[str, dict] = field(default_factory=dict)
    cost_units: dict[str, dict] = field(default_factory=dict)
    journals: dict[str, dict] = field(default_factory=dict)
    vat_codes: dict[str, dict] = field(default_factory=dict)
    periods: dict[tuple[int, int], dict] = field(default_factory=dict)
    entries: dict[str, dict] = field(default_factory=dict)  # by EntryID, in posting order
    next_entry_number: int = 0
    last_timestamp: int = 1_000_000  # sync rows start well above the "Timestamp gt 1L" every client starts with

    @classmethod
    def from_seed(cls, division: int, description: str, country: str, main: bool, created: datetime) -> "Ledger":
        ledger = cls(division, description, country, main=main)
        for gl in S.GL_ACCOUNTS:
            ledger.upsert_gl_account(gl.code, gl.description, gl.type, balance_side=gl.balance_side,
                                     balance_type=gl.balance_type, use_costcenter=gl.use_costcenter,
                                     use_costunit=gl.use_costunit, blocked=gl.blocked, now=created)
        for cc in S.COST_CENTERS:
            ledger.upsert_dimension("costcenter", cc.code, cc.description, cc.end_date, created)
        for cu in S.COST_UNITS:
            ledger.upsert_dimension("costunit", cu.code, cu.description, cu.end_date, created)
        for j in S.JOURNALS:
            ledger.journals[j.code] = {
                "ID": _guid(division, "journal", j.code), "Code": j.code, "Description": j.description, "Type": j.type,
                "TypeDescription": JOURNAL_TYPE_DESCRIPTIONS.get(j.type), "AllowVAT": j.allow_vat,
                "AllowVariableCurrency": j.allow_variable_currency,
                "AllowVariableExchangeRate": j.allow_variable_exchange_rate, "AutoSave": False,
                "Currency": ledger.currency, "CurrencyDescription": "Euro", "GLAccount": None, "GLAccountCode": None,
                "IsBlocked": False, "Division": division, "Created": created, "Modified": created}
        for v in S.VAT_CODES:
            claim = ledger.gl_accounts.get(v.gl_to_claim) if v.gl_to_claim else None
            ledger.vat_codes[v.code] = {
                "ID": _guid(division, "vatcode", v.code), "Code": v.code, "Description": v.description,
                "Percentage": v.percentage, "Type": v.type, "VATTransactionType": "P",
                "GLToClaim": claim["ID"] if claim else None, "GLToClaimCode": claim["Code"] if claim else None,
                "GLToClaimDescription": claim["Description"] if claim else None, "GLToPay": None,
                "GLToPayCode": None, "GLToPayDescription": None, "IsBlocked": False, "Division": division,
                "Created": created, "Modified": created}
        for year in S.FINANCIAL_YEARS:
            for period in range(1, 13):
                start = date(year, period, 1)
                end = (date(year + (period == 12), period % 12 + 1, 1)) - timedelta(days=1)
                ledger.periods[(year, period)] = {
                    "ID": _guid(division, "period", f"{year}-{period}"), "FinYear": year, "FinPeriod": period,
                    "StartDate": start, "EndDate": end, "Division": division, "Created": created,
                    "Modified": created}
        return ledger

    # -- master data -----------------------------------------------------------------------------------
    def upsert_gl_account(self, code: str, description: str | None = None, type_: int | None = None, *,
                          balance_side: str | None = None, balance_type: str | None = None,
                          use_costcenter: int | None = None, use_costunit: int | None = None,
                          blocked: bool | None = None, now: datetime) -> dict:
        row = self.gl_accounts.get(code)
        if row is None:
            row = self.gl_accounts[code] = {
                "ID": _guid(self.division, "glaccount", code), "Code": code, "Description": description or code,
                "SearchCode": None, "Type": 121, "TypeDescription": None, "BalanceSide": "D", "BalanceType": "W",
                "IsBlocked": False, "UseCostcenter": 0, "UseCostunit": 0, "Costcenter": None,
                "CostcenterDescription": None, "Costunit": None, "CostunitDescription": None, "VATCode": None,
                "VATDescription": None, "Division": self.division, "Created": now}
        updates = {"Description": description, "Type": type_, "BalanceSide": balance_side,
                   "BalanceType": balance_type, "UseCostcenter": use_costcenter, "UseCostunit": use_costunit,
                   "IsBlocked": blocked}
        row.update({k: v for k, v in updates.items() if v is not None})
        row["TypeDescription"] = GL_TYPE_DESCRIPTIONS.get(row["Type"])
        # exact-online.md §4.5: SearchCode comes back space-padded (e.g. "RENTE    ")
        row["SearchCode"] = f"{code:<9}"
        row["Modified"] = now
        row["Timestamp"] = self.bump_timestamp()  # the row version sync/Financial/GLAccounts pages by (§4.3)
        return row

    def upsert_dimension(self, kind: str, code: str, description: str | None, end_date: date | None,
                         now: datetime) -> dict:
        table = self.cost_centers if kind == "costcenter" else self.cost_units
        row = table.get(code)
        if row is None:
            row = table[code] = {"ID": _guid(self.division, kind, code), "Code": code,
                                 "Description": description or code,
                                 "EndDate": None, "Division": self.division, "Created": now}
            if kind == "costcenter":
                row["Active"] = True
        if description is not None:
            row["Description"] = description
        row["EndDate"] = end_date
        if kind == "costcenter":
            row["Active"] = end_date is None or end_date >= now.astimezone(AMSTERDAM).date()
        row["Modified"] = now
        return row

    def gl_by_id(self, guid: str) -> dict | None:
        guid = guid.lower()
        return next((row for row in self.gl_accounts.values() if row["ID"] == guid), None)

    # -- reading -----------------------------------------------------------------------------------------
    def rows(self, spec: EntitySpec) -> list[dict]:
        path = spec.path
        if path in ("financial/GLAccounts", "sync/Financial/GLAccounts", "bulk/Financial/GLAccounts"):
            return list(self.gl_accounts.values())
        if path == "hrm/Costcenters":
            return list(self.cost_centers.values())
        if path == "hrm/Costunits":
            return list(self.cost_units.values())
        if path == "financial/Journals":
            return list(self.journals.values())
        if path == "vat/VATCodes":
            return list(self.vat_codes.values())
        if path == "financial/FinancialPeriods":
            return list(self.periods.values())
        if path == "generaljournalentry/GeneralJournalEntries":
            return [e["header"] for e in self.entries.values()]
        if path == "generaljournalentry/GeneralJournalEntryLines":
            return [line for e in self.entries.values() for line in e["lines"]]
        if path in ("financialtransaction/TransactionLines", "sync/Financial/TransactionLines",
                    "bulk/Financial/TransactionLines"):
            return [line for e in self.entries.values() for line in e["transaction_lines"]]
        return []

    def bump_timestamp(self) -> int:
        self.last_timestamp += 1
        return self.last_timestamp

    # -- posting (exact-online.md §5.8–§5.11) ------------------------------------------------------------
    def post_entry(self, body: Any, knobs, now: datetime) -> dict:
        """Validate a GeneralJournalEntries POST body and store it; raises ODataError with Exact's message."""
        if not isinstance(body, dict):
            raise ODataError(400, "Error processing request stream. JSON text specified is not valid.")
        _refuse_unknown(body, _HEADER_FIELDS, "GeneralJournalEntry")
        entry_id = body.get("EntryID")
        if entry_id is not None and not is_guid(entry_id):
            raise _reject(f"Error converting value \"{entry_id}\" to type 'System.Guid'. Path 'EntryID'.")
        # §13 [?]: strict mode (the default) ignores the client's EntryID and assigns Exact's own
        entry_id = (entry_id if entry_id and knobs.keep_client_entry_ids else str(uuid.uuid4())).lower()

        code = body.get("JournalCode")
        if code in (None, ""):
            raise _reject("Verplicht: Dagboek")
        journal = self.journals.get(str(code).strip())
        if journal is None or journal["Type"] != 90 or journal["IsBlocked"]:
            raise _reject("Ongeldig: Dagboek")

        raw_lines = body.get("GeneralJournalEntryLines")
        if isinstance(raw_lines, dict):
            raw_lines = raw_lines.get("results")  # OData v2 deep insert may wrap the collection
        if not isinstance(raw_lines, list) or not raw_lines:
            raise _reject("Verplicht: Boekingsregels")  # [?] text for an entry without lines

        currency, rate = self._currency_and_rate(body, journal, knobs)
        year, period = self._period(body, raw_lines, now)
        if (year, period) in {tuple(p) for p in knobs.closed_periods}:
            raise _reject(f"Periode is afgesloten: {year} / {period:02d}")  # [?]

        lines, tlines = [], []
        for i, raw in enumerate(raw_lines):
            line, derived = self._line(i, raw, journal, year, period, currency, rate, knobs)
            lines.append(line)
            tlines.extend(derived)

        total = _cents(sum((Decimal(str(t["AmountFC"])) for t in tlines), Decimal(0)))
        if total != 0:
            raise _reject(f"This entry is not balanced on: {year} / {period:02d} (Type: Other) - Difference: "
                          f"{currency} {nl_amount(total)}")
        if entry_id in self.entries:
            raise _reject(knobs.duplicate_entry_message)  # [?] text seen for duplicate keys (§5.11)

        number = body.get("EntryNumber")
        if not isinstance(number, int) or isinstance(number, bool):
            self.next_entry_number = max(self.next_entry_number, knobs.entry_number_start - 1) + 1
            number = self.next_entry_number
        header = {
            "EntryID": entry_id, "EntryNumber": number, "JournalCode": journal["Code"],
            "JournalDescription": journal["Description"], "FinancialYear": year, "FinancialPeriod": period,
            "Currency": currency, "ExchangeRate": float(rate), "Reversal": bool(body.get("Reversal", False)),
            "Status": 20, "StatusDescription": "Open", "Type": 90, "TypeDescription": "Other",
            "Division": self.division, "Created": now, "Modified": now}
        common = {"EntryID": entry_id, "EntryNumber": number, "Division": self.division, "Created": now,
                  "Modified": now}
        for n, line in enumerate(lines, start=1):
            line.update(common, LineNumber=n)
        for n, tline in enumerate(tlines, start=1):
            tline.update(common, LineNumber=n, FinancialYear=year, FinancialPeriod=period,
                         JournalCode=journal["Code"], JournalDescription=journal["Description"], Type=90, Status=20,
                         Currency=currency, ExchangeRate=float(rate), Timestamp=self.bump_timestamp())
        entry = {"header": header, "lines": lines, "transaction_lines": tlines}
        self.entries[entry_id] = entry
        return entry

    def _currency_and_rate(self, body: dict, journal: dict, knobs) -> tuple[str, Decimal]:
        currency = body.get("Currency") or self.currency
        if currency not in KNOWN_CURRENCIES:
            raise _reject("Ongeldig: Valuta")  # [?]
        given = body.get("ExchangeRate")
        if currency == self.currency:
            if given not in (None, 1, 1.0):
                raise _reject("Ongeldig: Wisselkoers")  # [?]
            return currency, Decimal(1)
        if not journal["AllowVariableCurrency"]:
            raise _reject("Ongeldig: Valuta")  # [?] foreign currency needs AllowVariableCurrency (§5.3)
        if given is None:
            known = knobs.exchange_rates.get(currency)
            if known is None:
                raise _reject("Ongeldig: Wisselkoers")  # [?]
            return currency, Decimal(str(known))
        if not journal["AllowVariableExchangeRate"]:
            raise _reject("Niet toegestaan: Wisselkoers")  # [?] §5.8 ExchangeRate needs AllowVariableExchangeRate
        rate = _number(given, "ExchangeRate")
        if rate <= 0:
            raise _reject("Ongeldig: Wisselkoers")
        return currency, rate

    def _period(self, body: dict, raw_lines: list, now: datetime) -> tuple[int, int]:
        year, period = body.get("FinancialYear"), body.get("FinancialPeriod")
        if year is None or period is None:
            # derive from the first line's date, the way the UI does
            first = raw_lines[0] if isinstance(raw_lines[0], dict) else {}
            when = (parse_post_date(first["Date"], "GeneralJournalEntryLines[0].Date") if first.get("Date")
                    else now.astimezone(AMSTERDAM).date())
            year = year if year is not None else when.year
            period = period if period is not None else when.month
        if not isinstance(year, int) or not isinstance(period, int):
            raise _reject(f"Error converting value \"{year}/{period}\" to type 'System.Int16'.")
        if year not in {y for y, _ in self.periods}:
            raise _reject("Ongeldig: Boekjaar")  # [?]
        if (year, period) not in self.periods:
            raise _reject("Ongeldig: Periode")  # [?]
        return year, period

    def _line(self, i: int, raw: Any, journal: dict, year: int, period: int, currency: str, rate: Decimal,
              knobs) -> tuple[dict, list[dict]]:
        where = f"GeneralJournalEntryLines[{i}]"
        if not isinstance(raw, dict):
            raise ODataError(400, "Error processing request stream. JSON text specified is not valid.")
        _refuse_unknown(raw, _LINE_FIELDS, "GeneralJournalEntryLine")
        gl_id = raw.get("GLAccount")
        if gl_id in (None, ""):
            raise _reject("Verplicht: Grootboekrekening")
        if not is_guid(gl_id):
            raise _reject(f"Error converting value \"{gl_id}\" to type 'System.Guid'. Path '{where}.GLAccount'.")
        gl = self.gl_by_id(gl_id)
        if gl is None:
            raise _reject("Ongeldig: Grootboekrekening")
        if gl["IsBlocked"]:
            raise _reject("Geblokkeerd: Grootboekrekening")  # [?]
        if gl["Type"] in set(knobs.disallowed_gl_types):
            raise _reject("Ongeldig: Grootboekrekeningtype")
        if raw.get("AmountFC") is None:
            raise _reject("Verplicht: Bedrag")  # [?] AmountFC is mandatory per Elmas (§5.9)
        amount = _number(raw["AmountFC"], f"{where}.AmountFC")
        when = (parse_post_date(raw["Date"], f"{where}.Date") if raw.get("Date")
                else self.periods[(year, period)]["StartDate"])
        description, notes = raw.get("Description"), raw.get("Notes")
        if knobs.enforce_field_lengths:
            for name, value, limit in (("Description", description, knobs.description_max_length),
                                       ("Notes", notes, knobs.notes_max_length)):
                if isinstance(value, str) and len(value) > limit:
                    raise _reject(f"{name}: de waarde is te lang (maximaal {limit} tekens)")  # [?]
        cost_center = self._dimension(raw.get("CostCenter"), self.cost_centers, when, "Kostenplaats",
                                      gl["UseCostcenter"])
        cost_unit = self._dimension(raw.get("CostUnit"), self.cost_units, when, "Kostendrager", gl["UseCostunit"])

        vat = None
        vat_code = raw.get("VATCode")
        if vat_code not in (None, ""):
            # dotnet#138: a VAT code on a journal without AllowVAT is refused; "" is accepted (§5.11)
            if not journal["AllowVAT"]:
                raise _reject("Not allowed: VAT-code")
            vat = self.vat_codes.get(str(vat_code).strip())
            if vat is None or vat["IsBlocked"]:
                raise _reject("Ongeldig: Btw-code")  # [?]

        base, vat_amount = amount, Decimal(0)
        pct = Decimal(str(vat["Percentage"])) if vat else Decimal(0)
        if vat and vat["Type"] == "I" and pct:
            # including: AmountFC is gross; Exact splits the VAT off onto GLToClaim (§5.9)
            vat_amount = _cents(amount - amount / (1 + pct))
            base = amount - vat_amount
        elif vat and vat["Type"] == "E" and pct:
            # excluding: AmountFC is net and the VAT line comes on top, so the offset must carry net+VAT (§5.10)
            vat_amount = _cents(amount * pct)
        if vat and raw.get("AmountVATFC") is not None and vat_amount:
            given = _number(raw["AmountVATFC"], f"{where}.AmountVATFC")
            base = amount - given if vat["Type"] == "I" else amount
            vat_amount = given

        def dc(value: Decimal) -> float:
            return float(_cents(value * rate))

        cc_row = self.cost_centers.get(cost_center) if cost_center else None
        cu_row = self.cost_units.get(cost_unit) if cost_unit else None
        shared = {"GLAccount": gl["ID"], "GLAccountCode": gl["Code"], "GLAccountDescription": gl["Description"],
                  "Date": when, "Description": description, "Notes": notes,
                  "CostCenter": cost_center, "CostCenterDescription": cc_row["Description"] if cc_row else None,
                  "CostUnit": cost_unit, "CostUnitDescription": cu_row["Description"] if cu_row else None,
                  "Account": raw.get("Account"), "OffsetID": raw.get("OffsetID")}
        line = {"ID": str(uuid.uuid4()), **shared, "AmountFC": float(amount), "AmountDC": dc(amount),
                "AmountVATFC": float(vat_amount) if vat else None, "AmountVATDC": dc(vat_amount) if vat else None,
                "VATBaseAmountFC": float(base) if vat else None, "VATBaseAmountDC": dc(base) if vat else None,
                "VATCode": vat["Code"] if vat else None, "VATPercentage": float(pct) if vat else None,
                "VATType": ("I" if vat_amount else "S") if vat else None, "OurRef": raw.get("OurRef"),
                "Project": raw.get("Project"), "Quantity": raw.get("Quantity")}
        base_tl = {"ID": str(uuid.uuid4()), **shared, "LineType": 0, "AmountFC": float(base), "AmountDC": dc(base),
                   "AmountVATFC": float(vat_amount) if vat else None,
                   "AmountVATBaseFC": float(base) if vat else None, "VATCode": vat["Code"] if vat else None,
                   "VATCodeDescription": vat["Description"] if vat else None,
                   "VATPercentage": float(pct) if vat else None,
                   "VATType": ("I" if vat_amount else "S") if vat else None,
                   "YourRef": None, "AccountCode": None, "AccountName": None, "_gje_line": line["ID"]}
        derived = [base_tl]
        if vat_amount:
            claim = self.gl_by_id(vat["GLToClaim"]) if vat["GLToClaim"] else None
            if claim is None:
                raise _reject("Ongeldig: Grootboekrekening")
            derived.append({
                "ID": str(uuid.uuid4()), "GLAccount": claim["ID"], "GLAccountCode": claim["Code"],
                "GLAccountDescription": claim["Description"], "Date": when, "Description": description,
                "Notes": None, "CostCenter": None, "CostCenterDescription": None, "CostUnit": None,
                "CostUnitDescription": None, "Account": None, "OffsetID": None, "LineType": 0,
                "AmountFC": float(vat_amount), "AmountDC": dc(vat_amount), "AmountVATFC": None,
                "AmountVATBaseFC": float(base), "VATCode": vat["Code"], "VATCodeDescription": vat["Description"],
                "VATPercentage": float(pct), "VATType": "O", "YourRef": None, "AccountCode": None,
                "AccountName": None, "_gje_line": None})
        return line, derived

    @staticmethod
    def _dimension(value: Any, table: dict[str, dict], when: date, noun: str, use: int) -> str | None:
        code = str(value).strip() if value not in (None, "") else None
        if code is None:
            if use == 1:
                raise _reject(f"Verplicht: {noun}")
            return None
        if use == 2:
            raise _reject(f"Niet toegestaan: {noun}")  # [?]
        row = table.get(code)
        if row is None or (row["EndDate"] is not None and when > row["EndDate"]):
            raise _reject(f"Ongeldig: {noun}")  # [?] for an ended cost center/unit
        return code


def _refuse_unknown(body: dict, allowed: set[str], type_name: str) -> None:
    for name in body:
        if name not in allowed:
            raise ODataError(400, f"The property '{name}' does not exist on type 'Exact.Web.Api.Models.{type_name}'. "
                                  f"Make sure to only use property names that are defined by the type.")

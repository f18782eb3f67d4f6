"""Demo data shared by both simulators: a fictional Dutch professional-services firm and its expenses.

Everything is deterministic and relative to `today`, so the demo always has 30 days of approved reports.
The seeded problems are deliberate: one category no mapping covers ("Gifts") and one office tag
("Eindhoven") that names a cost center Exact does not have.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta

DIVISION = 123456
SECOND_DIVISION = 234567  # Belgian subsidiary, used by multi-division tests
DIVISION_CURRENCY = "EUR"

# Fixed demo credentials. They are not secrets of any real system; the sandbox accepts only these.
EXPENSIFY_PARTNER_USER_ID = "aa_finance_vermeerhals_nl"
EXPENSIFY_PARTNER_USER_SECRET = "sbx-expensify-5f1c9e2a7d4b"
EXACT_CLIENT_ID = "9b1c2d3e-4f50-4617-8a9b-0c1d2e3f4a5b"
EXACT_CLIENT_SECRET = "sbx-exact-secret-Qm7pX2"
EXACT_REDIRECT_URI = "https://connector.example.com/exact/callback"
EXACT_INITIAL_REFRESH_TOKEN = "sbx-refresh-0-Zx81LmQ"
EXACT_WEBHOOK_SECRET = "sbx-webhook-secret-4kT9"
CARD_DOMAIN = "vermeerhals.nl"

POLICY_ID = "7A3F9C21B4D05E68"
POLICY_NAME = "Vermeer & Hals NL"


@dataclass(frozen=True)
class GLAccount:
    code: str
    description: str
    type: int  # Exact GLAccount.Type (exact-online.md §5.2)
    balance_side: str = "D"
    balance_type: str = "W"
    use_costcenter: int = 0  # 0 optional, 1 mandatory, 2 not allowed
    use_costunit: int = 0
    blocked: bool = False

    @property
    def id(self) -> str:
        return stable_guid("glaccount", self.code)


GL_ACCOUNTS: tuple[GLAccount, ...] = (
    GLAccount("1500", "Te vorderen BTW", 24, "D", "B"),
    GLAccount("1650", "Te betalen declaraties medewerkers", 25, "C", "B"),
    GLAccount("1660", "Creditcard ING Corporate", 14, "C", "B"),
    GLAccount("1661", "Creditcard American Express", 14, "C", "B"),
    GLAccount("4500", "Reiskosten", 121, use_costcenter=1),
    GLAccount("4510", "Hotelkosten", 121),
    GLAccount("4520", "Representatiekosten", 121),
    GLAccount("4530", "Taxi en openbaar vervoer", 121),
    GLAccount("4600", "Kantoorbenodigdheden", 121),
    GLAccount("4610", "Software en abonnementen", 121),
    GLAccount("4700", "Opleidingskosten", 125),
    GLAccount("4800", "Oude kostenrekening (geblokkeerd)", 121, blocked=True),
    GLAccount("4990", "Afrondingsverschillen", 121),
)


@dataclass(frozen=True)
class Dimension:
    code: str
    description: str
    end_date: date | None = None

    def id(self, kind: str) -> str:
        return stable_guid(kind, self.code)


COST_CENTERS: tuple[Dimension, ...] = (
    Dimension("AMS", "Kantoor Amsterdam"),
    Dimension("RTM", "Kantoor Rotterdam"),
    Dimension("UTR", "Kantoor Utrecht"),
    Dimension("DHG", "Kantoor Den Haag (gesloten)", end_date=date(2024, 12, 31)),
)

COST_UNITS: tuple[Dimension, ...] = (
    Dimension("P1001", "Rijkswaterstaat audit"),
    Dimension("P1002", "Zuidas due diligence"),
    Dimension("P1003", "Havenbedrijf operations review"),
    Dimension("INT", "Intern / niet declarabel"),
)


@dataclass(frozen=True)
class Journal:
    code: str
    description: str
    type: int
    allow_vat: bool = False
    allow_variable_currency: bool = False
    allow_variable_exchange_rate: bool = False


JOURNALS: tuple[Journal, ...] = (
    Journal("90", "Memoriaal", 90, allow_vat=True, allow_variable_currency=True, allow_variable_exchange_rate=True),
    Journal("91", "Declaraties", 90),
    Journal("20", "Bank ING", 12),
)


@dataclass(frozen=True)
class VATCode:
    code: str
    description: str
    percentage: float
    type: str  # I including, E excluding, N no VAT, B base only
    gl_to_claim: str | None = "1500"


VAT_CODES: tuple[VATCode, ...] = (
    VATCode("1", "BTW hoog 21% inclusief", 0.21, "I"),
    VATCode("2", "BTW laag 9% inclusief", 0.09, "I"),
    VATCode("5", "BTW hoog 21% exclusief", 0.21, "E"),
    VATCode("0", "Geen BTW", 0.0, "N", gl_to_claim=None),
)

# Financial years follow the calendar; periods are months. Anything before CLOSED_BEFORE is closed.
FINANCIAL_YEARS = (2024, 2025, 2026, 2027)


@dataclass(frozen=True)
class Employee:
    email: str
    name: str
    employee_id: str


EMPLOYEES: tuple[Employee, ...] = (
    Employee("anna.devries@vermeerhals.nl", "Anna de Vries", "E001"),
    Employee("bram.jansen@vermeerhals.nl", "Bram Jansen", "E002"),
    Employee("chloe.bakker@vermeerhals.nl", "Chloé Bakker", "E003"),
    Employee("daan.visser@vermeerhals.nl", "Daan Visser", "E004"),
    Employee("eva.smit@vermeerhals.nl", "Eva Smit", "E005"),
    Employee("finance@vermeerhals.nl", "Finance Team", "E000"),
)
APPROVER = "finance@vermeerhals.nl"


@dataclass(frozen=True)
class Card:
    card_id: int
    bank: str  # the card feed
    name: str
    masked_number: str
    owner: str


CARDS: tuple[Card, ...] = (
    Card(4242, "ing_corporate", "ING Corporate - Anna", "5412XXXXXXXX4242", "anna.devries@vermeerhals.nl"),
    Card(5151, "amex", "Amex - Daan", "3782XXXXXXX5151", "daan.visser@vermeerhals.nl"),
)

CATEGORIES: tuple[tuple[str, str], ...] = (  # (name, GL code as set in Expensify's policy)
    ("Travel", "4500"),
    ("Hotel", "4510"),
    ("Meals", "4520"),
    ("Taxi", "4530"),
    ("Office Supplies", "4600"),
    ("Software", "4610"),
    ("Training", "4700"),
    ("Gifts", ""),  # seeded problem: no GL code and no mapping row
)
OFFICE_TAGS = ("Amsterdam", "Rotterdam", "Utrecht", "Eindhoven")  # Eindhoven: no cost center in Exact
PROJECT_TAGS = ("P1001 Rijkswaterstaat", "P1002 Zuidas", "P1003 Havenbedrijf", "Internal")
TAX_RATES = (("Hoog 21%", "id_TAX_21", 21.0), ("Laag 9%", "id_TAX_9", 9.0), ("Vrijgesteld", "id_TAX_0", 0.0))


@dataclass(frozen=True)
class Expense:
    transaction_id: str
    merchant: str
    category: str
    tag: str  # multi-level, joined by ":" (a literal colon would be "\:")
    amount: int  # cents, original currency; negative for a refund
    currency: str
    converted_amount: int  # cents, report currency
    rate: float
    created: date
    reimbursable: bool
    card: Card | None = None
    comment: str = ""
    tax_name: str = ""
    tax_amount: int = 0
    billable: bool = False
    receipt_filename: str = ""


@dataclass(frozen=True)
class Report:
    report_id: str
    name: str
    employee: Employee
    currency: str
    created: datetime
    submitted: datetime
    approved: datetime  # naive, in UTC: how the sandbox prints report timestamps (expensify.md §3 [INF])
    expenses: tuple[Expense, ...]
    state: str = "APPROVED"

    @property
    def total(self) -> int:
        return sum(e.converted_amount for e in self.expenses)


@dataclass(frozen=True)
class UnreportedCardTransaction:
    transaction_id: str
    card: Card
    merchant: str
    amount: int  # cents, positive for spend; the simulator serves it negated, as Expensify's reconciliation data is (expensify.md §6.3)
    currency: str
    created: date
    category: str = ""


@dataclass
class Seed:
    today: date
    reports: list[Report] = field(default_factory=list)
    unreported_card_transactions: list[UnreportedCardTransaction] = field(default_factory=list)

    @property
    def approved_reports(self) -> list[Report]:
        return [r for r in self.reports if r.state in ("APPROVED", "REIMBURSED")]


def stable_guid(kind: str, key: str) -> str:
    """A GUID that is the same on every run, so fixtures and assertions can name it."""
    digest = hashlib.sha256(f"{kind}:{key}".encode()).hexdigest()
    return f"{digest[:8]}-{digest[8:12]}-4{digest[13:16]}-8{digest[17:20]}-{digest[20:32]}"


_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _report_id(n: int | str) -> str:
    digits = int(hashlib.sha256(f"report:{n}".encode()).hexdigest(), 16)
    out = ""
    for _ in range(10):
        digits, rem = divmod(digits, 62)
        out += _BASE62[rem]
    return "R00" + out[:9]


def _transaction_id(report_no: int, line_no: int) -> str:
    return str(4056343049275000000 + report_no * 100 + line_no)


# (merchant, category, office, project, amount cents, currency, rate to EUR, reimbursable card?, comment, tax)
_LINE_PLAN: tuple[tuple, ...] = (
    ("NS Reizigers", "Travel", "Amsterdam", "P1001 Rijkswaterstaat", 2340, "EUR", 1.0, None, "Train to client", "Laag 9%"),
    ("Hotel Okura", "Hotel", "Amsterdam", "P1002 Zuidas", 18950, "EUR", 1.0, None, "", "Laag 9%"),
    ("Restaurant De Kas", "Meals", "Rotterdam", "P1003 Havenbedrijf", 8675, "EUR", 1.0, 4242, 'Dinner "kick-off" with client', "Hoog 21%"),
    ("Uber", "Taxi", "Utrecht", "Internal", 2712, "EUR", 1.0, None, "", "Laag 9%"),
    ("Staples", "Office Supplies", "Amsterdam", "Internal", 4599, "EUR", 1.0, 4242, "", "Hoog 21%"),
    ("JetBrains s.r.o.", "Software", "Rotterdam", "Internal", 24900, "USD", 0.9213, 5151, "IDE licence", ""),
    ("Delta Air Lines", "Travel", "Utrecht", "P1003 Havenbedrijf", 61234, "USD", 0.9187, 5151, "NYC workshop: flights", ""),
    ("Coursera", "Training", "Amsterdam", "Internal", 3900, "GBP", 1.1712, None, "", ""),
    ("Café Loetje", "Meals", "Utrecht", "P1001 Rijkswaterstaat", 5430, "EUR", 1.0, None, "Team lunch\nafter workshop", "Hoog 21%"),
    ("Albert Heijn", "Meals", "Rotterdam", "Internal", 1289, "EUR", 1.0, None, "", "Laag 9%"),
)


def build_seed(today: date) -> Seed:
    """The demo data set: about 30 approved reports spread over the 30 days before `today`."""
    seed = Seed(today=today)
    for n in range(30):
        days_ago = 30 - n  # one report a day, from today-30 to today-1
        approved_day = today - timedelta(days=days_ago)
        # Approval times spread over the day, some close to midnight to test partition boundaries in Amsterdam time.
        approved = datetime.combine(approved_day, time(hour=[8, 10, 13, 15, 22, 23][n % 6], minute=(7 * n) % 60))
        seed.reports.append(planned_report(n, _report_id(n), approved, [_transaction_id(n, k) for k in range(3)],
                                           state="REIMBURSED" if n < 5 else "APPROVED"))
    _add_special_reports(seed, today)
    seed.unreported_card_transactions = [
        UnreportedCardTransaction("4056343049279000001", CARDS[0], "Shell Station A10", 7420, "EUR", today - timedelta(days=3), "Travel"),
        UnreportedCardTransaction("4056343049279000002", CARDS[1], "AWS EMEA", 13311, "USD", today - timedelta(days=6), "Software"),
    ]
    return seed


def planned_report(n: int, report_id: str, approved: datetime, transaction_ids: list[str],
                   state: str = "APPROVED") -> Report:
    """Report number `n` of the line plan, approved at `approved` (naive UTC): 1 + n % 3 expenses, every one of them
    covered by the demo mappings, so it posts rather than quarantines. `transaction_ids` names its (up to 3) lines."""
    submitters = [e for e in EMPLOYEES if e.email != APPROVER]
    cards = {c.card_id: c for c in CARDS}
    approved_day = approved.date()
    employee = submitters[n % len(submitters)]
    expenses = []
    for k in range(1 + n % 3):
        plan = _LINE_PLAN[(n * 3 + k) % len(_LINE_PLAN)]
        merchant, category, office, project, amount, currency, rate, card_id, comment, tax_name = plan
        card = cards.get(card_id) if card_id else None
        converted = round(amount * rate)
        tax_rate = {"Hoog 21%": 0.21, "Laag 9%": 0.09}.get(tax_name, 0.0)
        expenses.append(Expense(
            transaction_id=transaction_ids[k],
            merchant=merchant,
            category=category,
            tag=f"{office}:{project}",
            amount=amount,
            currency=currency,
            converted_amount=converted,
            rate=rate,
            created=approved_day - timedelta(days=2 + k),
            reimbursable=card is None,
            card=card,
            comment=comment,
            tax_name=tax_name,
            tax_amount=round(converted * tax_rate / (1 + tax_rate)) if tax_rate else 0,
            billable=project != "Internal",
            receipt_filename=f"w_{transaction_ids[k]}.jpg",
        ))
    return Report(
        report_id=report_id,
        name=f"Expenses {employee.name.split()[0]} {approved_day:%d %b}",
        employee=employee,
        currency="EUR",
        created=approved - timedelta(days=3, hours=2),
        submitted=approved - timedelta(days=1, hours=1),
        approved=approved,
        expenses=tuple(expenses),
        state=state,
    )


def _add_special_reports(seed: Seed, today: date) -> None:
    """The edge cases the demo must show: a refund, the two seeded problems, and reports that must not be posted."""
    emp = EMPLOYEES
    def at(days_ago: int, hour: int) -> datetime:
        return datetime.combine(today - timedelta(days=days_ago), time(hour=hour, minute=30))

    def expense(rid: int, k: int, merchant: str, category: str, tag: str, amount: int, created_days_ago: int, **kw) -> Expense:
        return Expense(_transaction_id(rid, k), merchant, category, tag, amount, kw.pop("currency", "EUR"),
                       kw.pop("converted", amount), kw.pop("rate", 1.0), today - timedelta(days=created_days_ago),
                       kw.pop("reimbursable", True), **kw)

    specials = [
        # A refund: a returned train ticket next to the new one (negative amount on the same side).
        Report(_report_id(100), "Train rebooking", emp[1], "EUR", at(12, 7), at(11, 9), at(10, 11), (
            expense(100, 0, "NS Reizigers", "Travel", "Rotterdam:P1003 Havenbedrijf", 4580, 13, tax_name="Laag 9%", tax_amount=378),
            expense(100, 1, "NS Reizigers (refund)", "Travel", "Rotterdam:P1003 Havenbedrijf", -2290, 13, comment="Refund: cancelled leg", tax_name="Laag 9%", tax_amount=-189),
        )),
        # Seeded problem 1: a category that maps to no GL account.
        Report(_report_id(101), "Client gifts December", emp[2], "EUR", at(9, 8), at(8, 9), at(7, 14), (
            expense(101, 0, "Bijenkorf", "Gifts", "Amsterdam:P1002 Zuidas", 12500, 10, comment="Gift: client's anniversary"),
            expense(101, 1, "Uber", "Taxi", "Amsterdam:P1002 Zuidas", 1870, 10),
        )),
        # Seeded problem 2: an office tag whose cost center Exact does not have.
        Report(_report_id(102), "Eindhoven workshop", emp[3], "EUR", at(6, 8), at(5, 9), at(4, 16), (
            expense(102, 0, "Hotel Pullman Eindhoven", "Hotel", "Eindhoven:P1001 Rijkswaterstaat", 15900, 6, tax_name="Laag 9%", tax_amount=1313),
        )),
        # Not approved yet: must never be exported or posted.
        Report(_report_id(103), "Draft: conference", emp[4], "EUR", at(2, 8), at(1, 9), at(1, 9), (
            expense(103, 0, "Jaarbeurs Utrecht", "Training", "Utrecht:Internal", 29500, 3),
        ), state="SUBMITTED"),
    ]
    seed.reports.extend(specials)

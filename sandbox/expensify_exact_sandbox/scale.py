"""A morning for many customers: N connections, each with its own Exact division and user, its own Expensify policy
with approved reports for one day, sharing K partner logins. Deterministic, so a benchmark can name every piece."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import date, datetime, time

from expensify_exact_sandbox import seed as S

# Far from the demo's 4056343049275… and from what ExpensifySimulator.add_report numbers (4056343049290…).
_TRANSACTION_BASE = 4056343100000000000


@dataclass(frozen=True)
class PartnerCredential:
    """One Expensify partner login: `name` is what a connection's `expensify.credential` says."""

    name: str
    user_id: str
    secret: str


@dataclass(frozen=True, kw_only=True)
class ScaleScenario:
    """`connections` customers; connection i (0-based) has division `division(i)`, policy `policy_id(i)` with
    `reports_per_policy` reports approved on `day` (UTC daytime, so the same day in Europe/Amsterdam), Exact refresh
    token `refresh_token(i)` (its own user and consent), and exports with partner login `credential(i)`, one of
    `credentials` shared round-robin. Every report is valid for the demo mappings, so it posts.

    Start the simulators with it: `SandboxServer(scale=scenario)` or `expensify-exact-sandbox serve --connections N`.
    """

    connections: int
    day: date
    reports_per_policy: int = 20
    credentials: int = 1
    first_division: int = 500001

    def __post_init__(self):
        if self.connections < 1:
            raise ValueError("a scale scenario needs at least one connection")
        if not 1 <= self.credentials <= self.connections:
            raise ValueError(f"credentials must be between 1 and connections ({self.connections})")
        if self.reports_per_policy < 0:
            raise ValueError("reports_per_policy cannot be negative")
        if self.first_division < 1 or self.first_division + self.connections > 10 ** 9:
            raise ValueError("divisions are positive numbers below 10^9")
        demo = {S.DIVISION, S.SECOND_DIVISION} & set(self.divisions)
        if demo:
            raise ValueError(f"the customer divisions overlap the demo's ({sorted(demo)})")

    @property
    def divisions(self) -> range:
        return range(self.first_division, self.first_division + self.connections)

    def division(self, i: int) -> int:
        return self.divisions[self._index(i)]

    def connection_name(self, i: int) -> str:
        return f"customer-{self._index(i):04d}"

    def customer_name(self, i: int) -> str:
        return f"Klant {self._index(i):04d} B.V."

    def policy_id(self, i: int) -> str:
        return hashlib.sha256(f"scale-policy:{self._index(i)}".encode()).hexdigest()[:16].upper()

    def refresh_token(self, i: int) -> str:
        digest = hashlib.sha256(f"scale-refresh:{self.division(i)}".encode()).hexdigest()[:12]
        return f"sbx-refresh-{self.division(i)}-{digest}"

    def credential(self, i: int) -> PartnerCredential:
        """The partner login connection i exports with."""
        return self.partner(self._index(i) % self.credentials)

    def partner(self, k: int) -> PartnerCredential:
        if not 0 <= k < self.credentials:
            raise IndexError(f"partner login {k} of {self.credentials}")
        digest = hashlib.sha256(f"scale-partner:{k}".encode()).hexdigest()[:12]
        return PartnerCredential(f"partner-{k:03d}", f"partner_{k:03d}_scale_example_com", f"sbx-expensify-{digest}")

    def partners(self) -> list[PartnerCredential]:
        return [self.partner(k) for k in range(self.credentials)]

    def reports(self, i: int) -> list[S.Report]:
        """Connection i's approved reports: the demo seed's line plan, 1–3 expenses each, approved on `day`."""
        i = self._index(i)
        out = []
        for r in range(self.reports_per_policy):
            n = i * self.reports_per_policy + r
            approved = datetime.combine(self.day, time(hour=7 + r % 14, minute=(7 * r + i) % 60))
            out.append(S.planned_report(n, S._report_id(f"scale:{i}:{r}"), approved,
                                        [str(_TRANSACTION_BASE + n * 10 + k) for k in range(3)]))
        return out

    def install(self, exact, expensify) -> None:
        """Open every customer's division in the Exact simulator and its login, policy and reports in Expensify's."""
        for k in range(self.credentials):
            partner = self.partner(k)
            policies = {self.policy_id(i): self.customer_name(i)
                        for i in range(k, self.connections, self.credentials)}
            expensify.add_partner(partner.user_id, partner.secret, policies)
        for i in range(self.connections):
            exact.open_customer_division(self.division(i), self.refresh_token(i), self.customer_name(i))
            expensify.load_reports(self.reports(i), self.policy_id(i))

    def plan(self) -> dict:
        """Everything a benchmark configures, as JSON-ready data (`expensify-exact-sandbox scale-plan` prints it)."""
        return {
            "day": self.day.isoformat(), "reports_per_policy": self.reports_per_policy,
            "partners": [vars(p) for p in self.partners()],
            "connections": [{"name": self.connection_name(i), "division": self.division(i),
                             "policy_id": self.policy_id(i), "credential": self.credential(i).name,
                             "exact_refresh_token": self.refresh_token(i)} for i in range(self.connections)],
        }

    def _index(self, i: int) -> int:
        if not 0 <= i < self.connections:
            raise IndexError(f"connection {i} of {self.connections}")
        return i

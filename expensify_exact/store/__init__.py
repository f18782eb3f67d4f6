"""The connector's own state: SQLite by default, PostgreSQL in production, through one SQLAlchemy Core schema.

`StateStore` assembles one class per concern: lease locks, encrypted secrets and Exact tokens, the intent ledger,
the quarantine, the append-only audit log, what each API's rate limits have seen of a credential, connection facts,
dimension snapshots, closed days and deferred reports, and notifications sent once. `vault.py` encrypts.
"""

from __future__ import annotations

from expensify_exact.store.audit import AuditStore
from expensify_exact.store.base import default_state_url
from expensify_exact.store.days import DayStore, Deferral
from expensify_exact.store.facts import FactStore
from expensify_exact.store.ledger import Intent, IntentKind, IntentStatus, LedgerRow, LedgerStore, NewIntent
from expensify_exact.store.limits import LimitStore
from expensify_exact.store.locks import LockStore, process_gone_here, process_stat
from expensify_exact.store.migrations import MIGRATIONS, SCHEMA_VERSION
from expensify_exact.store.notifications import NotificationStore
from expensify_exact.store.overview import OverviewStore
from expensify_exact.store.quarantine import QuarantineItem, QuarantineStatus, QuarantineStore
from expensify_exact.store.schema import audit_log, intents, metadata, quarantine, rate_limits, schema_migrations
from expensify_exact.store.secrets import SecretStore
from expensify_exact.store.snapshots import SnapshotStore

__all__ = [
    "MIGRATIONS", "SCHEMA_VERSION", "Deferral", "Intent", "IntentKind", "IntentStatus", "LedgerRow", "NewIntent",
    "QuarantineItem", "QuarantineStatus", "StateStore", "audit_log", "default_state_url", "intents", "metadata",
    "process_gone_here", "process_stat", "quarantine", "rate_limits", "schema_migrations",
]


class StateStore(LockStore, SecretStore, LedgerStore, QuarantineStore, AuditStore, LimitStore, FactStore,
                 SnapshotStore, DayStore, NotificationStore, OverviewStore):
    """All reads and writes of the connector's state. Safe to share across threads and processes."""

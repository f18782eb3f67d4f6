"""The resources every asset, sensor and job of the connector shares: `ConnectorResource` only builds the
plain-Python config, state store, vault and API clients; per-day pickle storage is the IO manager."""

from __future__ import annotations

import os
from functools import lru_cache

import dagster as dg

from expensify_exact.api import connections
from expensify_exact.api.connections import ReadOnlyRecords, build_exact_client, build_expensify_client
from expensify_exact.api.exact.client import ExactClient
from expensify_exact.api.expensify.client import ExpensifyClient
from expensify_exact.clock import Clock
from expensify_exact.config import Connection, ProjectConfig, load_project_config
from expensify_exact.defs.io_manager import PerDayPickleIOManager
from expensify_exact.store import StateStore
from expensify_exact.store.vault import CredentialVault


@lru_cache(maxsize=8)
def _store(url: str | None) -> StateStore:
    return StateStore(url)


class ConnectorResource(dg.ConfigurableResource):
    """Where the mappings and the connector's state live; hands out clients per connection."""

    mappings_dir: str = "mappings"
    state_url: str | None = None  # default: $EXPENSIFY_EXACT_STATE_URL, else SQLite under $DAGSTER_HOME

    def project(self) -> ProjectConfig:
        return load_project_config(self.mappings_dir)

    def store(self) -> StateStore:
        return _store(self.state_url or os.environ.get("EXPENSIFY_EXACT_STATE_URL"))

    def clock(self) -> Clock:
        """The connector's time, as its API clients read it (`connections.SystemClock`; tests swap that)."""
        return connections.SystemClock()

    def vault(self) -> CredentialVault:
        return CredentialVault(self.store())

    def expensify_client(self, conn: Connection, *, read_only: bool = False) -> ExpensifyClient:
        """`read_only`: the client records nothing in the state DB (`connections.ReadOnlyRecords`)."""
        store = self.store()
        return build_expensify_client(conn, self.vault(), store=ReadOnlyRecords(store) if read_only else store)

    def exact_client(self, conn: Connection, *, read_only: bool = False) -> ExactClient:
        """`read_only`: it records nothing in the state DB but a rotated token (`connections.ReadOnlyRecords`)."""
        store = self.store()
        return build_exact_client(conn, self.vault(), store, records=ReadOnlyRecords(store) if read_only else None)


def build(config: ProjectConfig) -> dg.Definitions:
    # The state URL is read from $EXPENSIFY_EXACT_STATE_URL at run time (default: SQLite under $DAGSTER_HOME).
    return dg.Definitions(resources={"connector": ConnectorResource(mappings_dir=config.source_dir),
                                     "io_manager": PerDayPickleIOManager()})

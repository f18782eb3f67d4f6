"""The resources every asset, sensor and job of the connector shares: `ConnectorResource` builds the plain-Python
config, state store, vault and API clients, and closes the clients it handed out; per-day pickle storage is the IO
manager."""

from __future__ import annotations

import os
from functools import lru_cache

import dagster as dg
from pydantic import PrivateAttr

from expensify_exact.api.exact.client import ExactClient
from expensify_exact.api.expensify.client import ExpensifyClient
from expensify_exact.clock import Clock
from expensify_exact.config import Connection, ProjectConfig, load_project_config
from expensify_exact.core import connections
from expensify_exact.core.connections import ReadOnlyRecords, build_exact_client, build_expensify_client
from expensify_exact.defs.io_manager import PerDayPickleIOManager
from expensify_exact.store import StateStore
from expensify_exact.store.vault import CredentialVault


@lru_cache(maxsize=8)
def _store(url: str | None) -> StateStore:
    return StateStore(url)


class ConnectorResource(dg.ConfigurableResource):
    """Where the mappings and the connector's state live; hands out clients per connection and owns their lifetime.

    Every client it hands out is closed when Dagster tears the resource down (after the step or the sensor tick), or
    by `close_clients`; code that is done with one earlier closes it with `with`.
    """

    mappings_dir: str = "mappings"
    state_url: str | None = None  # default: $EXPENSIFY_EXACT_STATE_URL, else SQLite under $DAGSTER_HOME
    _clients: list[ExactClient | ExpensifyClient] = PrivateAttr(default_factory=list)

    def project(self) -> ProjectConfig:
        """The mappings, parsed once per process while the files stay unchanged (`load_project_config`)."""
        return load_project_config(self.mappings_dir)

    def store(self) -> StateStore:
        return _store(self.state_url or os.environ.get("EXPENSIFY_EXACT_STATE_URL"))

    def clock(self) -> Clock:
        """The connector's one clock: every client the resource builds and every "today" reads it
        (`connections.SystemClock`; tests swap that)."""
        return connections.SystemClock()

    def vault(self) -> CredentialVault:
        return CredentialVault(self.store())

    def expensify_client(self, conn: Connection, *, read_only: bool = False) -> ExpensifyClient:
        """`read_only`: the client records nothing in the state DB (`connections.ReadOnlyRecords`)."""
        store = self.store()
        client = build_expensify_client(conn, self.vault(), self.clock(),
                                        store=ReadOnlyRecords(store) if read_only else store)
        self._clients.append(client)
        return client

    def exact_client(self, conn: Connection, *, read_only: bool = False) -> ExactClient:
        """`read_only`: it records nothing in the state DB but a rotated token (`connections.ReadOnlyRecords`)."""
        store = self.store()
        client = build_exact_client(conn, self.vault(), store, self.clock(),
                                    records=ReadOnlyRecords(store) if read_only else None)
        self._clients.append(client)
        return client

    def close_clients(self) -> None:
        """Close every client handed out so far (closing one that a `with` already closed is harmless)."""
        while self._clients:
            self._clients.pop().close()

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.close_clients()


def build(config: ProjectConfig) -> dg.Definitions:
    # The state URL is read from $EXPENSIFY_EXACT_STATE_URL at run time (default: SQLite under $DAGSTER_HOME).
    return dg.Definitions(resources={"connector": ConnectorResource(mappings_dir=config.source_dir),
                                     "io_manager": PerDayPickleIOManager()})

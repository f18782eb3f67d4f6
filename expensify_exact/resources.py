"""Dagster resources: they only build the plain-Python config, state store, vault and API clients."""

from __future__ import annotations

import os
from functools import lru_cache

import dagster as dg

from expensify_exact import connections
from expensify_exact.clock import Clock
from expensify_exact.config import Connection, ProjectConfig, load_project_config
from expensify_exact.connections import build_exact_client, build_expensify_client
from expensify_exact.exact.client import ExactClient
from expensify_exact.expensify.client import ExpensifyClient
from expensify_exact.state import StateStore
from expensify_exact.vault import CredentialVault


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

    def expensify_client(self, conn: Connection) -> ExpensifyClient:
        return build_expensify_client(conn, self.vault(), store=self.store())

    def exact_client(self, conn: Connection) -> ExactClient:
        return build_exact_client(conn, self.vault(), self.store())

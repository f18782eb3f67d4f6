"""Shared fixtures: a Fernet key per test session, state stores, the sandbox on 127.0.0.1, mappings pointed at it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

REPO = Path(__file__).resolve().parent.parent
MAPPINGS = REPO / "mappings"
POSTGRES_URL = os.environ.get("EXPENSIFY_EXACT_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


@pytest.fixture(autouse=True)
def _fernet_key(monkeypatch):
    """Every test gets its own key through the environment, never a key file in the home directory."""
    monkeypatch.setenv("EXPENSIFY_EXACT_KEY", Fernet.generate_key().decode())


@pytest.fixture(autouse=True)
def _demo_credentials_env(monkeypatch):
    """The sandbox's demo credentials where `expensify-exact secrets set --from-env` reads them, as `make demo` sets
    them from `expensify-exact-sandbox credentials` (the connector itself knows no sandbox)."""
    from expensify_exact_sandbox.cli import DEMO_CREDENTIALS_ENV

    for name, value in DEMO_CREDENTIALS_ENV.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def state_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'state.db'}"


@pytest.fixture
def store(state_url):
    from expensify_exact.store import StateStore

    store = StateStore(state_url)
    yield store
    store.dispose()


@pytest.fixture
def sandbox():
    from expensify_exact_sandbox.server import SandboxServer

    with SandboxServer() as server:
        # Real Expensify renders take seconds; the tests keep the quirk (a first poll finds nothing) but not the wait.
        server.expensify.set_knobs(render_delay_seconds=0.3)
        yield server


def write_mappings(target: Path, sandbox=None, **connection_overrides) -> Path:
    """A copy of the shipped mappings/, pointed at `sandbox`, with optional overrides of connection keys."""
    import yaml

    shutil.copytree(MAPPINGS, target)
    path = target / "connections.yaml"
    document = yaml.safe_load(path.read_text())
    conn = document["connections"][0]
    if sandbox is not None:
        conn["expensify"]["endpoint_url"] = sandbox.expensify_url
        conn["exact"]["base_url"] = sandbox.exact_url
    for dotted, value in connection_overrides.items():
        node = conn
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return target


def add_belgian_connection(mappings: Path, name: str, *, alert_webhook: bool = True, **expensify) -> None:
    """A second connection `name` after the Dutch one: the sandbox's Belgian division and a policy with no reports;
    `expensify` keys are set on every connection (e.g. a shared `credential`)."""
    import yaml

    from expensify_exact_sandbox import seed

    path = mappings / "connections.yaml"
    document = yaml.safe_load(path.read_text())
    belgian = yaml.safe_load(yaml.safe_dump(document["connections"][0]))
    belgian["name"] = name
    belgian["expensify"]["policy_ids"] = ["BE00000000000001"]
    belgian["exact"]["division"] = seed.SECOND_DIVISION
    if not alert_webhook:
        del belgian["notify"]["alerts"]["webhook_format"]
    document["connections"].append(belgian)
    for conn in document["connections"]:
        conn["expensify"].update(expensify)
    path.write_text(yaml.safe_dump(document, sort_keys=False))


@pytest.fixture
def sandbox_mappings(tmp_path, sandbox) -> Path:
    return write_mappings(tmp_path / "mappings", sandbox, expensify__poll_interval_seconds=0.2)


def _postgres_admin_connection():
    import psycopg2

    try:
        conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="test", connect_timeout=3)
    except psycopg2.OperationalError as exc:
        if os.environ.get("CI"):
            raise  # CI must test production mode for real (.ci/run starts the server)
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 is not reachable: {exc}")
    conn.autocommit = True
    return conn


@pytest.fixture
def pg_database():
    """A fresh PostgreSQL database for one test, dropped afterwards; yields its SQLAlchemy URL."""
    import uuid

    name = f"expensify_exact_{uuid.uuid4().hex[:12]}"
    admin = _postgres_admin_connection()
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()

"""Benchmarks of many customers in one deployment (issue 16): how long the code location takes to load for 1, 100
and 500 connections, and a morning of 500 connections × 20 reports against the sandbox simulating 500 divisions."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
MAPPINGS = REPO / "mappings"
BIN = Path(sys.executable).parent
CONNECTIONS_PER_CREDENTIAL = 50  # an integration partner's Expensify login serves many customers' policies


@dataclass(frozen=True)
class Customer:
    name: str
    division: int
    policy_id: str
    credential: str


def customers(n: int, division=lambda i: 200_000 + i, policy_id=lambda i: f"B{i:015X}",
              credential=lambda i: f"partner-{i // CONNECTIONS_PER_CREDENTIAL:02d}") -> list[Customer]:
    return [Customer(f"customer-{i:03d}", division(i), policy_id(i), credential(i)) for i in range(n)]


def write_mappings(target: Path, people: list[Customer], exact_url: str | None = None,
                   expensify_url: str | None = None) -> Path:
    """The demo's mappings with its one connection cloned for each customer: own division, policy and name."""
    shutil.copytree(MAPPINGS, target)
    path = target / "connections.yaml"
    template = yaml.safe_load(path.read_text())["connections"][0]
    connections = []
    for person in people:
        conn = yaml.safe_load(yaml.safe_dump(template))
        conn["name"] = person.name
        conn["expensify"]["policy_ids"] = [person.policy_id]
        conn["expensify"]["credential"] = person.credential
        conn["expensify"].pop("card_domain", None)
        conn["exact"]["division"] = person.division
        if exact_url:
            conn["exact"]["base_url"] = exact_url
        if expensify_url:
            conn["expensify"]["endpoint_url"] = expensify_url
        connections.append(conn)
    path.write_text(yaml.safe_dump({"connections": connections}, sort_keys=False))
    return target


def _definitions_load(mappings: Path, home: Path) -> float:
    """Wall seconds of `dagster definitions validate` on the code location, as an operator's deploy runs it."""
    env = {**os.environ, "EXPENSIFY_EXACT_MAPPINGS": str(mappings), "DAGSTER_HOME": str(home)}
    t0 = time.perf_counter()
    done = subprocess.run([str(BIN / "dagster"), "definitions", "validate", "-m", "expensify_exact.definitions"],
                          env=env, cwd=REPO, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"definitions validate failed: {done.stderr[-2000:]}")
    return wall


def bench_definitions(quick: bool, row) -> list:
    """Each size measured three times; the best counts (the first also warms the OS file cache)."""
    rows = []
    for n in (1, 100) if quick else (1, 100, 500):
        with tempfile.TemporaryDirectory() as tmp:
            mappings = write_mappings(Path(tmp) / "mappings", customers(n))
            (Path(tmp) / "home").mkdir()
            walls = sorted(_definitions_load(mappings, Path(tmp) / "home") for _ in range(3))
        rows.append(row("definitions", f"`dagster definitions validate`, {n} connection(s)", f"{walls[0]:.2f} s",
                        "≤ 5 s", walls[0] <= 5.0, f"runs: {', '.join(f'{w:.2f}' for w in walls)} s"))
    return rows


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fresh_postgres_database(name: str) -> str:
    """A new, empty PostgreSQL database on this machine's server (trust auth), for the connector's state."""
    import sqlalchemy as sa

    admin = sa.create_engine("postgresql+psycopg2://postgres@127.0.0.1:5432/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"


def _drop_postgres_database(name: str) -> None:
    import sqlalchemy as sa

    admin = sa.create_engine("postgresql+psycopg2://postgres@127.0.0.1:5432/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _store_secrets(plan: dict, mappings: Path, state_url: str, env: dict) -> None:
    """Each partner login once (`secrets set --credential`), each customer's Exact consent (`secrets set
    --connection` with its own refresh token), in one process: 500 CLI starts would take minutes by themselves."""
    from expensify_exact.cli.main import main
    from expensify_exact_sandbox.cli import DEMO_CREDENTIALS_ENV

    saved = dict(os.environ)
    os.environ.update(env)
    try:
        base = ["--mappings", str(mappings), "--state-url", state_url, "secrets", "set"]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            for partner in plan["partners"]:
                os.environ.update({"EXPENSIFY_PARTNER_USER_ID": partner["user_id"],
                                   "EXPENSIFY_PARTNER_USER_SECRET": partner["secret"]})
                if main([*base, "--credential", partner["name"], "--from-env"]) != 0:
                    raise RuntimeError(f"storing partner login {partner['name']} failed")
            os.environ.update({k: v for k, v in DEMO_CREDENTIALS_ENV.items() if k.startswith("EXACT_")})
            for conn in plan["connections"]:
                os.environ["EXACT_REFRESH_TOKEN"] = conn["exact_refresh_token"]
                if main([*base, "--connection", conn["name"], "--from-env"]) != 0:
                    raise RuntimeError(f"storing the Exact consent of {conn['name']} failed")
    finally:
        os.environ.clear()
        os.environ.update(saved)


def bench_morning(quick: bool, row) -> list:
    """A morning for 1, 100 and 500 customers (`--quick`: 1 and 50), 20 reports each."""
    return [r for n in ((1, 50) if quick else (1, 100, 500)) for r in _morning(n, 20, row)]


def _morning(n: int, reports: int, row) -> list:
    """One `expensify-exact run` over yesterday for every connection, against the sandbox simulating one Exact
    division per customer (60 calls a minute and 5,000 a day each) and a partner login per 50 customers (5 requests
    per 10 s each), in a process of its own; connector state on PostgreSQL, the embedded Dagster instance. Wall time
    and peak memory of the run's process; what the sandbox counted."""
    import httpx

    credentials = max(1, n // CONNECTIONS_PER_CREDENTIAL)
    day = (datetime.now(UTC) - timedelta(days=1)).date()
    exact_port, expensify_port = _free_port(), _free_port()
    scale = ["--connections", str(n), "--reports-per-policy", str(reports), "--credentials", str(credentials),
             "--day", day.isoformat()]
    plan = json.loads(subprocess.run([str(BIN / "expensify-exact-sandbox"), "scale-plan", *scale],
                                     capture_output=True, text=True, check=True).stdout)
    sandbox = subprocess.Popen([str(BIN / "expensify-exact-sandbox"), "serve", "--exact-port", str(exact_port),
                                "--expensify-port", str(expensify_port), *scale],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    exact_url, expensify_url = f"http://127.0.0.1:{exact_port}", f"http://127.0.0.1:{expensify_port}"
    try:
        _wait_until_up(exact_url + "/_sandbox/exact/stats")
        with tempfile.TemporaryDirectory() as tmp:
            people = [Customer(c["name"], c["division"], c["policy_id"], c["credential"])
                      for c in plan["connections"]]
            mappings = write_mappings(Path(tmp) / "mappings", people, exact_url,
                                      expensify_url + "/Integration-Server/ExpensifyIntegrations")
            state_url = _fresh_postgres_database(f"ee_bench_morning_{os.getpid()}_{n}")
            from cryptography.fernet import Fernet

            env = {**os.environ, "EXPENSIFY_EXACT_KEY": Fernet.generate_key().decode(),
                   "DAGSTER_HOME": str(Path(tmp) / "home")}
            _store_secrets(plan, mappings, state_url, env)
            (Path(tmp) / "home").mkdir()
            out_path, err_path = Path(tmp) / "run.out", Path(tmp) / "run.err"
            with out_path.open("w") as out_file, err_path.open("w") as err_file:
                t0 = time.perf_counter()
                process = subprocess.Popen([str(BIN / "expensify-exact"), "--mappings", str(mappings),
                                            "--state-url", state_url, "run", "--start", day.isoformat(), "--json"],
                                           env=env, cwd=REPO, stdout=out_file, stderr=err_file)
                _, status, usage = os.wait4(process.pid, 0)
                wall = time.perf_counter() - t0
            code = os.waitstatus_to_exitcode(status)
            peak_mb = usage.ru_maxrss / 1024
            sandbox_mb = _peak_rss_mb(sandbox.pid)
            exact = httpx.get(exact_url + "/_sandbox/exact/stats").json()
            expensify = httpx.get(expensify_url + "/_sandbox/expensify/stats").json()
            out, err = out_path.read_text(), err_path.read_text()
    finally:
        os.killpg(sandbox.pid, signal.SIGTERM)
        sandbox.wait(timeout=30)
        _drop_postgres_database(f"ee_bench_morning_{os.getpid()}_{n}")
    return _morning_rows(row, n, reports, credentials, code, out, err, wall, peak_mb, sandbox_mb, exact,
                         expensify)


def _wait_until_up(url: str, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url, timeout=2).raise_for_status()
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _peak_rss_mb(pid: int) -> float:
    """A live process's peak resident memory (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _morning_rows(row, n: int, reports: int, credentials: int, code: int, out: str, err: str, wall: float,
                  peak_mb: float, sandbox_mb: float, exact: dict, expensify: dict) -> list:
    summary = json.loads(out) if out.strip().startswith("{") else {}
    connections = summary.get("connections", {})
    posted = sum(len(c.get("posted", {})) for c in connections.values())
    quarantined = sum(len(c.get("quarantined", {})) for c in connections.values())
    deferred = sum(len(c.get("deferred", [])) for c in connections.values())
    busiest = max((int(v) for v in exact.get("max_calls_per_minute", {}).values()), default=0)
    divisions_used = len(exact.get("posts_by_division", {}))
    exact_429 = sum(int(v) for v in exact.get("rate_limited", {}).values())
    expensify_429 = int(expensify.get("rate_limited", 0))
    jobs = [n for by_day in expensify.get("export_jobs_by_credential", {}).values() for n in by_day.values()]
    failure = "" if code == 0 else f"; exit {code}: {summary.get('failure') or err.strip()[-400:]}"
    label = f"{n} connection(s) × {reports} reports"
    return [
        row("morning", f"{label}: wall time of `expensify-exact run`", f"{wall / 60:.1f} min",
            "≤ 15 min" if n >= 500 else "", (code == 0 and wall <= 15 * 60) if n >= 500 else code == 0,
            f"posted {posted} of {n * reports}, quarantined {quarantined}, deferred {deferred}; {divisions_used} "
            f"divisions posted to{failure}"),
        row("morning", f"{label}: peak memory", f"{(peak_mb + sandbox_mb) / 1024:.2f} GB", "≤ 4 GB",
            peak_mb + sandbox_mb <= 4096,
            f"connector run {peak_mb:.0f} MB + sandbox {sandbox_mb:.0f} MB (peak resident sets)"),
        row("morning", f"{label}: Expensify export jobs per credential and day", str(max(jobs, default=0)), "1",
            bool(jobs) and max(jobs) == 1, f"{credentials} partner logins shared by {n} connections; "
                                           f"{len(jobs)} (login, day) pairs"),
        row("morning", f"{label}: 429s (Exact, Expensify)", f"{exact_429}, {expensify_429}", "0, 0",
            exact_429 == 0 and expensify_429 == 0,
            f"busiest division minute: {busiest} calls (Exact allows 60)"),
        row("morning", f"{label}: most calls in one clock minute on one division", str(busiest), "≤ 60",
            busiest <= 60, ""),
    ]

"""Benchmarks of many customers in one deployment (issue 16): how long the code location takes to load for 1, 100
and 500 connections, and a morning of 500 connections × 20 reports against the sandbox simulating 500 divisions."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
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
                          env=env, cwd=REPO, capture_output=True, text=True)
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

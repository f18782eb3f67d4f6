"""What the `expensify-exact` commands share: exit codes, declaring a command and printing its result, the connector
and connections named on the command line, the embedded Dagster home, common options, waiting until stopped."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import signal
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from expensify_exact.config import Connection, ProjectConfig
    from expensify_exact.defs.resources import ConnectorResource

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CONFIG = 0, 1, 2, 3

# SQLite storage (Dagster's default) and no telemetry from a ledger connector. No pools: the clients' shared
# rate-limit board keeps each division inside its limits (README, "Many customers").
EMBEDDED_INSTANCE_CONFIG = """\
telemetry:
  enabled: false
"""


def add_command(subparsers: argparse._SubParsersAction, name: str, func: Callable[[argparse.Namespace], int], *,
                help: str) -> argparse.ArgumentParser:
    """Declare the subcommand `name`, run by `func`, whose `--help` is `func`'s docstring: the first paragraph as the
    description, the rest as the epilog, so what a command does is written once, beside its code."""
    description, _, epilog = inspect.getdoc(func).partition("\n\n")
    parser = subparsers.add_parser(name, help=help, description=description, epilog=epilog or None)
    parser.set_defaults(func=func)
    return parser


def connector_from_args(args: argparse.Namespace) -> ConnectorResource:
    """The ConnectorResource of `--mappings` and `--state-url`."""
    from expensify_exact.defs.resources import ConnectorResource

    return ConnectorResource(mappings_dir=args.mappings, state_url=args.state_url)


def open_connections(args: argparse.Namespace) -> tuple[ConnectorResource, ProjectConfig, list[Connection]]:
    """The connector, its loaded config and the connection `--connection` names (every configured one without it).

    Raises:
        ConfigError: the mappings are invalid, or no connection has that name.
    """
    connector = connector_from_args(args)
    project = connector.project()
    return connector, project, [project.connection(args.connection)] if args.connection else list(project.connections)


def describe_connection(conn: Connection) -> str:
    """The line a command prints before it talks to a connection's services."""
    return f"Exact division {conn.exact.division}, Expensify policies {', '.join(conn.expensify.policy_ids)}"


def print_outcome(args: argparse.Namespace, payload: dict, lines: Iterable[str], *, failed: bool) -> int:
    """A command's result: one JSON object with `--json`, else its lines; exit 1 when it `failed`, else 0."""
    print(json.dumps(payload, indent=2, default=str) if args.json else "\n".join(lines))
    return EXIT_FAILED if failed else EXIT_OK


# --- the embedded Dagster instance ------------------------------------------------------------------

def dagster_home_path() -> Path:
    """$DAGSTER_HOME, else `.dagster_home` in the current folder."""
    return Path(os.environ.get("DAGSTER_HOME") or Path.cwd() / ".dagster_home").resolve()


def ensure_dagster_home() -> Path:
    """The embedded default: a SQLite Dagster instance inside the project unless DAGSTER_HOME says otherwise."""
    from expensify_exact.defs.recovery import home_lock

    home = dagster_home_path()
    home.mkdir(parents=True, exist_ok=True)
    instance_config = home / "dagster.yaml"
    with home_lock(home):  # a second command started at once must not read a half-written file
        if not instance_config.exists():
            instance_config.write_text(EMBEDDED_INSTANCE_CONFIG, encoding="utf-8")
    os.environ["DAGSTER_HOME"] = str(home)
    return home


# --- options and serving ----------------------------------------------------------------------------

def add_wait_timeout(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait-timeout", type=float, default=None, metavar="SECONDS",
                        help="how long to wait while another live run holds a pool this command needs, then give up "
                             "with exit 1 (default: 900, i.e. 15 minutes; recovery.DEFAULT_WAIT_TIMEOUT_SECONDS)")


def wait_until_stopped() -> None:
    """Block a serving command until Ctrl-C or SIGTERM (how `make demo` and service managers stop it)."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass

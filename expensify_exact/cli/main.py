"""`expensify-exact`: what the Dagster UI cannot do — secrets, Exact authorization and headless runs."""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import warnings

from expensify_exact.cli import commands
from expensify_exact.cli.support import EXIT_CONFIG, EXIT_FAILED
from expensify_exact.errors import ConfigError, ConnectorError

# The core commands, listed first by `--help` as they always were; every other module in commands/ follows by name.
CORE_COMMANDS = ("secrets", "authorize", "run")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expensify-exact", description=__doc__.split("\n")[0].split(": ", 1)[1])
    parser.add_argument("--mappings", default=os.environ.get("EXPENSIFY_EXACT_MAPPINGS", "mappings"),
                        help="the mappings folder (default: ./mappings or $EXPENSIFY_EXACT_MAPPINGS)")
    parser.add_argument("--state-url", default=None,
                        help="SQLAlchemy URL of the connector's state DB (default: $EXPENSIFY_EXACT_STATE_URL, "
                             "else SQLite under $DAGSTER_HOME)")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in _command_modules():
        module.register(sub)
    return parser


def _command_modules():
    names = sorted(info.name for info in pkgutil.iter_modules(commands.__path__))
    ordered = [*CORE_COMMANDS, *(name for name in names if name not in CORE_COMMANDS)]
    return [importlib.import_module(f"{commands.__name__}.{name}") for name in ordered]


def main(argv: list[str] | None = None) -> int:
    # Library notices about Dagster's beta parameters and pandas' future dtype rules are for developers;
    # they do not belong on an operator's terminal.
    warnings.filterwarnings("ignore", message=r"Parameter `\w+` of .* is currently in beta")
    warnings.filterwarnings("ignore", category=FutureWarning, message="The behavior of DataFrame concatenation")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConnectorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())

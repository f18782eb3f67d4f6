"""`expensify-exact run --start DAY [--end DAY]`: a headless run of the Dagster assets over approval days, on the
embedded Dagster instance; prints a summary (or one JSON object) and exits 1 if the run failed."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date

from expensify_exact.cli.support import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    add_wait_timeout,
    connector_from_args,
    ensure_dagster_home,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="run one day or a date range through the Dagster assets")
    p.add_argument("--start", required=True, help="first approval day, YYYY-MM-DD")
    p.add_argument("--end", help="last approval day, YYYY-MM-DD (default: --start)")
    p.add_argument("--connection", help="only this connection (default: every configured connection)")
    p.add_argument("--dry-run", action="store_true",
                   help="show every draft line and what a run would do with each report; post and store nothing")
    p.add_argument("--json", action="store_true", help="print one JSON summary object")
    add_wait_timeout(p)
    p.set_defaults(func=cmd_run)


def cmd_run(args) -> int:
    from expensify_exact.cli.progress_view import showing_progress
    from expensify_exact.defs.recovery import open_embedded, tell
    from expensify_exact.defs.runs import preview_range, run_range

    home = ensure_dagster_home()
    start = date.fromisoformat(args.start)
    end = date.fromisoformat(args.end) if args.end else start
    if end < start:
        print("--end is before --start", file=sys.stderr)
        return EXIT_USAGE
    connector = connector_from_args(args)
    instance, _ = open_embedded(home, connector.store, tell)
    connections = [connector.project().connection(args.connection)] if args.connection \
        else connector.project().connections
    days = ((end - start).days + 1) * len(connections)
    launch = preview_range if args.dry_run else run_range  # a dry run settles no days: no day count to show
    with showing_progress(json_output=args.json, total_days=None if args.dry_run else days):
        summary = launch(start, end, mappings_dir=args.mappings, state_url=args.state_url, instance=instance,
                         wait_timeout=args.wait_timeout, connection=args.connection)
    if args.json:
        print(json.dumps(summary.as_json(), indent=2, sort_keys=True))
    else:
        print(summary.as_text())
    return EXIT_OK if summary.success else EXIT_FAILED

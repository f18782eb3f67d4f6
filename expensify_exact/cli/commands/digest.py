"""`expensify-exact digest`: print the accountants' digest of one approval day, as Markdown or e-mail HTML, and
with `--send` mail it (once per connection and day; `--resend` again).

Prints the digest the `reconcile_and_digest` job wrote (with its reconciliation findings); for a day that job has
not run yet, builds one from the state database alone (posted ledger, quarantine, token ages) and says so.
"""

from __future__ import annotations

import argparse
import sys
from datetime import date

from expensify_exact.cli.support import (
    EXIT_OK,
    EXIT_USAGE,
    ensure_dagster_home,
    open_connections,
)
from expensify_exact.store import QuarantineStatus


def register(subparsers) -> None:
    p = subparsers.add_parser("digest", help="print the daily digest of one approval day (Markdown or HTML)")
    p.add_argument("--date", required=True, help="the approval day, YYYY-MM-DD")
    p.add_argument("--connection", help="one connection (default: every configured connection)")
    p.add_argument("--format", choices=("md", "html"), default="md", help="md (default) or html for e-mail")
    p.add_argument("--rebuild", action="store_true",
                   help="build it from the state database now instead of printing the stored one")
    p.add_argument("--send", action="store_true",
                   help="also mail it to the connection's notify.digest.to (once per connection and day)")
    p.add_argument("--resend", action="store_true", help="mail it even if that day's digest was mailed before")
    p.set_defaults(func=cmd_digest)


def cmd_digest(args: argparse.Namespace) -> int:
    from expensify_exact.core.digest import build_digest, digest_dir, read_digest

    try:
        day = date.fromisoformat(args.date).isoformat()
    except ValueError:
        print(f"--date must look like 2026-11-03, got {args.date!r}", file=sys.stderr)
        return EXIT_USAGE
    ensure_dagster_home()
    connector, _, connections = open_connections(args)
    store = connector.store()
    rendered = []
    for conn in connections:
        digest = None if args.rebuild else read_digest(conn.name, day, digest_dir())
        if digest is None:
            digest = build_digest(connection=conn.name, day=day, ledger=store.ledger_rows(conn.name),
                                  quarantine=store.quarantine_items(conn.name, status=QuarantineStatus.OPEN),
                                  token_ages=store.token_ages(), currency=conn.exact.division_currency,
                                  now=connector.clock().now())
        rendered.append(digest.render(args.format))
        if args.send or args.resend:
            from expensify_exact.notify.mail import mail_digest

            outcome = mail_digest(digest, conn, store, connector.vault(), resend=args.resend)
            print(f"{conn.name} {day}: digest {outcome}", file=sys.stderr)
    sys.stdout.write(("\n" if args.format == "md" else "").join(rendered))
    return EXIT_OK

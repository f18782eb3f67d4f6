"""`expensify-exact audit export`: the append-only audit log as CSV, one row per event, oldest first.

Columns: id, at (UTC, ISO 8601), connection, event, report_id, transaction_ids (space-separated), entry_id,
entry_number, run_id, partition_date, detail (JSON). Exit codes: 0 written; 2 usage (a bad --since).
"""

from __future__ import annotations

import csv
import json
import sys
from datetime import date, datetime, timezone

from expensify_exact.cli.support import EXIT_OK, EXIT_USAGE, connector_from_args

CSV_COLUMNS = ("id", "at", "connection", "event", "report_id", "transaction_ids", "entry_id", "entry_number",
               "run_id", "partition_date", "detail")


def register(subparsers) -> None:
    audit = subparsers.add_parser("audit", help="the append-only audit log of every posting decision",
                                  description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    sub = audit.add_subparsers(dest="audit_command", required=True)
    p = sub.add_parser("export", help="write the audit log as CSV",
                       description="Write the audit log (quarantined, replayed, posted, resolved, approved, …) as "
                                   "CSV. " + __doc__.split("\n\n")[1])
    p.add_argument("--csv", required=True, metavar="FILE", help="where to write (- for standard output)")
    p.add_argument("--connection", help="only this connection's events")
    p.add_argument("--since", metavar="YYYY-MM-DD", help="only events on or after this day (UTC)")
    p.set_defaults(func=cmd_export)


def audit_csv_rows(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        tids = json.loads(r["transaction_ids"]) if r["transaction_ids"] else []
        out.append({"id": r["id"], "at": r["at"].isoformat(), "connection": r["connection"] or "",
                    "event": r["event"], "report_id": r["report_id"] or "", "transaction_ids": " ".join(tids),
                    "entry_id": r["entry_id"] or "", "entry_number": "" if r["entry_number"] is None
                    else r["entry_number"], "run_id": r["run_id"] or "", "partition_date": r["partition_date"] or "",
                    "detail": r["detail"] or ""})
    return out


def cmd_export(args) -> int:
    since = None
    if args.since:
        try:
            since = datetime.combine(date.fromisoformat(args.since), datetime.min.time(), timezone.utc)
        except ValueError:
            print(f"--since must be YYYY-MM-DD, not {args.since!r}", file=sys.stderr)
            return EXIT_USAGE
    rows = audit_csv_rows(connector_from_args(args).store().audit_rows(connection=args.connection, since=since))
    if args.csv == "-":
        _write(sys.stdout, rows)
    else:
        with open(args.csv, "w", newline="", encoding="utf-8") as handle:
            _write(handle, rows)
        print(f"wrote {len(rows)} audit event(s) to {args.csv}")
    return EXIT_OK


def _write(handle, rows: list[dict]) -> None:
    writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)

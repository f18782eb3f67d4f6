"""`expensify-exact quarantine`: list, show, replay, resolve, ignore and approve held-back reports.

Exit codes: 0 done; 1 failed (an API or state error, Exact refused an approved entry, or a replay gave up waiting
for another replay of its connection); 2 usage; 3 config; 4 no such quarantine item (for replay: a `--report` no
configured connection has in its quarantine; the others are still replayed), or it is not in a state the action applies
to; 5 replay ran but reports stay quarantined.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys

from expensify_exact.cli.support import EXIT_FAILED, EXIT_OK, EXIT_USAGE, connector_from_args, open_connections
from expensify_exact.core.posting import Outcome
from expensify_exact.errors import LockBusy
from expensify_exact.store import IntentKind, QuarantineStatus

EXIT_NO_ITEM = 4
EXIT_STILL_QUARANTINED = 5
STATUSES = ("open", "resolved", "ignored", "replayed", "all")


def register(subparsers) -> None:
    quarantine = subparsers.add_parser(
        "quarantine", help="list, replay, resolve, ignore or approve quarantined reports",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1] + "\n\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = quarantine.add_subparsers(dest="quarantine_command", required=True)

    p = sub.add_parser("list", help="the quarantine, one line per report (default: open items)")
    p.add_argument("--connection", help="only this connection")
    p.add_argument("--status", choices=STATUSES, default="open", help="which items (default: open)")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="one report: every reason with what to do about it, the ledger, the audit trail")
    p.add_argument("report_id", metavar="REPORT_ID")
    p.add_argument("--connection", help="needed only if the report is quarantined in several connections")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser(
        "replay", help="re-validate open items against a fresh Exact snapshot and post those that pass, once",
        description="Re-exports the quarantined reports from Expensify by report ID, validates them against a "
                    "fresh snapshot of Exact's dimensions and the current mappings, and posts those that pass "
                    "through the exactly-once ledger. The rest stay quarantined with refreshed reasons. "
                    "CHANGED_AFTER_POSTING items are left for `approve`. It may run while a run posts: the "
                    "per-report locks and the ledger keep every report exactly once; two replays of one "
                    "connection take turns. Exit 0 when nothing stays quarantined, 5 when some do, 1 when a "
                    "connection was not replayed.")
    p.add_argument("--connection", help="only this connection (default: all)")
    p.add_argument("--report", dest="reports", action="append", metavar="REPORT_ID",
                   help="only this report (repeatable; default: every open item)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate and show what a replay would do with each item; write nothing anywhere")
    p.add_argument("--json", action="store_true", help="print one JSON object per connection")
    p.add_argument("--wait-timeout", type=float, default=None, metavar="SECONDS",
                   help="how long to wait while another replay or approve of the same connection is under way "
                        "(it holds the connection's replay lock); then that connection is not replayed and the "
                        "exit code is 1 (default: 600, i.e. 10 minutes; replay.REPLAY_LOCK_WAIT_SECONDS)")
    p.set_defaults(func=cmd_replay)

    for status, verb, meaning in ((QuarantineStatus.RESOLVED, "resolve", "the cause was dealt with outside the "
                                   "connector, e.g. booked by hand; a later failure of the report reopens it"),
                                  (QuarantineStatus.IGNORED, "ignore", "never ask about this report again (a test "
                                   "report, a duplicate); it stays ignored across reruns")):
        p = sub.add_parser(verb, help=f"close an open item as {status}: {meaning}",
                           description=f"Close an open quarantine item as {status}: {meaning}. The reason goes into "
                                       f"the audit log.")
        p.add_argument("report_id", metavar="REPORT_ID")
        p.add_argument("--reason", required=True, help="why (recorded in the audit log)")
        p.add_argument("--connection", help="needed only if the report is quarantined in several connections")
        p.set_defaults(func=cmd_close, status=status)

    p = sub.add_parser(
        "approve", help="CHANGED_AFTER_POSTING: post the reversal of the posted entry and the corrected entry, once",
        description="For a report that changed after it was posted: posts the reversal of the posted entry "
                    "(amounts negated, Reversal=true) and the corrected entry shown by `quarantine show`, each "
                    "exactly once, then points the ledger at the corrected entry. Safe to run again after a "
                    "failure: it asks Exact for each entry before posting it.")
    p.add_argument("report_id", metavar="REPORT_ID")
    p.add_argument("--connection", help="needed only if the report is quarantined in several connections")
    p.set_defaults(func=cmd_approve)


# --------------------------------------------------------------------------------------------------- helpers

def _actor() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers; the audit log then says so
        return "unknown"


def _find(store, report_id: str, connection: str | None):
    """The one quarantine item of REPORT_ID, or an exit code with the message printed."""
    items = store.quarantine_items(connection, status=None, report_ids=[report_id])
    if not items:
        where = f" in {connection}" if connection else ""
        print(f"no quarantine item for report {report_id}{where}", file=sys.stderr)
        return None, EXIT_NO_ITEM
    if len(items) > 1:
        print(f"report {report_id} is quarantined in {', '.join(i.connection for i in items)}: pass --connection",
              file=sys.stderr)
        return None, EXIT_USAGE
    return items[0], EXIT_OK


def _item_json(item) -> dict:
    from expensify_exact.core.replay import pending_correction

    out = {"connection": item.connection, "report_id": item.report_id, "status": item.status,
           "partition_date": item.partition_date, "reason_codes": sorted({r.get("code") for r in item.reasons}),
           "reasons": item.reasons,
           "transaction_ids": item.transaction_ids, "first_seen_at": item.first_seen_at.isoformat(),
           "updated_at": item.updated_at.isoformat(), "note": item.resolution_note}
    correction = pending_correction(item)
    if correction:
        out["correction"] = correction
    return out


# -------------------------------------------------------------------------------------------------- commands

def cmd_list(args) -> int:
    store = connector_from_args(args).store()
    items = store.quarantine_items(args.connection, status=None if args.status == "all" else args.status)
    if args.json:
        print(json.dumps([_item_json(i) for i in items], indent=2, sort_keys=True))
        return EXIT_OK
    if not items:
        print(f"no {'' if args.status == 'all' else args.status + ' '}quarantine items"
              + (f" in {args.connection}" if args.connection else ""))
        return EXIT_OK
    print(f"{'connection':<20} {'report':<14} {'day':<10} {'status':<9} reasons")
    for i in items:
        codes = ", ".join(sorted({r.get("code", "?") for r in i.reasons}))
        print(f"{i.connection:<20} {i.report_id:<14} {i.partition_date or '-':<10} {i.status:<9} {codes}"
              + (f"  ({i.resolution_note})" if i.resolution_note else ""))
    print(f"{len(items)} item(s)")
    return EXIT_OK


def cmd_show(args) -> int:
    from expensify_exact.core.journal import REASON_FIXES, Reason

    store = connector_from_args(args).store()
    item, code = _find(store, args.report_id, args.connection)
    if item is None:
        return code
    ledger = store.ledger_get(item.connection, item.report_id)
    audit = store.audit_rows(connection=item.connection, report_id=item.report_id)
    corrections = [i for i in store.intents_for(item.connection, item.report_id) if i.kind != IntentKind.POST]
    if args.json:
        print(json.dumps(_item_json(item) | {
            "ledger": None if ledger is None else {"status": ledger.status, "entry_id": ledger.entry_id,
                                                   "entry_number": ledger.entry_number,
                                                   "total_cents": ledger.total_cents},
            "corrections": [{"kind": c.kind, "entry_id": c.entry_id, "status": c.status,
                             "entry_number": c.entry_number} for c in corrections],
            "audit": [{"at": r["at"].isoformat(), "event": r["event"], "entry_number": r["entry_number"],
                       "detail": json.loads(r["detail"]) if r["detail"] else None} for r in audit],
        }, indent=2, sort_keys=True, default=str))
        return EXIT_OK
    print(f"report {item.report_id} ({item.connection}), approval day {item.partition_date}: {item.status}"
          + (f" — {item.resolution_note}" if item.resolution_note else ""))
    print(f"transactions: {', '.join(item.transaction_ids) or '-'}")
    print("reasons:")
    for r in item.reasons:
        where = " ".join(x for x in (r.get("transaction_id") and f"transaction {r['transaction_id']}",
                                     r.get("dimension") and f"{r['dimension']}={r.get('value', '')!r}") if x)
        print(f"  {r.get('code')}: {r.get('message', '')}" + (f" [{where}]" if where else ""))
        try:
            print(f"    fix: {REASON_FIXES[Reason(r.get('code'))]}")
        except (KeyError, ValueError):
            pass
    from expensify_exact.core.replay import pending_correction

    correction = pending_correction(item)
    if correction:
        body = correction["corrected_entry"]
        print(f"drafted correction: reverse entry {correction['reverse_entry_id']}, then post:")
        for line in body["GeneralJournalEntryLines"]:
            print(f"    {line['AmountFC']:>10.2f} {body['Currency']}  {line.get('CostCenter', ''):<5} "
                  f"{line.get('CostUnit', ''):<6} {line['Description']}")
        print(f"  approve with: expensify-exact quarantine approve {item.report_id}")
    if ledger is not None:
        print(f"ledger: {ledger.status} as entry {ledger.entry_number} ({ledger.entry_id}), "
              f"{ledger.total_cents / 100:.2f}")
    for c in corrections:
        print(f"  {c.kind}: {c.status} as entry {c.entry_number} ({c.entry_id})")
    print("audit trail:")
    for r in audit:
        number = f" entry {r['entry_number']}" if r["entry_number"] else ""
        print(f"  {r['at']:%Y-%m-%d %H:%M:%S} {r['event']}{number}")
    return EXIT_OK


def cmd_replay(args) -> int:
    from expensify_exact.cli.progress_view import showing_progress
    from expensify_exact.core.replay import REPLAY_LOCK_WAIT_SECONDS, preview_replay, replay_lock, replay_quarantine

    connector, project, connections = open_connections(args)
    timeout = REPLAY_LOCK_WAIT_SECONDS if args.wait_timeout is None else args.wait_timeout
    store = connector.store()
    unknown = 0
    if args.reports:
        items = store.quarantine_items(args.connection, status=None, report_ids=args.reports)
        unknown = _say_which_reports_no_connection_holds(args.reports, items, {c.name for c in connections})
        holding = {i.connection for i in items}
        connections = [c for c in connections if c.name in holding]
    remaining, not_replayed = 0, 0
    for conn in connections:
        holder = None if args.dry_run else store.lock_holder(replay_lock(conn.name))
        if holder:
            print(f"waiting for the replay lock of {conn.name}: {_describe_holder(holder)} holds it (another "
                  f"`quarantine replay` or `approve`, or a replay_quarantine run); giving up after "
                  f"{timeout:.0f} s (--wait-timeout)", file=sys.stderr, flush=True)
        try:
            with (connector.expensify_client(conn, read_only=args.dry_run) as expensify,
                  connector.exact_client(conn, read_only=args.dry_run) as exact,
                  showing_progress(json_output=args.json)):
                if args.dry_run:  # takes no lock: it changes nothing
                    result = preview_replay(conn, project, store=store, expensify=expensify, exact=exact,
                                            clock=connector.clock(), report_ids=args.reports)
                else:
                    result = replay_quarantine(conn, project, store=store, expensify=expensify, exact=exact,
                                               clock=connector.clock(), report_ids=args.reports,
                                               lock_wait_seconds=timeout)
        except LockBusy:
            not_replayed += 1
            print(f"{conn.name}: not replayed: another replay or approve of it held the replay lock for more than "
                  f"{timeout:.0f} s (--wait-timeout); nothing of it changed, run again once that one is "
                  f"done", file=sys.stderr, flush=True)
            continue
        remaining += len(result.still_quarantined)
        if args.json:
            print(json.dumps(result.as_json(), indent=2, sort_keys=True, default=str))
            continue
        print(f"{conn.name}: {len(result.outcomes)} item(s) replayed"
              + (" (dry run: nothing posted, changed or recorded)" if args.dry_run else ""))
        for o in result.outcomes:
            if o.outcome in (Outcome.POSTED, Outcome.ALREADY_POSTED):
                what = f"-> entry {o.entry_number}"
            elif o.outcome == Outcome.WOULD_POST:
                what = o.message
            elif o.outcome == Outcome.QUARANTINED:
                what = "still fails: " + "; ".join(f"{r.get('code')}: {r.get('message')}" for r in o.reasons)
            else:
                what = o.message
            print(f"  {o.outcome:<14} {o.report_id} {what}")
        if result.stopped_reason:
            print(f"  {result.stopped_reason}")
    if not_replayed:
        return EXIT_FAILED
    if unknown:
        return EXIT_NO_ITEM
    if args.dry_run:
        return EXIT_OK
    return EXIT_STILL_QUARANTINED if remaining else EXIT_OK


def _say_which_reports_no_connection_holds(report_ids: list[str], items, configured: set[str]) -> int:
    """Print why each asked-for report that no configured connection has in its quarantine cannot be replayed; the
    number of such reports."""
    unknown = 0
    for report_id in dict.fromkeys(report_ids):
        holders = sorted({i.connection for i in items if i.report_id == report_id})
        if any(h in configured for h in holders):
            continue
        unknown += 1
        if not holders:
            where = f" in {next(iter(configured))}" if len(configured) == 1 else ""
            print(f"no quarantine item for report {report_id}{where}: nothing to replay", file=sys.stderr)
            continue
        print(f"report {report_id} is quarantined in {', '.join(holders)}, which the mappings no longer configure: "
              f"add the connection back to replay it, or close it with `expensify-exact quarantine resolve "
              f"{report_id} --connection {holders[0]} --reason ...`", file=sys.stderr)
    return unknown


def _describe_holder(owner: str) -> str:
    """A lock owner ("host:pid:nonce") as the operator looks for it."""
    host, _, rest = owner.partition(":")
    return f"pid {rest.partition(':')[0]} on {host}"


def cmd_close(args) -> int:
    from expensify_exact.core.replay import QuarantineActionError, close_item

    store = connector_from_args(args).store()
    item, code = _find(store, args.report_id, args.connection)
    if item is None:
        return code
    try:
        close_item(store, item.connection, item.report_id, args.status, args.reason, actor=_actor())
    except QuarantineActionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NO_ITEM
    print(f"report {item.report_id} ({item.connection}) {args.status}: {args.reason}")
    return EXIT_OK


def cmd_approve(args) -> int:
    from expensify_exact.core.replay import QuarantineActionError, approve_correction, pending_correction

    connector = connector_from_args(args)
    store = connector.store()
    item, code = _find(store, args.report_id, args.connection)
    if item is None:
        return code
    if item.status != QuarantineStatus.OPEN or pending_correction(item) is None:
        print(f"error: report {item.report_id} is {item.status} with "
              f"{', '.join(sorted({r.get('code') for r in item.reasons}))}; only an open CHANGED_AFTER_POSTING "
              f"item can be approved", file=sys.stderr)
        return EXIT_NO_ITEM
    conn = connector.project().connection(item.connection)
    try:
        with connector.exact_client(conn) as exact:
            result = approve_correction(conn, store=store, exact=exact, report_id=item.report_id, actor=_actor())
    except QuarantineActionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"report {item.report_id} ({item.connection}): entry reversed by entry {result.reversal_entry_number}, "
          f"corrected by entry {result.correction_entry_number}")
    return EXIT_OK

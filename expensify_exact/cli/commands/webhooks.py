"""`expensify-exact webhooks serve|list`: receive Exact Online's webhook notifications and show what they recorded."""

from __future__ import annotations

import sys

from expensify_exact.cli.support import EXIT_CONFIG, EXIT_OK, connector_from_args, wait_until_stopped


def register(subparsers) -> None:
    webhooks = subparsers.add_parser(
        "webhooks", help="receive Exact Online webhooks (changed dimensions, deleted entries)").add_subparsers(
        dest="webhooks_command", required=True)
    p = webhooks.add_parser("serve", help="verify and record Exact's webhook notifications (POST to any path)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1; put a TLS proxy in front: Exact calls HTTPS only)")
    p.set_defaults(func=cmd_serve)
    p = webhooks.add_parser("list", help="the latest webhook events in the audit log")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=cmd_list)


def cmd_serve(args) -> int:
    from expensify_exact.core.webhooks import (
        EXACT_WEBHOOK_SECRET,
        WebhookProcessor,
        WebhookServer,
        vault_secrets,
        webhook_app,
    )

    connector = connector_from_args(args)
    config = connector.project()
    vault = connector.vault()
    missing = [c.name for c in config.connections if not vault.has(c.name, EXACT_WEBHOOK_SECRET)]
    if len(missing) == len(config.connections):
        print(f"no connection has an {EXACT_WEBHOOK_SECRET} yet: every notification would be refused. Store the "
              f"Exact app's webhook secret with `echo \"$SECRET\" | expensify-exact secrets set --connection NAME "
              f"--stdin {EXACT_WEBHOOK_SECRET}`", file=sys.stderr)
        return EXIT_CONFIG
    for name in missing:
        print(f"warning: {name} has no {EXACT_WEBHOOK_SECRET}; its notifications will be refused", file=sys.stderr)
    processor = WebhookProcessor(config, connector.store(), vault_secrets(connector))
    server = WebhookServer(webhook_app(processor), host=args.host, port=args.port).start()
    divisions = ", ".join(f"{c.name} (division {c.exact.division})" for c in config.connections if c.name not in missing)
    print(f"listening on {server.url} for {divisions}; Ctrl-C stops", flush=True)
    wait_until_stopped()
    server.stop()
    return EXIT_OK


def cmd_list(args) -> int:
    from expensify_exact.core.webhooks import latest_webhook_events

    store = connector_from_args(args).store()
    events = latest_webhook_events(store, args.limit)
    if not events:
        print("no webhook events recorded")
    for e in events:
        d = e["detail"]
        what = f"{d.get('topic', '?')} {d.get('action', '')} {d.get('key', '')}".strip()
        extra = f" report {e['report_id']} entry {e['entry_number']}" if e.get("report_id") else ""
        print(f"{e['at']:%Y-%m-%d %H:%M:%S} {e['connection'] or '-':<20} {e['event']:<30} {what}{extra}")
    return EXIT_OK

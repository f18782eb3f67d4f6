"""`expensify-exact secrets init-key|set|list|rotate-key`: credentials stored encrypted in the state database, and
the key that encrypts them."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from expensify_exact.cli.support import EXIT_OK, EXIT_USAGE, connector_from_args

# Environment variables `secrets set --from-env` reads, per secret.
SECRET_ENV = {
    "expensify_partner_user_id": "EXPENSIFY_PARTNER_USER_ID",
    "expensify_partner_user_secret": "EXPENSIFY_PARTNER_USER_SECRET",
    "exact_client_id": "EXACT_CLIENT_ID",
    "exact_client_secret": "EXACT_CLIENT_SECRET",
    "exact_webhook_secret": "EXACT_WEBHOOK_SECRET",
}
REFRESH_TOKEN_ENV = "EXACT_REFRESH_TOKEN"


def register(subparsers: argparse._SubParsersAction) -> None:
    secrets = subparsers.add_parser("secrets", help="store credentials encrypted; rotate the key").add_subparsers(
        dest="secrets_command", required=True)
    p = secrets.add_parser("init-key", help="create a new key file (default ~/.config/expensify-exact/fernet.keys "
                                             "or $EXPENSIFY_EXACT_KEY_FILE)")
    p.add_argument("--key-file")
    p.set_defaults(func=cmd_init_key)
    p = secrets.add_parser("set", help="store credentials for a connection from the environment or stdin")
    p.add_argument("--connection", required=True)
    p.add_argument("--from-env", action="store_true",
                   help="read " + ", ".join([*SECRET_ENV.values(), REFRESH_TOKEN_ENV]) + " where set, and "
                        "SMTP_USERNAME, SMTP_PASSWORD, ALERT_WEBHOOK_URL for mail and alerts")
    p.add_argument("--stdin", metavar="NAME", help="read one secret's value from standard input")
    p.set_defaults(func=cmd_set)
    p = secrets.add_parser("list", help="list stored secret names and ages (never values)")
    p.set_defaults(func=cmd_list)
    p = secrets.add_parser("rotate-key", help="re-encrypt everything under a new key")
    p.set_defaults(func=cmd_rotate_key)


def cmd_init_key(args) -> int:
    from expensify_exact.store.vault import create_key_file

    path = create_key_file(Path(args.key_file) if args.key_file else None)
    print(f"created key file {path} (mode 600); keep it outside the repository and back it up")
    return EXIT_OK


def cmd_set(args) -> int:
    from expensify_exact.core.connections import SECRET_NAMES
    from expensify_exact.notify import NOTIFY_SECRET_ENV, NOTIFY_SECRET_NAMES

    connector = connector_from_args(args)
    connector.project().connection(args.connection)  # fails early on an unknown connection
    vault = connector.vault()
    values: dict[str, str] = {}
    if args.from_env:
        values = {name: os.environ[env] for name, env in {**SECRET_ENV, **NOTIFY_SECRET_ENV}.items()
                  if os.environ.get(env)}
        if os.environ.get(REFRESH_TOKEN_ENV):
            values["exact_refresh_token"] = os.environ[REFRESH_TOKEN_ENV]
    if args.stdin:
        known = (*SECRET_NAMES, "exact_refresh_token", *NOTIFY_SECRET_NAMES)
        if args.stdin not in known:
            print(f"unknown secret {args.stdin!r}; known: {', '.join(known)}", file=sys.stderr)
            return EXIT_USAGE
        values[args.stdin] = sys.stdin.readline().strip()
    if not values:
        print("nothing to set: pass --from-env (reads " + ", ".join([*SECRET_ENV.values(), REFRESH_TOKEN_ENV])
              + ") or --stdin NAME", file=sys.stderr)
        return EXIT_USAGE
    refresh_token = values.pop("exact_refresh_token", None)
    for name, value in values.items():
        vault.set(args.connection, name, value)
    if refresh_token:
        _store_refresh_token(connector, args.connection, refresh_token)
    stored = sorted(values) + (["exact_refresh_token"] if refresh_token else [])
    print(f"stored {len(stored)} secret(s) for {args.connection}: {', '.join(stored)}")
    return EXIT_OK


def _store_refresh_token(connector, connection: str, refresh_token: str) -> None:
    """Seed the token store with an existing refresh token; the first API call trades it for an access token."""
    from datetime import datetime, timezone

    from expensify_exact.api.exact.tokens import ExactTokens
    from expensify_exact.core.connections import VaultTokenStore

    long_ago = datetime(2000, 1, 1, tzinfo=timezone.utc)
    tokens = ExactTokens(access_token="", refresh_token=refresh_token, access_expires_at=long_ago, issued_at=long_ago)
    store = VaultTokenStore(connector.store(), connector.vault())
    with store.lock(connection):
        store.save(connection, tokens)


def cmd_list(args) -> int:
    connector = connector_from_args(args)
    rows = connector.store().list_secrets()
    tokens = connector.store().token_ages()
    for scope, name, updated in rows:
        print(f"{scope:<24} {name:<32} set {updated:%Y-%m-%d %H:%M} UTC")
    for conn, (issued, _refresh) in tokens.items():
        print(f"{conn:<24} {'exact_tokens':<32} issued {issued:%Y-%m-%d %H:%M} UTC")
    if not rows and not tokens:
        print("no secrets stored")
    return EXIT_OK


def cmd_rotate_key(args) -> int:
    from cryptography.fernet import Fernet

    from expensify_exact.store.vault import KEY_ENV, key_file_path, load_keys

    connector = connector_from_args(args)
    vault = connector.vault()
    new_key = Fernet.generate_key()
    count = vault.rotate(new_key)
    if os.environ.get(KEY_ENV):
        print(f"re-encrypted {count} value(s). Put this key first in ${KEY_ENV}: the old keys still decrypt, "
              f"remove them once every process uses the new one.")
        print(new_key.decode())
    else:
        path = key_file_path()
        keys = [new_key] + load_keys()
        path.write_text("".join(k.decode() + "\n" for k in keys), encoding="utf-8")
        print(f"re-encrypted {count} value(s); {path} now starts with the new key")
    return EXIT_OK

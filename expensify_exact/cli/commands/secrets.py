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
    p = secrets.add_parser("set", help="store credentials for a connection, or a shared Expensify credential, from "
                                       "the environment or stdin",
                           description="With --connection, the connection's secrets; an Expensify partner login "
                                       "that connections share (expensify.credential in connections.yaml) is stored "
                                       "once with --credential NAME instead, and --connection then stores the rest.")
    whose = p.add_mutually_exclusive_group(required=True)
    whose.add_argument("--connection")
    whose.add_argument("--credential", help="an Expensify credential (expensify.credential): store its partner user "
                                            "ID and secret once, for every connection naming it")
    p.add_argument("--from-env", action="store_true",
                   help="read " + ", ".join([*SECRET_ENV.values(), REFRESH_TOKEN_ENV]) + " where set, and "
                        "SMTP_USERNAME, SMTP_PASSWORD, ALERT_WEBHOOK_URL for mail and alerts (with --credential: "
                        "only the EXPENSIFY_PARTNER_USER_ID and _SECRET)")
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
    from expensify_exact.core.connections import EXPENSIFY_SECRET_NAMES, SECRET_NAMES
    from expensify_exact.notify import NOTIFY_SECRET_ENV, NOTIFY_SECRET_NAMES

    connector = connector_from_args(args)
    project = connector.project()
    if args.credential:
        return _set_credential(connector, project, args)
    conn = project.connection(args.connection)  # fails early on an unknown connection
    # A credential named in the config keeps the partner login for every connection naming it; stored apart.
    shared = EXPENSIFY_SECRET_NAMES if conn.expensify.credential else ()
    values = _read_values(args, {**SECRET_ENV, **NOTIFY_SECRET_ENV}, (*SECRET_NAMES, "exact_refresh_token",
                                                                        *NOTIFY_SECRET_NAMES))
    if values is None:
        return EXIT_USAGE
    if shared:
        print(_where_the_login_goes(connector, project, conn), file=sys.stderr)
        if args.stdin in shared:
            return EXIT_USAGE
        values = {name: value for name, value in values.items() if name not in shared}
    if not values:
        print("nothing to set: pass --from-env (reads " + ", ".join([*SECRET_ENV.values(), REFRESH_TOKEN_ENV])
              + ") or --stdin NAME", file=sys.stderr)
        return EXIT_USAGE
    vault = connector.vault()
    refresh_token = values.pop("exact_refresh_token", None)
    for name, value in values.items():
        vault.set(conn.name, name, value)
    if refresh_token:
        _store_refresh_token(connector, conn.name, refresh_token)
    stored = sorted(values) + (["exact_refresh_token"] if refresh_token else [])
    print(f"stored {len(stored)} secret(s) for {conn.name}: {', '.join(stored)}")
    return EXIT_OK


def _read_values(args, env_names: dict[str, str], known: tuple[str, ...]) -> dict[str, str] | None:
    """The secrets `--from-env` and `--stdin` give, of those in `known`; None (said why) for an unknown --stdin."""
    values: dict[str, str] = {}
    if args.from_env:
        values = {name: os.environ[env] for name, env in env_names.items() if name in known and os.environ.get(env)}
        if "exact_refresh_token" in known and os.environ.get(REFRESH_TOKEN_ENV):
            values["exact_refresh_token"] = os.environ[REFRESH_TOKEN_ENV]
    if args.stdin:
        if args.stdin not in known:
            print(f"unknown secret {args.stdin!r}; known: {', '.join(known)}", file=sys.stderr)
            return None
        values[args.stdin] = sys.stdin.readline().strip()
    return values


def _set_credential(connector, project, args) -> int:
    """`secrets set --credential NAME`: the partner login of the connections naming it, stored once under NAME."""
    from expensify_exact.core.connections import EXPENSIFY_SECRET_NAMES
    from expensify_exact.core.exports import by_credential

    groups = by_credential(list(project.connections))
    users = groups.get(args.credential)
    if users is None:
        print(f"no connection uses Expensify credential {args.credential!r}; the configured ones: "
              f"{', '.join(groups)} (expensify.credential, else the connection's name)", file=sys.stderr)
        return EXIT_USAGE
    values = _read_values(args, SECRET_ENV, EXPENSIFY_SECRET_NAMES)
    if values is None:
        return EXIT_USAGE
    if not values:
        print("nothing to set: pass --from-env (reads " + ", ".join(SECRET_ENV[n] for n in EXPENSIFY_SECRET_NAMES)
              + ") or --stdin NAME", file=sys.stderr)
        return EXIT_USAGE
    vault = connector.vault()
    for name, value in values.items():
        vault.set(args.credential, name, value)
    print(f"stored {len(values)} secret(s) for Expensify credential {args.credential} (connections "
          f"{', '.join(c.name for c in users)}): {', '.join(sorted(values))}")
    return EXIT_OK


def _where_the_login_goes(connector, project, conn) -> str:
    """What `secrets set --connection` says of a connection whose Expensify login is a shared credential."""
    from expensify_exact.core.connections import missing_expensify_credentials, store_expensify_login_command
    from expensify_exact.core.exports import by_credential, credential_of

    credential = credential_of(conn)
    group = by_credential(list(project.connections))[credential]
    command = store_expensify_login_command(group)
    state = (f"not stored yet: run `{command}`" if missing_expensify_credentials(connector.vault(), group)
             else f"stored (`{command}` replaces it)")
    return (f"the Expensify partner login of {conn.name} is credential {credential} (connections "
            f"{', '.join(c.name for c in group)}), kept apart from the connection's secrets: {state}")


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

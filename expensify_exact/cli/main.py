"""`expensify-exact`: what the Dagster UI cannot do — secrets, Exact authorization and headless runs."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import warnings
from datetime import date
from pathlib import Path

from expensify_exact.errors import ConnectorError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CONFIG = 0, 1, 2, 3

# Environment variables `secrets set --from-env` reads, per secret.
SECRET_ENV = {
    "expensify_partner_user_id": "EXPENSIFY_PARTNER_USER_ID",
    "expensify_partner_user_secret": "EXPENSIFY_PARTNER_USER_SECRET",
    "exact_client_id": "EXACT_CLIENT_ID",
    "exact_client_secret": "EXACT_CLIENT_SECRET",
    "exact_webhook_secret": "EXACT_WEBHOOK_SECRET",
}
REFRESH_TOKEN_ENV = "EXACT_REFRESH_TOKEN"
EMBEDDED_INSTANCE_CONFIG = """\
concurrency:
  pools:
    default_limit: 1
telemetry:
  enabled: false
"""


def dagster_home_path() -> Path:
    return Path(os.environ.get("DAGSTER_HOME") or Path.cwd() / ".dagster_home").resolve()


def _ensure_dagster_home() -> Path:
    """The embedded default: a SQLite Dagster instance inside the project unless DAGSTER_HOME says otherwise."""
    from expensify_exact.defs.recovery import home_lock

    home = dagster_home_path()
    home.mkdir(parents=True, exist_ok=True)
    instance_config = home / "dagster.yaml"
    with home_lock(home):  # a second command started at once must not read a half-written file
        if not instance_config.exists():
            # SQLite storage (Dagster's default); one step per pool at a time, as in the production dagster.yaml, so
            # runs launched side by side from the UI stay inside the APIs' limits; no telemetry from a ledger
            # connector.
            instance_config.write_text(EMBEDDED_INSTANCE_CONFIG, encoding="utf-8")
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def connector_from_args(args):
    from expensify_exact.defs.resources import ConnectorResource

    return ConnectorResource(mappings_dir=args.mappings, state_url=args.state_url)


# --- serving ----------------------------------------------------------------------------------------

def wait_until_stopped() -> None:
    """Block a serving command until Ctrl-C or SIGTERM (how `make demo` and service managers stop it)."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass


# --- secrets ------------------------------------------------------------------------------------------

def cmd_secrets_init_key(args) -> int:
    from expensify_exact.store.vault import create_key_file

    path = create_key_file(Path(args.key_file) if args.key_file else None)
    print(f"created key file {path} (mode 600); keep it outside the repository and back it up")
    return EXIT_OK


def cmd_secrets_set(args) -> int:
    from expensify_exact.api.connections import SECRET_NAMES
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
    from expensify_exact.store.vault import VaultTokenStore

    long_ago = datetime(2000, 1, 1, tzinfo=timezone.utc)
    tokens = ExactTokens(access_token="", refresh_token=refresh_token, access_expires_at=long_ago, issued_at=long_ago)
    store = VaultTokenStore(connector.store(), connector.vault())
    with store.lock(connection):
        store.save(connection, tokens)


def cmd_secrets_list(args) -> int:
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


def cmd_secrets_rotate_key(args) -> int:
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


# --- Exact authorization ------------------------------------------------------------------------------

def cmd_authorize(args) -> int:
    from expensify_exact.clock import SystemClock
    from expensify_exact.api.connections import EXACT_CLIENT_ID, EXACT_CLIENT_SECRET, exact_base_url
    from expensify_exact.api.exact import oauth
    from expensify_exact.store.vault import VaultTokenStore

    connector = connector_from_args(args)
    conn = connector.project().connection(args.connection)
    if not conn.exact.redirect_uri:
        print(f"set exact.redirect_uri for {conn.name} in mappings/connections.yaml (as registered in Exact's "
              f"App Center) first", file=sys.stderr)
        return EXIT_CONFIG
    vault = connector.vault()
    base = exact_base_url(conn)
    client_id = vault.get(conn.name, EXACT_CLIENT_ID)
    url, state = oauth.build_authorize_url(base, client_id, conn.exact.redirect_uri)
    print("Open this URL, log in and pick the division, then come back:")
    print(url, flush=True)
    if args.listen:
        code = oauth.wait_for_callback(args.listen, expected_state=state)
    else:
        pasted = args.code or input("Paste the URL Exact redirected you to (or just the code): ")
        code = oauth.parse_redirect(pasted, expected_state=state if "state=" in pasted else None)
    tokens = oauth.exchange_code(base, client_id, vault.get(conn.name, EXACT_CLIENT_SECRET),
                                 conn.exact.redirect_uri, code, SystemClock())
    store = VaultTokenStore(connector.store(), vault)
    with store.lock(conn.name):
        store.save(conn.name, tokens)
    print(f"authorized {conn.name}; tokens stored encrypted")
    return EXIT_OK


# --- headless runs ------------------------------------------------------------------------------------

def cmd_run(args) -> int:
    from expensify_exact.config import load_project_config
    from expensify_exact.cli.progress_view import showing_progress
    from expensify_exact.defs.recovery import open_embedded, tell
    from expensify_exact.defs.runs import preview_range, run_range

    home = _ensure_dagster_home()
    start = date.fromisoformat(args.start)
    end = date.fromisoformat(args.end) if args.end else start
    if end < start:
        print("--end is before --start", file=sys.stderr)
        return EXIT_USAGE
    instance, _ = open_embedded(home, connector_from_args(args).store, tell)
    days = ((end - start).days + 1) * len(load_project_config(args.mappings).connections)
    launch = preview_range if args.dry_run else run_range  # a dry run settles no days: no day count to show
    with showing_progress(json_output=args.json, total_days=None if args.dry_run else days):
        summary = launch(start, end, mappings_dir=args.mappings, state_url=args.state_url, instance=instance,
                         wait_timeout=args.wait_timeout)
    if args.json:
        print(json.dumps(summary.as_json(), indent=2, sort_keys=True))
    else:
        print(summary.as_text())
    return EXIT_OK if summary.success else EXIT_FAILED


def add_wait_timeout(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait-timeout", type=float, default=None, metavar="SECONDS",
                        help="how long to wait while another live run holds a pool this command needs, then give up "
                             "with exit 1 (default: 900, i.e. 15 minutes; recovery.DEFAULT_WAIT_TIMEOUT_SECONDS)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expensify-exact", description=__doc__.split("\n")[0].split(": ", 1)[1])
    parser.add_argument("--mappings", default=os.environ.get("EXPENSIFY_EXACT_MAPPINGS", "mappings"),
                        help="the mappings folder (default: ./mappings or $EXPENSIFY_EXACT_MAPPINGS)")
    parser.add_argument("--state-url", default=None,
                        help="SQLAlchemy URL of the connector's state DB (default: $EXPENSIFY_EXACT_STATE_URL, "
                             "else SQLite under $DAGSTER_HOME)")
    sub = parser.add_subparsers(dest="command", required=True)

    secrets = sub.add_parser("secrets", help="store credentials encrypted; rotate the key").add_subparsers(
        dest="secrets_command", required=True)
    p = secrets.add_parser("init-key", help="create a new key file (default ~/.config/expensify-exact/fernet.keys "
                                             "or $EXPENSIFY_EXACT_KEY_FILE)")
    p.add_argument("--key-file")
    p.set_defaults(func=cmd_secrets_init_key)
    p = secrets.add_parser("set", help="store credentials for a connection from the environment or stdin")
    p.add_argument("--connection", required=True)
    p.add_argument("--from-env", action="store_true",
                   help="read " + ", ".join([*SECRET_ENV.values(), REFRESH_TOKEN_ENV]) + " where set, and "
                        "SMTP_USERNAME, SMTP_PASSWORD, ALERT_WEBHOOK_URL for mail and alerts")
    p.add_argument("--stdin", metavar="NAME", help="read one secret's value from standard input")
    p.set_defaults(func=cmd_secrets_set)
    p = secrets.add_parser("list", help="list stored secret names and ages (never values)")
    p.set_defaults(func=cmd_secrets_list)
    p = secrets.add_parser("rotate-key", help="re-encrypt everything under a new key")
    p.set_defaults(func=cmd_secrets_rotate_key)

    p = sub.add_parser("authorize", help="authorize a connection with Exact Online (OAuth authorization code)")
    p.add_argument("--connection", required=True)
    p.add_argument("--listen", type=int, metavar="PORT", help="receive the redirect on this local port")
    p.add_argument("--code", help="the redirect URL or code, instead of a prompt")
    p.set_defaults(func=cmd_authorize)

    p = sub.add_parser("run", help="run one day or a date range through the Dagster assets")
    p.add_argument("--start", required=True, help="first approval day, YYYY-MM-DD")
    p.add_argument("--end", help="last approval day, YYYY-MM-DD (default: --start)")
    p.add_argument("--dry-run", action="store_true",
                   help="show every draft line and what a run would do with each report; post and store nothing")
    p.add_argument("--json", action="store_true", help="print one JSON summary object")
    add_wait_timeout(p)
    p.set_defaults(func=cmd_run)

    for module in _command_modules():
        module.register(sub)
    return parser


def _command_modules():
    import importlib
    import pkgutil

    from expensify_exact.cli import commands

    return [importlib.import_module(f"{commands.__name__}.{info.name}")
            for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name)]


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
        from expensify_exact.errors import ConfigError

        return EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())

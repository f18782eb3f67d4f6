"""`expensify-exact authorize --connection NAME`: Exact Online's OAuth authorization code flow, once per connection;
the tokens it yields are stored encrypted."""

from __future__ import annotations

import argparse
import sys

from expensify_exact.cli.support import EXIT_CONFIG, EXIT_OK, connector_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("authorize", help="authorize a connection with Exact Online (OAuth authorization code)")
    p.add_argument("--connection", required=True)
    p.add_argument("--listen", type=int, metavar="PORT", help="receive the redirect on this local port")
    p.add_argument("--code", help="the redirect URL or code, instead of a prompt")
    p.set_defaults(func=cmd_authorize)


def cmd_authorize(args) -> int:
    from expensify_exact.api.exact import oauth
    from expensify_exact.core.connections import EXACT_CLIENT_ID, EXACT_CLIENT_SECRET, VaultTokenStore, exact_base_url

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
                                 conn.exact.redirect_uri, code, connector.clock())
    store = VaultTokenStore(connector.store(), vault)
    with store.lock(conn.name):
        store.save(conn.name, tokens)
    print(f"authorized {conn.name}; tokens stored encrypted")
    return EXIT_OK

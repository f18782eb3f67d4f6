"""`expensify-exact-sandbox`: serve both simulators on 127.0.0.1, or print the demo credentials for
`expensify-exact secrets set --from-env` (they open nothing but these simulators)."""

from __future__ import annotations

import argparse
import shlex
import signal

from expensify_exact_sandbox import seed
from expensify_exact_sandbox.server import SandboxServer

# The environment variables `expensify-exact secrets set --from-env` reads, with the simulators' demo values.
DEMO_CREDENTIALS_ENV = {
    "EXPENSIFY_PARTNER_USER_ID": seed.EXPENSIFY_PARTNER_USER_ID,
    "EXPENSIFY_PARTNER_USER_SECRET": seed.EXPENSIFY_PARTNER_USER_SECRET,
    "EXACT_CLIENT_ID": seed.EXACT_CLIENT_ID,
    "EXACT_CLIENT_SECRET": seed.EXACT_CLIENT_SECRET,
    "EXACT_REFRESH_TOKEN": seed.EXACT_INITIAL_REFRESH_TOKEN,
    "EXACT_WEBHOOK_SECRET": seed.EXACT_WEBHOOK_SECRET,
}


def serve(args) -> int:
    server = SandboxServer(host=args.host, exact_port=args.exact_port, expensify_port=args.expensify_port).start()
    print(f"Exact Online sandbox:  {server.exact_url}", flush=True)
    print(f"Expensify sandbox:     {server.expensify_url}", flush=True)
    print("Demo credentials: `expensify-exact-sandbox credentials` prints them. Press Ctrl-C to stop.", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stopped by a service manager as by Ctrl-C
    try:
        signal.pause()
    except KeyboardInterrupt:
        server.stop()
    return 0


def credentials(_args) -> int:
    for name, value in DEMO_CREDENTIALS_ENV.items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="expensify-exact-sandbox", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the Expensify and Exact Online simulators until Ctrl-C or SIGTERM")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--exact-port", type=int, default=8765)
    p.add_argument("--expensify-port", type=int, default=8766)
    p.set_defaults(func=serve)
    p = sub.add_parser("credentials", help="print the demo credentials as shell exports for "
                                           "`expensify-exact secrets set --from-env`")
    p.set_defaults(func=credentials)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())

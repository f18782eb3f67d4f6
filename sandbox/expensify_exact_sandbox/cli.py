"""`expensify-exact-sandbox`: serve both simulators on 127.0.0.1 (optionally with many customers), print the demo
credentials for `expensify-exact secrets set --from-env` (they open nothing but these simulators), or print a scale
scenario's plan."""

from __future__ import annotations

import argparse
import json
import shlex
import signal
from datetime import date, timedelta

from expensify_exact_sandbox import seed
from expensify_exact_sandbox.clock import SandboxClock
from expensify_exact_sandbox.scale import ScaleScenario
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
    clock = SandboxClock()
    scale = _scenario(args, clock.now().date()) if args.connections else None
    server = SandboxServer(host=args.host, exact_port=args.exact_port, expensify_port=args.expensify_port,
                           clock=clock, scale=scale).start()
    print(f"Exact Online sandbox:  {server.exact_url}", flush=True)
    print(f"Expensify sandbox:     {server.expensify_url}", flush=True)
    if scale is not None:
        print(f"Scale: {scale.connections} customers (divisions {scale.divisions[0]}-{scale.divisions[-1]}, "
              f"{scale.reports_per_policy} reports approved on {scale.day} each, {scale.credentials} partner "
              f"logins); `expensify-exact-sandbox scale-plan` with the same options lists them.", flush=True)
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


def scale_plan(args) -> int:
    print(json.dumps(_scenario(args, SandboxClock().now().date()).plan(), indent=1))
    return 0


def _scenario(args, today: date) -> ScaleScenario:
    day = date.fromisoformat(args.day) if args.day else today - timedelta(days=1)
    return ScaleScenario(connections=args.connections, day=day, reports_per_policy=args.reports_per_policy,
                         credentials=args.credentials, first_division=args.first_division)


def _scale_options(parser: argparse.ArgumentParser, connections_default: int) -> None:
    group = parser.add_argument_group("scale scenario (customers next to the demo firm)")
    group.add_argument("--connections", type=int, default=connections_default,
                       help="customers, each with its own Exact division, user and Expensify policy")
    group.add_argument("--reports-per-policy", type=int, default=20)
    group.add_argument("--day", help="the approval day, YYYY-MM-DD (default: yesterday, UTC)")
    group.add_argument("--credentials", type=int, default=1, help="partner logins the customers share round-robin")
    group.add_argument("--first-division", type=int, default=500001)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="expensify-exact-sandbox", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the Expensify and Exact Online simulators until Ctrl-C or SIGTERM")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--exact-port", type=int, default=8765)
    p.add_argument("--expensify-port", type=int, default=8766)
    _scale_options(p, connections_default=0)
    p.set_defaults(func=serve)
    p = sub.add_parser("credentials", help="print the demo credentials as shell exports for "
                                           "`expensify-exact secrets set --from-env`")
    p.set_defaults(func=credentials)
    p = sub.add_parser("scale-plan", help="print a scale scenario as JSON: each connection's division, policy, "
                                          "partner login and Exact refresh token, and the logins' secrets")
    _scale_options(p, connections_default=500)
    p.set_defaults(func=scale_plan)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())

"""Runs both simulators over real HTTP on 127.0.0.1, each on its own port, sharing one clock and fault switches."""

from __future__ import annotations

import json
import socket
import sys
import threading
from dataclasses import dataclass, field
from datetime import date, datetime
from socketserver import ThreadingMixIn
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer, make_server

from expensify_exact_sandbox.clock import SandboxClock
from expensify_exact_sandbox.exact_app import ExactSimulator
from expensify_exact_sandbox.expensify_app import ExpensifySimulator
from expensify_exact_sandbox.faults import FaultSwitches
from expensify_exact_sandbox.scale import ScaleScenario
from expensify_exact_sandbox.seed import Seed, build_seed


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog of 5 resets connections when dozens of client threads connect at once
    request_queue_size = 1024


class _DroppingServerHandler(ServerHandler):
    """An app exception with `drop_connection = True` means: write nothing, the socket just closes."""

    dropped = False

    def handle_error(self):
        if getattr(sys.exc_info()[1], "drop_connection", False):
            self.dropped = True
            return
        super().handle_error()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - signature fixed by the base class
        pass

    def handle(self):
        # wsgiref's own handle(), with a ServerHandler that can hang up without answering (the *_drop faults)
        self.raw_requestline = self.rfile.readline(65537)
        if len(self.raw_requestline) > 65536:
            self.requestline = self.request_version = self.command = ""
            self.send_error(414)
            return
        if not self.parse_request():
            return
        handler = _DroppingServerHandler(self.rfile, self.wfile, self.get_stderr(), self.get_environ(),
                                         multithread=True)
        handler.request_handler = self
        handler.run(self.server.get_app())
        if handler.dropped:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _clock_app(clock: SandboxClock, inner):
    """Serves /_sandbox/clock on every port (GET reads, POST {"advance": s} or {"now": iso} moves it)."""

    def app(environ, start_response):
        if environ.get("PATH_INFO") != "/_sandbox/clock":
            return inner(environ, start_response)
        if environ["REQUEST_METHOD"] == "POST":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = json.loads(environ["wsgi.input"].read(length) or b"{}")
            if "now" in body:
                clock.advance((datetime.fromisoformat(body["now"]) - clock.now()).total_seconds())
            if "advance" in body:
                clock.advance(float(body["advance"]))
        payload = json.dumps({"now": clock.now().isoformat()}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))])
        return [payload]

    return app


@dataclass
class SandboxServer:
    """Both simulators on 127.0.0.1. Port 0 picks a free port; use as a context manager or start()/stop().
    `scale` adds its customers (divisions, partner logins, policies and reports) next to the demo firm."""

    host: str = "127.0.0.1"
    exact_port: int = 0
    expensify_port: int = 0
    clock: SandboxClock = field(default_factory=SandboxClock)
    faults: FaultSwitches = field(default_factory=FaultSwitches)
    seed: Seed | None = None
    scale: ScaleScenario | None = None

    def __post_init__(self):
        if self.seed is None:
            self.seed = build_seed(self.clock.now().date())
        self.exact = ExactSimulator(seed=self.seed, clock=self.clock, faults=self.faults)
        self.expensify = ExpensifySimulator(seed=self.seed, clock=self.clock, faults=self.faults)
        if self.scale is not None:
            self.scale.install(self.exact, self.expensify)
        self._servers: list[WSGIServer] = []
        self._threads: list[threading.Thread] = []

    @property
    def exact_url(self) -> str:
        return f"http://{self.host}:{self._servers[0].server_port}"

    @property
    def expensify_url(self) -> str:
        return f"http://{self.host}:{self._servers[1].server_port}/Integration-Server/ExpensifyIntegrations"

    def start(self) -> "SandboxServer":
        for port, app in ((self.exact_port, self.exact), (self.expensify_port, self.expensify)):
            server = make_server(self.host, port, _clock_app(self.clock, app),
                                 server_class=_ThreadingWSGIServer, handler_class=_QuietHandler)
            thread = threading.Thread(target=server.serve_forever, name=f"sandbox-{port}", daemon=True)
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        self.exact.public_base_url = self.exact_url
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()

    def __enter__(self) -> "SandboxServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def seed_for(today: date | None = None) -> Seed:
    return build_seed(today or date.today())

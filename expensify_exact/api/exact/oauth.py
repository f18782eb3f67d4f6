"""The one-time OAuth authorization-code flow for Exact Online: authorize URL, pasted redirect, code exchange."""

from __future__ import annotations

import secrets
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import httpx

from expensify_exact.api.exact.odata import parse_error
from expensify_exact.api.exact.regions import authorize_endpoint, token_url
from expensify_exact.api.exact.tokens import ExactTokens, parse_token_response
from expensify_exact.api.http.redaction import redact_text
from expensify_exact.clock import Clock
from expensify_exact.errors import AuthenticationError, TransientApiError

SERVICE = "exact"


def build_authorize_url(base_url: str, client_id: str, redirect_uri: str, *,
                        state: str | None = None, force_login: bool = False) -> tuple[str, str]:
    """The URL to open in a browser, and the `state` it carries (exact-online.md §2.1).

    Args:
        base_url: the region's base URL (see regions.resolve_base_url).
        client_id: the app's client id from Exact's App Center.
        redirect_uri: exactly the redirect URI registered for the app.
        state: an opaque value to check on return; a random one is made if omitted.
        force_login: show Exact's login screen even when a session exists.

    Returns:
        (url, state)
    """
    state = state or secrets.token_urlsafe(24)
    query = urlencode({"client_id": client_id, "redirect_uri": redirect_uri, "response_type": "code",
                       "force_login": "1" if force_login else "0", "state": state})
    return f"{authorize_endpoint(base_url)}?{query}", state


def parse_redirect(pasted: str, expected_state: str | None = None) -> str:
    """The authorization code from a pasted redirect URL (or a bare code).

    The code contains `!`, which arrives as `%21` and must be decoded before the exchange
    (exact-online.md §2.1).

    Raises:
        AuthenticationError: Exact reported an error, the state does not match, or no code is present.
    """
    text = pasted.strip()
    if "code=" not in text and "error=" not in text:
        if not text or any(c in text for c in " ?&="):
            raise AuthenticationError(SERVICE, "paste the whole address Exact redirected to, or just the code")
        return unquote(text)
    query = urlsplit(text).query if "?" in text else text.lstrip("?")
    params = {k: v[0] for k, v in parse_qs(query, keep_blank_values=True).items()}
    if "error" in params:
        raise AuthenticationError(SERVICE, f"Exact refused the authorization: {params['error']} "
                                           f"{params.get('error_description', '')}".strip())
    if expected_state is not None and params.get("state") != expected_state:
        raise AuthenticationError(SERVICE, "the redirect's state does not match this authorization attempt; "
                                           "start again (the pasted address may belong to another attempt)")
    code = params.get("code", "").strip()
    if not code:
        raise AuthenticationError(SERVICE, "the pasted address carries no code")
    return code


def exchange_code(base_url: str, client_id: str, client_secret: str, redirect_uri: str, code: str,
                  clock: Clock, *, transport: httpx.BaseTransport | None = None,
                  timeout: float = 30.0) -> ExactTokens:
    """Trade an authorization code for the first token pair (form POST, exact-online.md §2.2).

    Raises:
        AuthenticationError: the code was refused (it is single-use and valid for 3 minutes).
        TransientApiError: the token endpoint could not be reached or failed.
    """
    form = {"code": code, "redirect_uri": redirect_uri, "grant_type": "authorization_code",
            "client_id": client_id, "client_secret": client_secret}
    requested_at = clock.now()
    try:
        with httpx.Client(transport=transport, timeout=timeout) as http:
            response = http.post(token_url(base_url), data=form, headers={"Accept": "application/json"})
    except httpx.TransportError as exc:
        raise TransientApiError(SERVICE, f"token endpoint unreachable: {type(exc).__name__}") from exc
    if response.status_code == 200:
        return parse_token_response(response.json(), requested_at, clock.now())
    message, reason = parse_error(response)
    safe = redact_text(message, secrets=(code, client_secret), limit=300)
    if response.status_code >= 500:
        raise TransientApiError(SERVICE, f"token endpoint failed: {safe}", status=response.status_code)
    raise AuthenticationError(
        SERVICE, f"Exact refused the authorization code ({safe}). A code works once and for 3 minutes, and "
                 "the redirect URI and client credentials must match the app; authorize again",
        status=response.status_code, reason=reason)


def wait_for_callback(port: int, expected_state: str | None = None, *, host: str = "127.0.0.1",
                      timeout: float = 180.0) -> str:
    """Listen on host:port for the browser's redirect and return the code from it.

    Exact registers only public HTTPS redirect URIs (exact-online.md §2.1), so this helps when
    that URI is forwarded here (a tunnel or reverse proxy); otherwise paste the address instead.

    Raises:
        AuthenticationError: nothing arrived within `timeout` (the code would be stale anyway),
            or the redirect carried an error or a wrong state.
    """
    received: dict[str, str] = {}
    done = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - name fixed by http.server
            if "code=" not in self.path and "error=" not in self.path:
                self.send_response(404)
                self.end_headers()
                return
            received["path"] = self.path
            body = b"<html><body>Exact Online authorization received; you can close this window.</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            done.set()

        def log_message(self, format, *args):  # noqa: A002 - keeps the code out of stderr
            pass

    server = HTTPServer((host, port), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        if not done.wait(timeout):
            raise AuthenticationError(SERVICE, f"no redirect arrived on {host}:{port} within {timeout:.0f} s")
    finally:
        server.shutdown()
        server.server_close()
    return parse_redirect(received["path"], expected_state)

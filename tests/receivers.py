"""Local receivers for the notification tests: a real SMTP server (aiosmtpd) and a chat webhook (http.server),
both on 127.0.0.1 on a free port, keeping what they received."""

from __future__ import annotations

import email
import email.policy
import json
import socket
import ssl
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SmtpInbox:
    """An SMTP server that accepts every mail and keeps it as a parsed message.

    With `tls` (a certificate and key file) it offers STARTTLS and requires it, or with `implicit_tls` speaks TLS
    from the first byte; with `login` it also requires that user and password (AUTH PLAIN/LOGIN, only over TLS).
    """

    def __init__(self, tls: tuple[str, str] | None = None, login: tuple[str, str] | None = None,
                 implicit_tls: bool = False):
        self.messages: list[email.message.EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        self.logins: list[str] = []
        self.port = free_port()
        kwargs = {}
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*tls)
            # Implicit TLS (port 465 style) wraps the whole connection; otherwise STARTTLS is offered and required.
            kwargs |= ({"ssl_context": context, "server_hostname": "127.0.0.1"} if implicit_tls
                       else {"tls_context": context, "require_starttls": True})
        if login is not None:
            # aiosmtpd counts only STARTTLS as TLS for AUTH; an implicit-TLS connection is encrypted from the start.
            kwargs |= {"auth_required": True, "auth_require_tls": not implicit_tls,
                       "authenticator": self._authenticator(*login)}
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port, **kwargs)

    def _authenticator(self, user: str, password: str):
        def check(server, session, envelope, mechanism, auth_data):
            ok = isinstance(auth_data, LoginPassword) and auth_data.login.decode() == user \
                and auth_data.password.decode() == password
            if ok:
                self.logins.append(user)
            return AuthResult(success=ok)
        return check

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's hook name
        self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        self.messages.append(email.message_from_bytes(envelope.original_content, policy=email.policy.default))
        return "250 Message accepted for delivery"

    def __enter__(self) -> SmtpInbox:
        self._controller.start()
        return self

    def __exit__(self, *exc) -> None:
        self._controller.stop()


class WebhookReceiver:
    """A chat incoming-webhook stand-in: records every JSON body POSTed to it and answers 200 "ok" (as Slack)."""

    def __init__(self):
        self.posts: list[dict] = []
        received = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's hook name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                received.append({"path": self.path, "json": json.loads(body)})
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/services/T000/B000/secret-token"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


def self_signed_certificate(directory) -> tuple[str, str]:
    """A certificate for 127.0.0.1 (its own issuer) and its key, as PEM files in `directory`; trust it by pointing
    SSL_CERT_FILE at the certificate."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "smtp-cert.pem", directory / "smtp-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)

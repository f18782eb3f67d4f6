"""E-mail through SMTP (STARTTLS, implicit TLS, or plain for a local test server) with the stdlib, and the daily
digest mailed once per connection and day (a record in the state database)."""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import Sequence
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from expensify_exact.config import Connection, SmtpSettings
from expensify_exact.core.digest import Digest
from expensify_exact.notify import SMTP_PASSWORD, SMTP_USERNAME, NotificationError
from expensify_exact.store import StateStore
from expensify_exact.store.vault import CredentialVault

DIGEST_KIND = "digest"


def build_message(sender: str, to: Sequence[str], subject: str, text: str, html: str) -> EmailMessage:
    """A multipart/alternative mail: the plain text (Markdown) first, the HTML as the preferred rendering."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = ", ".join(to)
    message["Subject"] = subject
    message["Date"] = formatdate(localtime=False, usegmt=True)
    message["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or None)
    message.set_content(text, subtype="plain", charset="utf-8")
    message.add_alternative(html, subtype="html", charset="utf-8")
    return message


def smtp_login(vault: CredentialVault, connection: str) -> tuple[str, str] | None:
    """The SMTP user and password stored for `connection`, or None when the server needs no login."""
    if not vault.has(connection, SMTP_USERNAME):
        return None
    return vault.get(connection, SMTP_USERNAME), vault.get(connection, SMTP_PASSWORD)


def send_mail(smtp: SmtpSettings, message: EmailMessage, login: tuple[str, str] | None = None) -> None:
    """Deliver `message` to every recipient, or raise NotificationError (no half-told success)."""
    host, port = smtp.host, smtp.effective_port
    if login is not None and smtp.security == "plain":
        raise NotificationError(f"refusing to send the SMTP password to {host}:{port} unencrypted; "
                                f"set notify.smtp.security to starttls or tls")
    context = ssl.create_default_context()
    try:
        if smtp.security == "tls":
            client = smtplib.SMTP_SSL(host, port, timeout=smtp.timeout_seconds, context=context)
        else:
            client = smtplib.SMTP(host, port, timeout=smtp.timeout_seconds)
        with client:
            if smtp.security == "starttls":
                client.starttls(context=context)
            if login is not None:
                client.login(*login)
            refused = client.send_message(message)
    except (smtplib.SMTPException, OSError) as exc:
        # smtplib's messages carry the server's reply, never the password we sent.
        raise NotificationError(f"mail through {host}:{port} ({smtp.security}) failed: "
                                f"{type(exc).__name__}: {exc}") from None
    if refused:
        raise NotificationError(f"{host}:{port} refused recipient(s) {', '.join(sorted(refused))}")


def send_once(store: StateStore, key: str, *, kind: str, connection: str | None, send, force: bool = False) -> bool:
    """Run `send()` unless `key` was sent before (or is being sent right now); True if it sent.

    The key is claimed before sending and marked sent after, so two processes never both send it; a failed send
    gives the claim back and the next attempt sends.
    """
    if not store.notification_claim(key, kind=kind, connection=connection, force=force):
        return False
    try:
        detail = send()
    except BaseException:
        store.notification_release(key)
        raise
    store.notification_sent(key, detail)
    return True


def digest_key(connection: str, day: str) -> str:
    return f"{DIGEST_KIND}:{connection}:{day}"


def mail_digest(digest: Digest, conn: Connection, store: StateStore, vault: CredentialVault, *,
                resend: bool = False) -> str:
    """Mail one day's digest to the connection's `notify.digest.to`, once per connection and day.

    Returns "sent", "already sent" or "not configured". `resend` (or `notify.digest.resend_on_rerun`) mails it
    again even if it went out before.
    """
    settings = conn.notify
    if not settings.digest.to or settings.smtp is None:
        return "not configured"

    def send() -> dict:
        message = build_message(settings.smtp.sender, settings.digest.to, digest.title, digest.render("md"),
                                digest.render("html"))
        send_mail(settings.smtp, message, smtp_login(vault, conn.name))
        return {"recipients": len(settings.digest.to)}

    sent = send_once(store, digest_key(conn.name, digest.day), kind=DIGEST_KIND, connection=conn.name, send=send,
                     force=resend or settings.digest.resend_on_rerun)
    return "sent" if sent else "already sent"

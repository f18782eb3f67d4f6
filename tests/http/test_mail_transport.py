"""SMTP as configured: implicit TLS and STARTTLS against a real local server whose certificate the client must
verify, and no silent fallback to plain text when a server offers no STARTTLS."""

from __future__ import annotations

import pytest

from expensify_exact.config import SmtpSettings
from expensify_exact.notify import NotificationError
from expensify_exact.notify.mail import build_message, send_mail
from tests.receivers import SmtpInbox, self_signed_certificate


def _message():
    return build_message("bot@example.nl", ["a@example.nl", "b@example.nl"], "Subject ü", "text part\n",
                         "<p>html part</p>")


# aiosmtpd warns that AUTH is allowed without STARTTLS: on the implicit-TLS server the whole connection is TLS.
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
@pytest.mark.parametrize("implicit", [True, False], ids=["tls", "starttls"])
def test_mail_goes_out_encrypted_with_the_login_and_both_parts(tmp_path, monkeypatch, implicit):
    cert, key = self_signed_certificate(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", cert)
    with SmtpInbox(tls=(cert, key), login=("u", "p"), implicit_tls=implicit) as inbox:
        smtp = SmtpSettings(host="127.0.0.1", port=inbox.port, security="tls" if implicit else "starttls",
                            sender="bot@example.nl", timeout_seconds=10)
        send_mail(smtp, _message(), ("u", "p"))
    assert inbox.logins == ["u"] and inbox.envelopes == [("bot@example.nl", ["a@example.nl", "b@example.nl"])]
    received = inbox.messages[0]
    assert received["Subject"] == "Subject ü"
    assert [p.get_content_type() for p in received.iter_parts()] == ["text/plain", "text/html"]


def test_an_untrusted_certificate_or_a_server_without_starttls_fails_and_never_sends_in_the_clear(tmp_path):
    cert, key = self_signed_certificate(tmp_path)  # not trusted: SSL_CERT_FILE is not pointed at it
    with SmtpInbox(tls=(cert, key)) as untrusted, SmtpInbox() as plain_only:
        for inbox in (untrusted, plain_only):
            smtp = SmtpSettings(host="127.0.0.1", port=inbox.port, security="starttls", sender="bot@example.nl",
                                timeout_seconds=10)
            with pytest.raises(NotificationError, match=f"127.0.0.1:{inbox.port} \\(starttls\\)"):
                send_mail(smtp, _message(), ("u", "secret-password"))
            assert inbox.messages == []


def test_a_password_is_never_sent_over_plain_smtp():
    smtp = SmtpSettings(host="127.0.0.1", port=1, security="plain", sender="bot@example.nl")
    with pytest.raises(NotificationError, match="refusing to send the SMTP password") as caught:
        send_mail(smtp, _message(), ("u", "secret-password"))
    assert "secret-password" not in str(caught.value)

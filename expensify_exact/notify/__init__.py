"""Telling people: the daily digest by e-mail, and alerts to e-mail and a chat webhook, each sent once."""

from expensify_exact.errors import ConnectorError

# Vault secrets of a connection (scope = connection name) used for notifications; all optional.
SMTP_USERNAME = "smtp_username"
SMTP_PASSWORD = "smtp_password"
ALERT_WEBHOOK_URL = "alert_webhook_url"  # a Slack/Teams incoming-webhook URL carries its own token: a secret
NOTIFY_SECRET_NAMES = (SMTP_USERNAME, SMTP_PASSWORD, ALERT_WEBHOOK_URL)
NOTIFY_SECRET_ENV = {SMTP_USERNAME: "SMTP_USERNAME", SMTP_PASSWORD: "SMTP_PASSWORD",
                     ALERT_WEBHOOK_URL: "ALERT_WEBHOOK_URL"}


class NotificationError(ConnectorError):
    """A mail or webhook could not be delivered. The message names the server or channel, never a secret."""

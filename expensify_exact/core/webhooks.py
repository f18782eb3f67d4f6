"""Receives Exact Online webhook notifications, verifies their HashCode and records what they mean for the connector.

Exact POSTs `{"Content":{…},"HashCode":"…"}` with no auth header (exact-online.md §8). The HashCode is the
uppercase hex HMAC-SHA256 of the Content JSON *exactly as received*, keyed with the app's webhook secret, so the
Content bytes are cut out of the raw body with a regex (as picqer's `Authenticatable` does) and never re-serialized.

What a verified notification means:

* a changed GL account, cost center or cost unit → that connection's dimension snapshot is stale:
  audit event `webhook_dimensions_changed`; the `refresh_on_exact_webhooks` sensor then asks for a replay of the
  quarantine against fresh dimensions;
* a deleted journal entry that the connector posted (found in the ledger by EntryID) →
  audit event `webhook_posted_entry_deleted`, naming the report and entry, for a person to look at;
* anything else → audit event `webhook_received` (an audit trail of what Exact told us, nothing more).

Plain Python (a WSGI app and a small threaded server); no Dagster here.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import sqlalchemy as sa

from expensify_exact.config import ProjectConfig
from expensify_exact.errors import VaultError
from expensify_exact.store import StateStore, audit_log

logger = logging.getLogger(__name__)

# Name of the per-connection vault secret holding the Exact app's webhook secret (App Center).
EXACT_WEBHOOK_SECRET = "exact_webhook_secret"

EVENT_DIMENSIONS_CHANGED = "webhook_dimensions_changed"
EVENT_POSTED_ENTRY_DELETED = "webhook_posted_entry_deleted"
EVENT_RECEIVED = "webhook_received"
WEBHOOK_EVENTS = (EVENT_DIMENSIONS_CHANGED, EVENT_POSTED_ENTRY_DELETED, EVENT_RECEIVED)

# Topics compared after lower-casing and dropping everything but letters: Exact's own spelling of the GL account,
# cost center and cost unit topics is not confirmed (exact-online.md §8 [?]), so "GLAccounts", "Costcenters" and
# "CostCenters" all match.
DIMENSION_TOPICS = {"glaccounts": "gl_accounts", "costcenters": "cost_centers", "costunits": "cost_units"}
ENTRY_TOPICS = {"generaljournalentries", "financialtransactions"}

MAX_BODY_BYTES = 64 * 1024  # a notification is a few hundred bytes; anything near this is not from Exact
# picqer's Authenticatable: ^{"Content":(.*),"HashCode":"(.*)"}$ on the raw body. Greedy, so the Content group
# runs to the last `,"HashCode":"`, which is the real one (HashCode comes last).
_ENVELOPE = re.compile(rb'\A\{"Content":(?P<content>.*),"HashCode":"(?P<hash>[^"]*)"\}\s*\Z', re.DOTALL)


class WebhookRejected(Exception):
    """A notification that is not accepted; `status` is the HTTP answer (400, 401, 413). Never names a secret."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Notification:
    """The fields of a notification's Content (exact-online.md §8)."""

    topic: str
    division: int
    action: str
    key: str
    endpoint: str
    event_created_on: str
    client_id: str

    @property
    def dimension(self) -> str | None:
        """`gl_accounts`, `cost_centers` or `cost_units` when the topic is one of the dimension tables."""
        return DIMENSION_TOPICS.get(_topic_key(self.topic))

    @property
    def is_entry_delete(self) -> bool:
        return _topic_key(self.topic) in ENTRY_TOPICS and self.action.lower() == "delete"

    def detail(self) -> dict:
        return {"topic": self.topic, "division": self.division, "action": self.action, "key": self.key,
                "event_created_on": self.event_created_on}


def _topic_key(topic: str) -> str:
    return "".join(ch for ch in topic.lower() if ch.isalpha())


def sign(content: bytes, secret: str) -> str:
    """The HashCode Exact sends for `content` (the raw Content JSON bytes)."""
    return hmac.new(secret.encode(), content, hashlib.sha256).hexdigest().upper()


def split_envelope(body: bytes) -> tuple[bytes, str]:
    """(raw Content bytes, HashCode) of a notification body, untouched.

    Raises:
        WebhookRejected: 400 when the body does not have the notification's shape.
    """
    match = _ENVELOPE.match(body)
    if match is None:
        raise WebhookRejected(400, "not an Exact webhook notification")
    return match.group("content"), match.group("hash").decode("ascii", "replace")


def signature_matches(content: bytes, hash_code: str, secret: str) -> bool:
    """Constant-time comparison of the received HashCode with the one `secret` gives."""
    expected = sign(content, secret).encode()
    # Exact sends uppercase; a lowercase copy of the same digest is the same digest.
    received = hash_code.upper().encode("ascii", "replace")
    return hmac.compare_digest(expected, received)


def parse_content(content: bytes) -> Notification:
    """The Content fields (read only after the raw bytes are cut out; the signature covers those bytes).

    Raises:
        WebhookRejected: 400 when Content is not a JSON object with a Topic and an integer Division.
    """
    try:
        data = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        raise WebhookRejected(400, "Content is not valid JSON") from None
    if not isinstance(data, dict):
        raise WebhookRejected(400, "Content is not a JSON object")
    topic, division = data.get("Topic"), data.get("Division")
    if not isinstance(topic, str) or not topic:
        raise WebhookRejected(400, "Content has no Topic")
    try:
        division = int(division)
    except (TypeError, ValueError):
        raise WebhookRejected(400, "Content has no numeric Division") from None
    return Notification(topic=topic, division=division, action=str(data.get("Action") or ""),
                        key=str(data.get("Key") or ""), endpoint=str(data.get("ExactOnlineEndpoint") or ""),
                        event_created_on=str(data.get("EventCreatedOn") or ""),
                        client_id=str(data.get("ClientId") or ""))


SecretLookup = Callable[[str], "str | None"]


def vault_secrets(connector) -> SecretLookup:
    """Reads each connection's webhook secret from the vault when a notification for it arrives."""

    def lookup(connection: str) -> str | None:
        try:
            return connector.vault().get(connection, EXACT_WEBHOOK_SECRET)
        except VaultError:
            return None

    return lookup


class WebhookProcessor:
    """Verifies notification bodies and records what they mean in the state store.

    Args:
        config: the project; a notification's Division is mapped to the connection with that `exact.division`.
        store: where the audit events go and the posted ledger is read.
        secret_for: connection name -> its Exact app's webhook secret (None when not set).
    """

    def __init__(self, config: ProjectConfig, store: StateStore, secret_for: SecretLookup):
        self.config = config
        self.store = store
        self.secret_for = secret_for

    def handle(self, body: bytes) -> tuple[str | None, Notification]:
        """Verify and record one notification; returns (the audit event written, the notification).

        Raises:
            WebhookRejected: 400 for a malformed body, 401 for a signature no configured secret produces.
        """
        content, hash_code = split_envelope(body)
        notification = parse_content(content)
        connections = [c.name for c in self.config.connections if c.exact.division == notification.division]
        # Before verification the Division is only a hint about whose secret to try. When no connection has that
        # division, the signature must still match one of ours, or the sender learns nothing either way.
        candidates = connections or [c.name for c in self.config.connections]
        verified_by = None
        for name in candidates:
            secret = self.secret_for(name)
            if secret and signature_matches(content, hash_code, secret):
                verified_by = name
                break
        if verified_by is None:
            raise WebhookRejected(401, "HashCode does not match")
        return self._record(connections, notification), notification

    def _record(self, connections: list[str], n: Notification) -> str:
        """Write the audit event(s) for a verified notification; returns the event name."""
        if not connections:
            self.store.audit(EVENT_RECEIVED, detail=n.detail() | {"note": f"no connection has division {n.division}"})
            return EVENT_RECEIVED
        if n.dimension is not None:
            for connection in connections:  # every connection on the division validates against the same table
                self.store.audit(EVENT_DIMENSIONS_CHANGED, connection=connection,
                                 detail=n.detail() | {"dimension": n.dimension})
            return EVENT_DIMENSIONS_CHANGED
        if n.is_entry_delete and n.key:
            for connection in connections:
                row = self.store.ledger_find_entry(connection, n.key)
                if row is not None:
                    self.store.audit(EVENT_POSTED_ENTRY_DELETED, connection=connection, report_id=row.report_id,
                                     transaction_ids=row.transaction_ids, entry_id=row.entry_id,
                                     entry_number=row.entry_number, partition_date=row.partition_date,
                                     detail=n.detail() | {"ledger_status": row.status})
                    return EVENT_POSTED_ENTRY_DELETED
        self.store.audit(EVENT_RECEIVED, connection=connections[0], entry_id=n.key[:36] or None, detail=n.detail())
        return EVENT_RECEIVED


def webhook_app(processor: WebhookProcessor) -> Callable:
    """The WSGI app: POST a notification to any path → 200, 400 (malformed), 401 (bad signature), 413 (too big).

    An empty POST answers 200 and records nothing: Exact pings the callback that way right after a subscription
    is made (exact-online.md §8 [?]). `GET /healthz` answers 200.
    """

    def app(environ, start_response):
        method = environ.get("REQUEST_METHOD", "GET")
        if method == "GET" and environ.get("PATH_INFO") == "/healthz":
            return _answer(start_response, 200, {"ok": True})
        if method != "POST":
            return _answer(start_response, 405, {"error": "POST only"}, [("Allow", "POST")])
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return _answer(start_response, 400, {"error": "bad Content-Length"})
        if length > MAX_BODY_BYTES:
            return _answer(start_response, 413, {"error": "body too large"})
        body = environ["wsgi.input"].read(length) if length > 0 else b""
        if not body.strip():
            return _answer(start_response, 200, {"ok": True, "ping": True})
        try:
            event, notification = processor.handle(body)
        except WebhookRejected as exc:
            logger.warning("refused an Exact webhook: %s", exc)
            return _answer(start_response, exc.status, {"error": str(exc)})
        logger.info("Exact webhook %s %s in division %s -> %s", notification.topic, notification.action,
                    notification.division, event)
        return _answer(start_response, 200, {"ok": True, "event": event})

    return app


def _answer(start_response, status: int, payload: dict, headers: Iterable[tuple[str, str]] = ()) -> list[bytes]:
    body = json.dumps(payload).encode()
    phrases = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 405: "Method Not Allowed",
               413: "Payload Too Large"}
    start_response(f"{status} {phrases.get(status, 'Error')}",
                   [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *headers])
    return [body]


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - signature fixed by the base class
        logger.debug("%s - %s", self.address_string(), format % args)


class WebhookServer:
    """Serves `webhook_app` over HTTP on a thread. Port 0 picks a free port; use start()/stop() or `with`."""

    def __init__(self, app: Callable, host: str = "127.0.0.1", port: int = 0):
        self._server = make_server(host, port, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/webhooks/exact"

    def start(self) -> WebhookServer:
        self._thread = threading.Thread(target=self._server.serve_forever, name="exact-webhooks", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> WebhookServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --- reading the events back (the sensor, the CLI) --------------------------------------------------------

def webhook_events_after(store: StateStore, after_id: int, limit: int = 1000) -> list[dict]:
    """Webhook audit events with an id above `after_id`, oldest first, detail parsed."""
    query = (sa.select(audit_log).where(audit_log.c.id > after_id, audit_log.c.event.in_(WEBHOOK_EVENTS))
             .order_by(audit_log.c.id).limit(limit))
    return _event_rows(store, query)


def latest_webhook_events(store: StateStore, limit: int = 20) -> list[dict]:
    """The newest `limit` webhook audit events, oldest first."""
    query = (sa.select(audit_log).where(audit_log.c.event.in_(WEBHOOK_EVENTS))
             .order_by(audit_log.c.id.desc()).limit(limit))
    return list(reversed(_event_rows(store, query)))


def _event_rows(store: StateStore, query) -> list[dict]:
    with store.engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(query)]
    for row in rows:
        row["detail"] = json.loads(row["detail"]) if row.get("detail") else {}
        row["transaction_ids"] = json.loads(row["transaction_ids"]) if row.get("transaction_ids") else []
    return rows


def dimensions_changed_since(store: StateStore, connection: str, after_id: int = 0) -> list[dict]:
    """The `webhook_dimensions_changed` events of one connection after an audit id: non-empty means stale."""
    query = (sa.select(audit_log.c.id, audit_log.c.at, audit_log.c.detail)
             .where(audit_log.c.id > after_id, audit_log.c.event == EVENT_DIMENSIONS_CHANGED,
                    audit_log.c.connection == connection).order_by(audit_log.c.id))
    with store.engine.connect() as conn:
        return [{"id": r.id, "at": r.at, "detail": json.loads(r.detail) if r.detail else {}}
                for r in conn.execute(query)]


def webhook_invalidations(store: StateStore, connection: str) -> dict[str, int]:
    """Dimension table → id of the newest `webhook_dimensions_changed` event about it: a stored snapshot that has not
    seen that event is re-read in full (snapshots.refresh_snapshot)."""
    out: dict[str, int] = {}
    for event in dimensions_changed_since(store, connection):
        name = event["detail"].get("dimension")
        if name:
            out[name] = max(out.get(name, 0), int(event["id"]))
    return out

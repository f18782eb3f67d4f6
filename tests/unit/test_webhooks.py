"""Exact webhook notifications: verified on the raw bytes, mapped to a connection, recorded as audit events,
and turned into replay runs by the `refresh_on_exact_webhooks` sensor.

A forged or altered notification must never reach the audit log (it would trigger runs), and the answer to
one must never contain the secret or the HashCode we expected.
"""

import io
import json

import dagster as dg
import pytest

from expensify_exact.config import load_project_config
from expensify_exact.core.webhooks import (
    EVENT_DIMENSIONS_CHANGED,
    EVENT_POSTED_ENTRY_DELETED,
    EVENT_RECEIVED,
    WebhookProcessor,
    WebhookRejected,
    dimensions_changed_since,
    sign,
    webhook_app,
    webhook_events_after,
)
from expensify_exact.defs import webhooks as webhook_defs
from expensify_exact.defs.resources import ConnectorResource
from expensify_exact.store import IntentKind, NewIntent
from tests.conftest import MAPPINGS

SECRET = "unit-webhook-secret-7Hq"
CONFIG = load_project_config(MAPPINGS)
CONN = CONFIG.connections[0]
DIVISION = CONN.exact.division
ENTRY_ID = "3f1e9a52-1c2d-4e5f-8a9b-0c1d2e3f4a5b"


def content_json(topic="GeneralJournalEntries", action="Update", key=ENTRY_ID, division=DIVISION,
                 separators=(",", ":")) -> bytes:
    content = {"Topic": topic, "ClientId": "9b1c2d3e-4f50-4617-8a9b-0c1d2e3f4a5b", "Division": division,
               "Action": action, "Key": key,
               "ExactOnlineEndpoint": f"https://start.exactonline.nl/api/v1/{division}/x(guid'{key}')",
               "EventCreatedOn": "2026-11-25T10:26:08.587"}
    return json.dumps(content, separators=separators).encode()


def envelope(content: bytes, secret: str = SECRET, hash_code: str | None = None) -> bytes:
    return b'{"Content":' + content + b',"HashCode":"' + (hash_code or sign(content, secret)).encode() + b'"}'


@pytest.fixture
def processor(store):
    return WebhookProcessor(CONFIG, store, lambda name: SECRET if name == CONN.name else None)


def call(app, body: bytes, method: str = "POST", path: str = "/webhooks/exact") -> tuple[int, dict]:
    seen = {}

    def start_response(status, headers):
        seen["status"] = int(status.split()[0])

    out = b"".join(app({"REQUEST_METHOD": method, "PATH_INFO": path, "CONTENT_LENGTH": str(len(body)),
                        "wsgi.input": io.BytesIO(body)}, start_response))
    return seen["status"], json.loads(out)


def post_entry_to_ledger(store, report_id="R00WEBHOOK01", entry_id=ENTRY_ID, entry_number=26900042):
    body = {"JournalCode": "90", "GeneralJournalEntryLines": []}
    store.intents_write(CONN.name, report_id, [NewIntent(IntentKind.POST, entry_id, "h" * 64, body, "2026-11-20",
                                                         ["1001", "1002"], 4680)], run_id="run-1")
    store.intent_mark_posted(CONN.name, report_id, IntentKind.POST, entry_id, entry_number)


# --- signature ----------------------------------------------------------------------------------------------

def test_the_hashcode_is_checked_on_the_content_bytes_as_received_not_on_a_reserialization(processor, store):
    spaced = content_json(topic="Costcenters", separators=(", ", ": "))  # not how json.dumps would compact it
    event, _ = processor.handle(envelope(spaced))
    assert event == EVENT_DIMENSIONS_CHANGED
    # The same Content, compacted, with the HashCode of the spaced bytes: a re-serializing receiver would accept it.
    compact = json.dumps(json.loads(spaced), separators=(",", ":")).encode()
    with pytest.raises(WebhookRejected) as refused:
        processor.handle(envelope(compact, hash_code=sign(spaced, SECRET)))
    assert refused.value.status == 401
    assert len(webhook_events_after(store, 0)) == 1


def test_a_tampered_content_is_refused_with_401_and_records_nothing(processor, store):
    original = content_json(action="Update")
    body = envelope(original).replace(b'"Action":"Update"', b'"Action":"Delete"')
    with pytest.raises(WebhookRejected) as refused:
        processor.handle(body)
    assert refused.value.status == 401
    assert webhook_events_after(store, 0) == []


def test_a_notification_signed_with_another_secret_is_refused(processor, store):
    with pytest.raises(WebhookRejected) as refused:
        processor.handle(envelope(content_json(), secret="someone-elses-secret"))
    assert refused.value.status == 401
    assert webhook_events_after(store, 0) == []


def test_a_connection_without_a_stored_secret_accepts_nothing(store):
    processor = WebhookProcessor(CONFIG, store, lambda name: None)
    with pytest.raises(WebhookRejected) as refused:
        processor.handle(envelope(content_json()))
    assert refused.value.status == 401


def test_a_lowercase_copy_of_the_right_hashcode_is_the_same_digest(processor):
    content = content_json()
    event, _ = processor.handle(envelope(content, hash_code=sign(content, SECRET).lower()))
    assert event == EVENT_RECEIVED


@pytest.mark.parametrize("body", [
    b"not json at all",
    b'{"HashCode":"ABC","Content":{}}',  # keys in the wrong order: not what Exact sends
    b'{"Content":[1,2],"HashCode":"' + sign(b"[1,2]", SECRET).encode() + b'"}',
    b'{"Content":{"Topic":"GLAccounts"},"HashCode":"' + sign(b'{"Topic":"GLAccounts"}', SECRET).encode() + b'"}',
    b'{"Content":{"Topic":"GLAccounts","Division":12,,},"HashCode":"00"}',
])
def test_a_body_that_is_not_a_notification_is_refused_with_400(processor, store, body):
    with pytest.raises(WebhookRejected) as refused:
        processor.handle(body)
    assert refused.value.status == 400
    assert webhook_events_after(store, 0) == []


# --- what a verified notification means ---------------------------------------------------------------------

@pytest.mark.parametrize("topic, dimension", [("GLAccounts", "gl_accounts"), ("Costcenters", "cost_centers"),
                                              ("CostUnits", "cost_units")])
def test_a_changed_dimension_marks_the_connections_snapshot_stale(processor, store, topic, dimension):
    event, _ = processor.handle(envelope(content_json(topic=topic, key="c0ffee00-0000-4000-8000-000000000001")))
    assert event == EVENT_DIMENSIONS_CHANGED
    [row] = dimensions_changed_since(store, CONN.name)
    assert row["detail"] == {"topic": topic, "division": DIVISION, "action": "Update", "dimension": dimension,
                             "key": "c0ffee00-0000-4000-8000-000000000001",
                             "event_created_on": "2026-11-25T10:26:08.587"}


def test_deleting_an_entry_the_connector_posted_is_flagged_with_its_report(processor, store):
    post_entry_to_ledger(store)
    event, _ = processor.handle(envelope(content_json(action="Delete", key=ENTRY_ID.upper())))
    assert event == EVENT_POSTED_ENTRY_DELETED
    [row] = webhook_events_after(store, 0)
    assert (row["connection"], row["report_id"], row["entry_id"], row["entry_number"]) == (
        CONN.name, "R00WEBHOOK01", ENTRY_ID, 26900042)
    assert row["transaction_ids"] == ["1001", "1002"] and row["partition_date"] == "2026-11-20"


def test_deleting_an_entry_the_connector_did_not_post_is_only_recorded(processor, store):
    post_entry_to_ledger(store)
    event, _ = processor.handle(envelope(content_json(action="Delete", key="99999999-0000-4000-8000-000000000000")))
    assert event == EVENT_RECEIVED
    assert [r["event"] for r in webhook_events_after(store, 0)] == [EVENT_RECEIVED]


def test_the_division_picks_the_connection_and_its_secret(store):
    belgian = CONN.model_copy(update={"name": "vermeerhals-be",
                                      "exact": CONN.exact.model_copy(update={"division": 234567})})
    config = CONFIG.model_copy(update={"connections": [CONN, belgian]})
    secrets = {CONN.name: SECRET, "vermeerhals-be": "belgian-secret"}
    processor = WebhookProcessor(config, store, secrets.get)
    processor.handle(envelope(content_json(topic="GLAccounts", division=234567), secret="belgian-secret"))
    assert [r["connection"] for r in webhook_events_after(store, 0)] == ["vermeerhals-be"]
    # The Dutch secret does not vouch for a notification about the Belgian division.
    with pytest.raises(WebhookRejected):
        processor.handle(envelope(content_json(topic="GLAccounts", division=234567), secret=SECRET))


def test_a_division_no_connection_has_is_recorded_without_a_connection(processor, store):
    event, _ = processor.handle(envelope(content_json(topic="GLAccounts", division=999999)))
    assert event == EVENT_RECEIVED
    [row] = webhook_events_after(store, 0)
    assert row["connection"] is None and "999999" in row["detail"]["note"]


# --- the WSGI app ---------------------------------------------------------------------------------------------

def test_the_app_answers_200_401_and_400_without_leaking_the_secret_or_the_expected_hash(processor):
    app = webhook_app(processor)
    content = content_json(topic="GLAccounts")
    assert call(app, envelope(content)) == (200, {"ok": True, "event": EVENT_DIMENSIONS_CHANGED})
    status, answer = call(app, envelope(content, secret="wrong"))
    assert status == 401
    status400, answer400 = call(app, b"{")
    assert status400 == 400
    for text in (json.dumps(answer), json.dumps(answer400)):
        assert SECRET not in text and sign(content, SECRET) not in text


def test_the_subscription_ping_with_an_empty_body_gets_200_and_records_nothing(processor, store):
    assert call(webhook_app(processor), b"")[0] == 200
    assert webhook_events_after(store, 0) == []


def test_other_methods_and_oversized_bodies_are_refused(processor):
    app = webhook_app(processor)
    assert call(app, b"", method="GET")[0] == 405
    assert call(app, b"", method="GET", path="/healthz")[0] == 200
    assert call(app, b"x" * (64 * 1024 + 1))[0] == 413


# --- the sensor -------------------------------------------------------------------------------------------------

@pytest.fixture
def connector(state_url):
    return ConnectorResource(mappings_dir=str(MAPPINGS), state_url=state_url)


def quarantine(store, report_id="R00QUAR00001", day="2026-11-18"):
    store.quarantine_put(CONN.name, report_id, partition_date=day, transaction_ids=["2001"], content_hash=None,
                         reasons=[{"code": "UNKNOWN_COST_CENTER", "transaction_id": "2001", "dimension": "cost_center",
                                   "value": "EHV", "message": "cost center EHV does not exist in Exact"}])


def evaluate(connector, cursor=None):
    sensor = webhook_defs.build(CONFIG).sensors[0]
    with dg.build_sensor_context(cursor=cursor, resources={"connector": connector}) as context:
        return sensor(context)


def test_the_sensor_is_off_by_default_described_and_targets_the_replay_job():
    sensor = webhook_defs.build(CONFIG).sensors[0]
    assert sensor.name == "refresh_on_exact_webhooks"
    assert sensor.default_status == dg.DefaultSensorStatus.STOPPED
    assert "quarantined" in sensor.description
    assert sensor.job_name == "replay_quarantine"


def test_a_dimension_change_with_quarantined_reports_requests_one_replay_run_and_moves_the_cursor(
        processor, store, connector):
    quarantine(store)
    processor.handle(envelope(content_json(topic="Costcenters")))
    processor.handle(envelope(content_json(topic="GLAccounts")))
    result = evaluate(connector)
    [request] = result.run_requests
    assert request.job_name == "replay_quarantine"
    assert request.tags["expensify_exact/connection"] == CONN.name
    last_id = webhook_events_after(store, 0)[-1]["id"]
    assert request.run_key == f"exact_webhooks:{last_id}"
    assert result.cursor == str(last_id)
    assert not evaluate(connector, cursor=result.cursor).run_requests


def test_a_dimension_change_with_nothing_quarantined_requests_no_run(processor, store, connector):
    processor.handle(envelope(content_json(topic="GLAccounts")))
    result = evaluate(connector)
    assert not result.run_requests
    assert "nothing is quarantined" in result.skip_reason.skip_message


def test_a_deleted_posted_entry_is_reported_by_the_sensor_but_requests_no_run(processor, store, connector):
    quarantine(store)
    post_entry_to_ledger(store)
    processor.handle(envelope(content_json(action="Delete")))
    result = evaluate(connector)
    assert not result.run_requests
    assert "R00WEBHOOK01" in result.skip_reason.skip_message and "deleted" in result.skip_reason.skip_message


def test_the_project_definitions_carry_the_sensor_and_the_job_it_names():
    from expensify_exact.definitions import build_defs

    defs = build_defs(str(MAPPINGS))
    sensor = defs.resolve_sensor_def("refresh_on_exact_webhooks")
    assert defs.resolve_job_def(sensor.job_name).name == "replay_quarantine"

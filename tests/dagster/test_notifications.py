"""The digest by e-mail and the alert sensors, delivered for real: mail to an SMTP server on 127.0.0.1 (aiosmtpd),
chat messages to a webhook receiver on 127.0.0.1. Each problem is staged in the sandbox or the state database, the
sensor is evaluated through Dagster, and the alert must arrive once — a second tick sends nothing. Runs cover
connection × day partitions: an alert goes to the connections a run covered, or to the one that failed in it."""

from __future__ import annotations

import io
import json
import logging
import os
from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest

from expensify_exact.api.exact.tokens import ExactTokens
from expensify_exact.cli.main import main
from expensify_exact.config import load_project_config
from expensify_exact.core.connections import VaultTokenStore
from expensify_exact.defs import alerts as alert_defs
from expensify_exact.defs import assets, jobs, reconciliation, resources
from expensify_exact.defs import overview as overview_defs
from expensify_exact.defs.jobs import MAIN_JOB_NAME
from expensify_exact.defs.partitions import partition_key
from expensify_exact.defs.resources import ConnectorResource
from expensify_exact.defs.runs import run_range
from expensify_exact.store import StateStore, quarantine
from expensify_exact.store.vault import CredentialVault
from expensify_exact_sandbox import seed as S
from tests.conftest import add_belgian_connection, write_mappings
from tests.receivers import SmtpInbox, WebhookReceiver, self_signed_certificate

CONNECTION = "vermeerhals-nl"
BELGIAN = "vermeerhals-be"
GIFTS = S._report_id(101)


@pytest.fixture
def inbox():
    with SmtpInbox() as server:
        yield server


@pytest.fixture
def webhook():
    with WebhookReceiver() as receiver:
        yield receiver


@pytest.fixture
def notified(tmp_path, sandbox, inbox, webhook, state_url, monkeypatch):
    """Mappings pointed at the sandbox with mail and alerts configured, credentials and the webhook URL stored."""
    sandbox.expensify.set_knobs(rate_limiting=False)
    sandbox.exact.set_knobs(minutely_limit=10_000)
    monkeypatch.delenv("EXPENSIFY_EXACT_DIGEST_DIR", raising=False)
    mappings = write_mappings(
        tmp_path / "mappings", sandbox, expensify__poll_interval_seconds=0.2,
        notify={"smtp": {"host": "127.0.0.1", "port": inbox.port, "security": "plain",
                         "sender": "connector@vermeerhals.nl"},
                "digest": {"to": ["accountant@vermeerhals.nl"]},
                "alerts": {"email_to": ["ops@vermeerhals.nl"], "webhook_format": "slack",
                           "quarantine_max_age_days": 3}})
    assert _cli(mappings, state_url, "secrets", "set", "--connection", CONNECTION, "--from-env") == 0
    monkeypatch.setattr("sys.stdin", io.StringIO(webhook.url + "\n"))
    assert _cli(mappings, state_url, "secrets", "set", "--connection", CONNECTION, "--stdin", "alert_webhook_url") == 0
    return mappings


def _cli(mappings, state_url, *args) -> int:
    return main(["--mappings", str(mappings), "--state-url", state_url, *args])


def _defs(mappings) -> dg.Definitions:
    config = load_project_config(mappings)
    return dg.Definitions.merge(*(m.build(config) for m in (assets, jobs, resources, reconciliation, alert_defs)))


def _execute(defs, job, instance, connector, day, connection=CONNECTION):
    return defs.resolve_job_def(job).execute_in_process(
        instance=instance, resources={"connector": connector}, partition_key=partition_key(connection, day),
        raise_on_error=False)


def _sensor(defs: dg.Definitions, name: str):
    return next(s for s in defs.sensors if s.name == name)


def _tick(defs, name, instance, connector, cursor=None):
    with dg.build_sensor_context(instance=instance, resources={"connector": connector}, cursor=cursor,
                                 definitions=defs) as context:
        return _sensor(defs, name).evaluate_tick(context)


def _alerts(inbox, webhook, kind_text: str) -> tuple[list, list]:
    mails = [m for m in inbox.messages if kind_text in m["Subject"]]
    posts = [p for p in webhook.posts if kind_text in p["json"]["text"]]
    return mails, posts


# --- the digest ---------------------------------------------------------------------------------------

def test_the_demo_days_digest_arrives_once_with_markdown_and_html_parts(notified, sandbox, state_url, instance,
                                                                        inbox, tmp_path, capsys, monkeypatch):
    connector = ConnectorResource(mappings_dir=str(notified), state_url=state_url)
    defs = _defs(notified)
    day = (sandbox.seed.today - timedelta(days=7)).isoformat()  # the day the Gifts report was approved
    for job in (MAIN_JOB_NAME, reconciliation.DAILY_JOB_NAME):
        assert _execute(defs, job, instance, connector, day).success, job

    assert len(inbox.messages) == 1
    mail = inbox.messages[0]
    assert inbox.envelopes[0] == ("connector@vermeerhals.nl", ["accountant@vermeerhals.nl"])
    assert mail.get_content_type() == "multipart/alternative"
    assert CONNECTION in mail["Subject"] and "Expense posting digest" in mail["Subject"]
    text = mail.get_body(("plain",)).get_content()
    html = mail.get_body(("html",)).get_content()
    stored = (tmp_path / "dagster_home" / "digests" / CONNECTION / f"{day}.md").read_text()
    assert text.replace("\r\n", "\n") == stored  # the Markdown digest as written to disk (SMTP sends CRLF)
    assert GIFTS in text and "UNMAPPED_CATEGORY" in text
    assert html.lstrip().startswith("<!DOCTYPE html>") and "<li>" in html
    assert GIFTS in html and "UNMAPPED_CATEGORY" in html

    # The digest job again, and the CLI: the day was mailed, so nothing more goes out unless asked.
    assert _execute(defs, reconciliation.DAILY_JOB_NAME, instance, connector, day).success
    assert _cli(notified, state_url, "digest", "--date", day, "--send") == 0
    assert f"{CONNECTION} {day}: digest already sent" in capsys.readouterr().err
    assert len(inbox.messages) == 1
    assert _cli(notified, state_url, "digest", "--date", day, "--resend") == 0
    assert len(inbox.messages) == 2

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    capsys.readouterr()
    _cli(notified, state_url, "status", "--json")
    notify = json.loads(capsys.readouterr().out)["connections"][CONNECTION]["notify"]
    assert notify == {"digest_to": 1, "alert_channels": ["email", "webhook"], "last_digest_mailed": day}


# --- one test per alert kind --------------------------------------------------------------------------

def test_a_report_waiting_in_quarantine_too_long_is_alerted_once(notified, state_url, instance, inbox, webhook):
    connector = ConnectorResource(mappings_dir=str(notified), state_url=state_url)
    store = StateStore(state_url)
    store.quarantine_put(CONNECTION, GIFTS, partition_date="2026-11-02", content_hash=None, transaction_ids=["t1"],
                         reasons=[{"code": "UNMAPPED_CATEGORY", "message": "category 'Gifts' maps to nothing"}])
    store.quarantine_put(CONNECTION, "R-FRESH", partition_date="2026-11-09", content_hash=None,
                         transaction_ids=["t2"], reasons=[{"code": "UNKNOWN_COST_CENTER", "message": "EHV"}])
    with store.engine.begin() as conn:  # the Gifts item has waited 4 days, longer than the configured 3
        conn.execute(quarantine.update().where(quarantine.c.report_id == GIFTS)
                     .values(first_seen_at=datetime.now(UTC) - timedelta(days=4)))
    defs = _defs(notified)

    _tick(defs, alert_defs.QUARANTINE_SENSOR, instance, connector)
    mails, posts = _alerts(inbox, webhook, "waits in quarantine")
    assert len(mails) == 1 and len(posts) == 1
    assert GIFTS in mails[0]["Subject"] and "R-FRESH" not in posts[0]["json"]["text"]
    assert mails[0].get_body(("plain",)).get_content().count("quarantine replay") == 1

    _tick(defs, alert_defs.QUARANTINE_SENSOR, instance, connector)
    assert _alerts(inbox, webhook, "waits in quarantine") == (mails, posts)


def test_an_idle_refresh_token_is_alerted_once(notified, state_url, instance, inbox, webhook):
    connector = ConnectorResource(mappings_dir=str(notified), state_url=state_url)
    store = StateStore(state_url)
    tokens = VaultTokenStore(store, CredentialVault(store))
    renewed = datetime.now(UTC) - timedelta(days=26)
    tokens.save(CONNECTION, ExactTokens(access_token="a", refresh_token="r", issued_at=renewed,
                                        access_expires_at=renewed + timedelta(minutes=10)))
    defs = _defs(notified)

    _tick(defs, alert_defs.TOKEN_SENSOR, instance, connector)
    mails, posts = _alerts(inbox, webhook, "refresh token idle")
    assert len(mails) == 1 and len(posts) == 1
    assert "idle for 26 days" in posts[0]["json"]["text"] and "authorize --connection" in posts[0]["json"]["text"]

    _tick(defs, alert_defs.TOKEN_SENSOR, instance, connector)
    assert _alerts(inbox, webhook, "refresh token idle") == (mails, posts)


def test_a_connection_failing_within_a_run_is_alerted_once_through_the_failed_connection_sensor(
        notified, sandbox, state_url, instance, inbox, webhook):
    """The run goes on for the other connections and succeeds; the one Exact refused is told, with its day."""
    connector = ConnectorResource(mappings_dir=str(notified), state_url=state_url)
    sandbox.exact.set_knobs(accessible_divisions={S.SECOND_DIVISION})  # the app lost access to the division
    defs = _defs(notified)
    day = (sandbox.seed.today - timedelta(days=3)).isoformat()
    result = _execute(defs, MAIN_JOB_NAME, instance, connector, day)
    assert result.success

    first = _tick(defs, alert_defs.CONNECTION_FAILED_SENSOR, instance, connector)
    _tick(defs, alert_defs.CONNECTION_FAILED_SENSOR, instance, connector, cursor=first.cursor)
    _tick(defs, alert_defs.CONNECTION_FAILED_SENSOR, instance, connector)  # even without the cursor: sent before

    mails, posts = _alerts(inbox, webhook, "post_approved_expenses failed")
    assert len(mails) == 1 and len(posts) == 1
    text = posts[0]["json"]["text"]
    assert day in text and result.run_id in text and "123456" in text  # the division it could not reach
    assert mails[0]["To"] == "ops@vermeerhals.nl" and CONNECTION in mails[0]["Subject"]


def test_a_failed_run_is_alerted_once_to_each_connection_its_partitions_covered(notified, sandbox, state_url,
                                                                               instance, inbox, webhook, tmp_path):
    add_belgian_connection(notified, BELGIAN, alert_webhook=False)  # the same alert e-mail, no alert webhook
    defs = _defs(notified)
    (tmp_path / "not_a_directory").write_text("")
    unusable = ConnectorResource(mappings_dir=str(notified),  # a state DB that cannot open fails every step
                                 state_url=f"sqlite:///{tmp_path / 'not_a_directory' / 'state.db'}")
    days = [(sandbox.seed.today - timedelta(days=n)).isoformat() for n in (3, 2)]
    result = defs.resolve_job_def(MAIN_JOB_NAME).execute_in_process(
        instance=instance, resources={"connector": unusable}, raise_on_error=False,
        tags={"dagster/asset_partition_range_start": partition_key(CONNECTION, days[0]),
              "dagster/asset_partition_range_end": partition_key(BELGIAN, days[1])})
    assert not result.success
    failure = instance.get_records_for_run(result.run_id, of_type=dg.DagsterEventType.RUN_FAILURE).records
    assert len(failure) == 1
    connector = ConnectorResource(mappings_dir=str(notified), state_url=state_url)
    sensor = _sensor(defs, alert_defs.RUN_FAILED_SENSOR)

    for _ in range(2):  # the sensor sees the same failure twice (e.g. a daemon restart): one alert each
        with dg.build_run_status_sensor_context(
                sensor_name=sensor.name, dagster_event=failure[0].event_log_entry.dagster_event,
                dagster_instance=instance, dagster_run=instance.get_run_by_id(result.run_id),
                resources={"connector": connector}).for_run_failure() as context:
            sensor(context)

    mails, posts = _alerts(inbox, webhook, "post_approved_expenses failed")
    assert sorted(m["Subject"].rsplit("(", 1)[1] for m in mails) == [f"{BELGIAN})", f"{CONNECTION})"]
    assert len(posts) == 1, "only the Dutch connection has a chat webhook"
    text = posts[0]["json"]["text"]
    assert f"{days[0]}..{days[1]}" in text and result.run_id in text and "unable to open database file" in text


def test_a_failed_overview_refresh_alerts_no_customer(notified, state_url, instance, inbox, webhook, tmp_path):
    """The overview is about every connection at once and none in particular: its failure is the operator's, seen in
    the run, not 500 customers' alert channels."""
    config = load_project_config(notified)
    defs = dg.Definitions.merge(*(m.build(config) for m in (overview_defs, resources, alert_defs)))
    (tmp_path / "not_a_directory").write_text("")
    unusable = ConnectorResource(mappings_dir=str(notified),
                                 state_url=f"sqlite:///{tmp_path / 'not_a_directory' / 'state.db'}")
    result = defs.resolve_job_def(overview_defs.JOB_NAME).execute_in_process(
        instance=instance, resources={"connector": unusable}, raise_on_error=False)
    assert not result.success
    [failure] = instance.get_records_for_run(result.run_id, of_type=dg.DagsterEventType.RUN_FAILURE).records
    sensor = _sensor(defs, alert_defs.RUN_FAILED_SENSOR)
    with dg.build_run_status_sensor_context(
            sensor_name=sensor.name, dagster_event=failure.event_log_entry.dagster_event,
            dagster_instance=instance, dagster_run=instance.get_run_by_id(result.run_id),
            resources={"connector": ConnectorResource(mappings_dir=str(notified), state_url=state_url)},
    ).for_run_failure() as context:
        sensor(context)

    assert _alerts(inbox, webhook, overview_defs.JOB_NAME) == ([], [])
    assert inbox.messages == [] and webhook.posts == []


def test_reports_deferred_because_exacts_daily_budget_ran_out_are_alerted_once(notified, sandbox, state_url,
                                                                                instance, inbox, webhook):
    connector = ConnectorResource(mappings_dir=str(notified), state_url=state_url)
    sandbox.exact.set_knobs(daily_limit=60)  # the dimension reads leave ~50 calls, the connector's reserve
    today = sandbox.seed.today
    summary = run_range(today - timedelta(days=10), today - timedelta(days=1), mappings_dir=str(notified),
                        state_url=state_url, instance=instance)
    deferred = sorted(summary.outcomes.loc[summary.outcomes["outcome"] == "deferred", "report_id"])
    assert summary.success and deferred
    defs = _defs(notified)

    _tick(defs, alert_defs.DEFERRED_SENSOR, instance, connector)
    mails, posts = _alerts(inbox, webhook, "daily budget ran out")
    assert len(mails) == 1 and len(posts) == 1
    assert f"{len(deferred)} report(s) deferred" in mails[0]["Subject"]
    assert all(report_id in posts[0]["json"]["text"] for report_id in deferred)

    _tick(defs, alert_defs.DEFERRED_SENSOR, instance, connector)
    assert _alerts(inbox, webhook, "daily budget ran out") == (mails, posts)


def test_exact_refusing_the_connection_with_a_403_is_alerted_once_with_its_reason(notified, sandbox, state_url,
                                                                                  instance, inbox, webhook):
    """Exact blocks the posting endpoint (403 BlockedByErrorLimit) after the first error of the hour: the run does
    not fail, so no run-failure alert; the deferred-reports sensor must tell the operators, once."""
    connector = ConnectorResource(mappings_dir=str(notified), state_url=state_url)
    sandbox.exact.set_knobs(error_budget=1)  # others using this app spent the hour's errors but one
    sandbox.faults.arm("exact.post_entry", "http_500_before_store")
    today = sandbox.seed.today
    summary = run_range(today - timedelta(days=10), today - timedelta(days=1), mappings_dir=str(notified),
                        state_url=state_url, instance=instance)
    deferred = sorted(summary.outcomes.loc[summary.outcomes["outcome"] == "deferred", "report_id"])
    assert summary.success and deferred
    assert sandbox.exact.stats["blocked_by_error_limit"] >= 1
    defs = _defs(notified)

    _tick(defs, alert_defs.DEFERRED_SENSOR, instance, connector)
    mails, posts = _alerts(inbox, webhook, "Exact refused the connection")
    assert len(mails) == 1 and len(posts) == 1
    assert f"{len(deferred)} report(s) deferred" in mails[0]["Subject"]
    text = posts[0]["json"]["text"]
    assert "BlockedByErrorLimit" in text and f"preflight --connection {CONNECTION}" in text
    assert all(report_id in text for report_id in deferred)

    _tick(defs, alert_defs.DEFERRED_SENSOR, instance, connector)
    assert _alerts(inbox, webhook, "Exact refused the connection") == (mails, posts)


def test_reconciliation_findings_are_alerted_once_per_reconciliation(notified, sandbox, state_url, instance, inbox,
                                                                     webhook):
    connector = ConnectorResource(mappings_dir=str(notified), state_url=state_url)
    defs = _defs(notified)
    day = (sandbox.seed.today - timedelta(days=2)).isoformat()
    assert _execute(defs, MAIN_JOB_NAME, instance, connector, day).success
    entry_ids = [r.entry_id for r in StateStore(state_url).ledger_rows(CONNECTION, status="posted")]
    assert entry_ids
    sandbox.exact.delete_entry(entry_ids[0])  # someone deleted a posted entry in Exact
    assert _execute(defs, reconciliation.DAILY_JOB_NAME, instance, connector, day).success

    first = _tick(defs, alert_defs.RECONCILIATION_SENSOR, instance, connector)
    mails, posts = _alerts(inbox, webhook, "reconciliation found")
    assert len(mails) == 1 and len(posts) == 1
    assert "MISSING_IN_EXACT" in posts[0]["json"]["text"] and day in mails[0]["Subject"]

    _tick(defs, alert_defs.RECONCILIATION_SENSOR, instance, connector, cursor=first.cursor)
    _tick(defs, alert_defs.RECONCILIATION_SENSOR, instance, connector)  # even without the cursor: sent before
    assert _alerts(inbox, webhook, "reconciliation found") == (mails, posts)


def test_digest_over_starttls_with_the_vaults_login_and_no_notification_secret_leaks(
        tmp_path, sandbox, state_url, instance, webhook, monkeypatch, capfd, caplog):
    caplog.set_level(logging.DEBUG)
    cert, key = self_signed_certificate(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", cert)  # the client trusts this test server's certificate, nothing weaker
    password = "smtp-pw-" + os.urandom(8).hex()
    sandbox.expensify.set_knobs(rate_limiting=False)
    sandbox.exact.set_knobs(minutely_limit=10_000)
    monkeypatch.delenv("EXPENSIFY_EXACT_DIGEST_DIR", raising=False)
    with SmtpInbox(tls=(cert, key), login=("digest-bot", password)) as inbox:
        mappings = write_mappings(
            tmp_path / "mappings", sandbox, expensify__poll_interval_seconds=0.2,
            notify={"smtp": {"host": "127.0.0.1", "port": inbox.port, "security": "starttls",
                             "sender": "connector@vermeerhals.nl"},
                    "digest": {"to": ["accountant@vermeerhals.nl"]},
                    "alerts": {"email_to": ["ops@vermeerhals.nl"], "webhook_format": "teams"}})
        assert _cli(mappings, state_url, "secrets", "set", "--connection", CONNECTION, "--from-env") == 0
        monkeypatch.setenv("SMTP_USERNAME", "digest-bot")
        monkeypatch.setenv("SMTP_PASSWORD", password)
        monkeypatch.setenv("ALERT_WEBHOOK_URL", webhook.url)
        assert _cli(mappings, state_url, "secrets", "set", "--connection", CONNECTION, "--from-env") == 0
        connector = ConnectorResource(mappings_dir=str(mappings), state_url=state_url)
        defs = _defs(mappings)
        day = (sandbox.seed.today - timedelta(days=7)).isoformat()
        for job in (MAIN_JOB_NAME, reconciliation.DAILY_JOB_NAME):
            assert _execute(defs, job, instance, connector, day).success, job
        sandbox.exact.set_knobs(accessible_divisions={S.SECOND_DIVISION})
        assert _execute(defs, MAIN_JOB_NAME, instance, connector, day).success
        _tick(defs, alert_defs.CONNECTION_FAILED_SENSOR, instance, connector)

    assert inbox.logins == ["digest-bot", "digest-bot"]  # the digest and the alert, each after STARTTLS
    assert [m["To"] for m in inbox.messages] == ["accountant@vermeerhals.nl", "ops@vermeerhals.nl"]
    card = webhook.posts[0]["json"]  # Teams: a MessageCard
    assert card["@type"] == "MessageCard" and "post_approved_expenses failed" in card["title"]

    out, err = capfd.readouterr()
    logs = "\n".join(f"{r.getMessage()} {r.args}" for r in caplog.records)
    token = webhook.url.rsplit("/", 1)[1]
    for secret in (password, token):
        assert secret not in out + err + logs
        hits = [p for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
        assert hits == [], hits  # not in the Dagster event log, the stored values, the digests or the state DB


def test_the_code_location_loads_with_the_alert_sensors_running_by_default(notified):
    from expensify_exact.definitions import build_defs

    defs = build_defs(str(notified))
    dg.Definitions.validate_loadable(defs)  # every sensor's `connector` resource is provided
    names = {alert_defs.RUN_FAILED_SENSOR, alert_defs.QUARANTINE_SENSOR, alert_defs.TOKEN_SENSOR,
             alert_defs.DEFERRED_SENSOR, alert_defs.RECONCILIATION_SENSOR, alert_defs.CONNECTION_FAILED_SENSOR}
    statuses = {s.name: s.default_status for s in defs.sensors if s.name in names}
    assert statuses == {name: dg.DefaultSensorStatus.RUNNING for name in names}

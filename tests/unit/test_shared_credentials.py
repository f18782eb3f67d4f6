"""Shared Expensify credentials: which connections export together, how one export is split back by policy, what
the config refuses, where the vault keeps the partner login, and that one credential's requests count in one window.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from urllib.parse import parse_qs

import httpx
import pytest
import yaml

from expensify_exact.config import load_project_config
from expensify_exact.core.connections import (
    EXPENSIFY_USER_ID,
    EXPENSIFY_USER_SECRET,
    build_expensify_client,
    missing_expensify_credentials,
    secret_scope,
)
from expensify_exact.core.exports import by_credential, credential_of, split_by_policy
from expensify_exact.errors import ConfigError, VaultError
from expensify_exact.store.vault import CredentialVault
from tests.conftest import write_mappings
from tests.factories import FakeClock

NL, BE, DE = "vermeerhals-nl", "vermeerhals-be", "vermeerhals-de"
NL_POLICY, BE_POLICY, DE_POLICY = "7A3F9C21B4D05E68", "BE00000000000001", "DE00000000000001"


def _mappings(tmp_path, *extra: dict, first: dict | None = None):
    """The shipped mappings with `first` merged into the Dutch connection's `expensify` and more connections after it,
    each a copy of the Dutch one with its own division and the given keys (`expensify` ones merged)."""
    mappings = write_mappings(tmp_path / "mappings")
    path = mappings / "connections.yaml"
    document = yaml.safe_load(path.read_text())
    base = document["connections"][0]
    base["expensify"].update(first or {})
    for n, spec in enumerate(extra, start=1):
        conn = yaml.safe_load(yaml.safe_dump(base))
        conn["exact"]["division"] = 200000 + n
        conn["expensify"].pop("credential", None)
        conn["expensify"].update(spec.get("expensify", {}))
        conn.update({key: value for key, value in spec.items() if key != "expensify"})
        document["connections"].append(conn)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return mappings


def _line_of(path, text: str, occurrence: int = 1) -> int:
    found = [n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line]
    return found[occurrence - 1]


# --- grouping and splitting ------------------------------------------------------------------------------

def test_connections_naming_one_credential_group_together_and_the_others_keep_their_own_name(tmp_path):
    mappings = _mappings(tmp_path, {"name": BE, "expensify": {"policy_ids": [BE_POLICY], "credential": "firm"}},
                         {"name": DE, "expensify": {"policy_ids": [DE_POLICY]}}, first={"credential": "firm"})
    config = load_project_config(mappings)
    nl, be, de = config.connections
    assert [credential_of(c) for c in (nl, be, de)] == ["firm", "firm", DE]
    assert {name: [c.name for c in group] for name, group in by_credential(config.connections).items()} == {
        "firm": [NL, BE], DE: [DE]}


def test_a_connection_may_share_the_login_another_connection_keeps_under_its_own_name(tmp_path):
    """`credential: vermeerhals-nl` on a second connection reuses the secrets the first already has stored."""
    mappings = _mappings(tmp_path, {"name": BE, "expensify": {"policy_ids": [BE_POLICY], "credential": NL}})
    config = load_project_config(mappings)
    assert [[c.name for c in group] for group in by_credential(config.connections).values()] == [[NL, BE]]


def test_one_export_is_split_back_by_policy_and_a_report_of_no_ones_policy_is_left_out(tmp_path):
    mappings = _mappings(tmp_path, {"name": BE, "expensify": {"policy_ids": [BE_POLICY, "BE00000000000002"],
                                                              "credential": "firm"}}, first={"credential": "firm"})
    group = load_project_config(mappings).connections
    reports = [{"reportID": "R1", "policyID": NL_POLICY}, {"reportID": "R2", "policyID": "BE00000000000002"},
               {"reportID": "R3", "policyID": "FFFF000000000000"}, {"reportID": "R4", "policyID": BE_POLICY},
               {"reportID": "R5"}]
    split = split_by_policy(reports, list(group))
    assert {name: [r["reportID"] for r in rows] for name, rows in split.items()} == {NL: ["R1"], BE: ["R2", "R4"]}
    assert split_by_policy([], list(group)) == {NL: [], BE: []}


# --- config validation -----------------------------------------------------------------------------------

def test_a_policy_listed_by_two_connections_of_one_credential_is_refused_at_its_line(tmp_path):
    mappings = _mappings(tmp_path, {"name": BE, "expensify": {"policy_ids": [BE_POLICY, NL_POLICY],
                                                              "credential": "firm"}}, first={"credential": "firm"})
    path = mappings / "connections.yaml"
    with pytest.raises(ConfigError) as error:
        load_project_config(mappings)
    assert error.value.path == str(path)
    assert error.value.line == _line_of(path, NL_POLICY, occurrence=2)
    assert f"policy {NL_POLICY} is listed by connections {NL} and {BE}" in str(error.value)
    assert "'firm'" in str(error.value)


def test_two_connections_with_their_own_logins_may_list_the_same_policy(tmp_path):
    """Two partner logins are two exports: nothing has to be split between them."""
    mappings = _mappings(tmp_path, {"name": BE, "expensify": {"policy_ids": [NL_POLICY]}})
    assert [c.name for c in load_project_config(mappings).connections] == [NL, BE]


@pytest.mark.parametrize("key, value", [("expensify.endpoint_url", "http://127.0.0.1:9999/Integration-Server/x"),
                                        ("expensify.timestamp_timezone", "Europe/Amsterdam"),
                                        ("expensify.poll_timeout_seconds", 60),
                                        ("timezone", "America/Los_Angeles")])
def test_connections_of_one_credential_with_different_export_settings_are_refused_at_the_line(tmp_path, key, value):
    """One client and one export job, selecting approval days in one zone, serve every connection of a credential."""
    section, _, name = key.rpartition(".")
    belgian = {"name": BE, "expensify": {"policy_ids": [BE_POLICY], "credential": "firm"}}
    (belgian[section] if section else belgian)[name] = value
    path = _mappings(tmp_path, belgian, first={"credential": "firm"}) / "connections.yaml"
    with pytest.raises(ConfigError) as error:
        load_project_config(path.parent)
    assert error.value.path == str(path)
    assert error.value.line == _line_of(path, f"{name}: {value}")
    assert f"connections {NL} and {BE} share Expensify credential 'firm' but not {key}" in str(error.value)


def test_a_credential_name_follows_the_connection_name_rules(tmp_path):
    mappings = _mappings(tmp_path, first={"credential": "Firm Login"})
    with pytest.raises(ConfigError, match="expensify.credential"):
        load_project_config(mappings)


# --- the vault -------------------------------------------------------------------------------------------

def test_the_partner_login_is_read_under_the_credential_and_the_exact_secrets_per_connection(tmp_path, store):
    mappings = _mappings(tmp_path, {"name": BE, "expensify": {"policy_ids": [BE_POLICY], "credential": "firm"}},
                         {"name": DE, "expensify": {"policy_ids": [DE_POLICY]}}, first={"credential": "firm"})
    nl, be, de = load_project_config(mappings).connections
    vault = CredentialVault(store)
    assert [secret_scope(c, n) for c in (nl, de) for n in (EXPENSIFY_USER_ID, "exact_client_id")] == [
        "firm", NL, DE, DE]
    assert set(missing_expensify_credentials(vault, [nl, be, de])) == {"firm", DE}

    vault.set("firm", EXPENSIFY_USER_ID, "firm_partner")
    vault.set("firm", EXPENSIFY_USER_SECRET, "firm-secret")
    vault.set(DE, EXPENSIFY_USER_ID, "de_partner")  # an existing per-connection login keeps working
    vault.set(DE, EXPENSIFY_USER_SECRET, "de-secret")
    assert missing_expensify_credentials(vault, [nl, be, de]) == {}

    sent = []

    def expensify(request: httpx.Request) -> httpx.Response:
        job = json.loads(parse_qs(request.content.decode())["requestJobDescription"][0])
        sent.append((job["credentials"]["partnerUserID"], job["credentials"]["partnerUserSecret"]))
        return httpx.Response(200, json={"responseCode": 200, "policyInfo": {}})

    for conn in (nl, be, de):
        with build_expensify_client(conn, vault, transport=httpx.MockTransport(expensify)) as client:
            client.get_policies(list(conn.expensify.policy_ids))
    assert sent == [("firm_partner", "firm-secret"), ("firm_partner", "firm-secret"), ("de_partner", "de-secret")]


def test_a_missing_shared_login_names_the_credential_and_the_command_that_stores_it(tmp_path, store):
    mappings = _mappings(tmp_path, {"name": BE, "expensify": {"policy_ids": [BE_POLICY], "credential": "firm"}},
                         first={"credential": "firm"})
    nl, be = load_project_config(mappings).connections
    vault = CredentialVault(store)
    vault.set(NL, EXPENSIFY_USER_ID, "stored under the connection, not the credential")
    vault.set(NL, EXPENSIFY_USER_SECRET, "stored under the connection, not the credential")
    with pytest.raises(VaultError) as error:
        build_expensify_client(be, vault)
    assert str(error.value) == ("the Expensify partner login of credential 'firm' of connection vermeerhals-be is "
                                "not stored; run `expensify-exact secrets set --credential firm --from-env`")
    assert missing_expensify_credentials(vault, [nl, be]) == {"firm": [nl, be]}


# --- one window per credential ---------------------------------------------------------------------------

def test_two_clients_of_one_credential_count_in_one_window_and_another_credential_does_not_wait(tmp_path, store):
    """Expensify allows 5 requests per 10 s per partner login: the sixth, from the other connection, waits."""
    mappings = _mappings(tmp_path, {"name": BE, "expensify": {"policy_ids": [BE_POLICY], "credential": "firm"}},
                         {"name": DE, "expensify": {"policy_ids": [DE_POLICY]}}, first={"credential": "firm"})
    nl, be, de = load_project_config(mappings).connections
    vault = CredentialVault(store)
    for scope in ("firm", DE):
        vault.set(scope, EXPENSIFY_USER_ID, f"{scope}_partner")
        vault.set(scope, EXPENSIFY_USER_SECRET, f"{scope}-secret")
    answer = httpx.MockTransport(lambda request: httpx.Response(200, json={"responseCode": 200, "policyInfo": {}}))
    clock = FakeClock(datetime(2026, 11, 25, 9, 0, tzinfo=timezone.utc))
    dutch, belgian, german = (build_expensify_client(c, vault, clock, transport=answer, store=store)
                              for c in (nl, be, de))
    with dutch, belgian, german:
        for _ in range(5):
            dutch.get_policies([NL_POLICY])
        german.get_policies([DE_POLICY])
        assert sum(clock.sleeps) == 0, "another credential has a window of its own"
        belgian.get_policies([BE_POLICY])
        assert sum(clock.sleeps) >= 9, "the sixth request of the shared credential waited for its window"
    since = datetime(2026, 11, 25, tzinfo=timezone.utc)
    assert len(store.request_log_since("expensify:firm", since)) == 6
    assert len(store.request_log_since(f"expensify:{DE}", since)) == 1

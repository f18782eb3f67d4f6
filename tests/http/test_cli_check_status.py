"""`check` and `status`: what an operator runs before and after a sync.

`check` must find, before any report uses them, exactly the problems a run would quarantine for configuration
reasons, and point at the mapping row; `status` must tell what needs attention without ever printing a secret.
The rule table runs on hand-made snapshots; the end-to-end cases use the sandbox over real HTTP.
"""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest

from expensify_exact.api.expensify.client import PolicyCategory, PolicyInfo, PolicyTag, PolicyTaxRate
from expensify_exact.cli.commands.check import find_problems
from expensify_exact.cli.commands.status import collect_status, needs_attention, render_text
from expensify_exact.cli.main import main
from expensify_exact.cli.support import EMBEDDED_INSTANCE_CONFIG
from expensify_exact.config import load_project_config
from expensify_exact.core.mapping_locations import MappingLocations
from expensify_exact_sandbox import seed
from tests.conftest import MAPPINGS, write_mappings

CONNECTION = "vermeerhals-nl"
POLICY = "7A3F9C21B4D05E68"
TODAY = date(2026, 11, 25)


def _cli(capsys, mappings, state_url, *args) -> tuple[int, str, str]:
    code = main(["--mappings", str(mappings), "--state-url", state_url, *args])
    out, err = capsys.readouterr()
    return code, out, err


def _line_of(path: Path, text: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


# --- the rules, on hand-made snapshots ------------------------------------------------------------------

def _dims(**changes) -> dict[str, pd.DataFrame]:
    """The seed's dimensions as `fetch_dimension` shapes them; `changes` replaces whole tables."""
    dims = {
        "gl_accounts": pd.DataFrame([{"code": a.code, "is_blocked": a.blocked} for a in seed.GL_ACCOUNTS]),
        "cost_centers": pd.DataFrame([{"code": d.code, "end_date": d.end_date} for d in seed.COST_CENTERS]
                                     + [{"code": "EHV", "end_date": None}]),
        "cost_units": pd.DataFrame([{"code": d.code, "end_date": d.end_date} for d in seed.COST_UNITS]),
        "journals": pd.DataFrame([{"code": j.code, "type": j.type, "allow_vat": j.allow_vat, "is_blocked": False}
                                  for j in seed.JOURNALS]),
        "vat_codes": pd.DataFrame([{"code": v.code, "type": v.type, "is_blocked": False} for v in seed.VAT_CODES]),
    }
    return dims | changes


def _policy(categories=None, tags=None, taxes=None) -> dict[str, PolicyInfo]:
    categories = categories if categories is not None else [
        PolicyCategory(name, code, True) for name, code in seed.CATEGORIES if name != "Gifts"]
    tags = tags if tags is not None else (
        [PolicyTag(1, name, "") for name in seed.OFFICE_TAGS] + [PolicyTag(2, name, "") for name in seed.PROJECT_TAGS])
    taxes = taxes if taxes is not None else [PolicyTaxRate(rid, name, rate) for name, rid, rate in seed.TAX_RATES]
    return {POLICY: PolicyInfo(POLICY, tuple(categories), tuple(tags), tuple(taxes))}


def _without(frame: pd.DataFrame, code: str) -> pd.DataFrame:
    return frame[frame["code"] != code]


def _with(frame: pd.DataFrame, code: str, **values) -> pd.DataFrame:
    frame = frame.copy()
    for column, value in values.items():
        frame[column] = frame[column].astype(object)
        frame.loc[frame["code"] == code, column] = value
    return frame


BASE = _dims()
RULES = [
    # A clean config against a division that has everything: nothing to say.
    ("clean", {}, {}, []),
    # The category's account is gone from Exact: every expense in it would be quarantined.
    ("unknown account", {"gl_accounts": _without(BASE["gl_accounts"], "4520")}, {},
     [("error", "UNKNOWN_GL_ACCOUNT", "categories.yaml", "Meals")]),
    # Blocked in Exact: Exact would refuse the entry.
    ("blocked account", {"gl_accounts": _with(BASE["gl_accounts"], "4600", is_blocked=True)}, {},
     [("error", "BLOCKED_GL_ACCOUNT", "categories.yaml", "Office Supplies")]),
    # The credit side is checked too, card feeds included.
    ("unknown card account", {"gl_accounts": _without(BASE["gl_accounts"], "1661")}, {},
     [("error", "UNKNOWN_GL_ACCOUNT", "connections.yaml", "card_accounts.amex")]),
    # The journal must exist and be a general (type 90) journal.
    ("unknown journal", {"journals": _without(BASE["journals"], "90")}, {},
     [("error", "UNKNOWN_JOURNAL", "connections.yaml", "journal 90")]),
    ("bank journal", {"journals": _with(BASE["journals"], "90", type=12)}, {},
     [("error", "INVALID_JOURNAL_TYPE", "connections.yaml", "type 12")]),
    # A blocked journal quarantines every report of a run, so check says so first (the journal's own rule).
    ("blocked journal", {"journals": _with(BASE["journals"], "90", is_blocked=True)}, {},
     [("error", "BLOCKED_JOURNAL", "connections.yaml", "journal 90 is blocked")]),
    # A cost center that ended yesterday is as bad as a missing one.
    ("ended cost center", {"cost_centers": _with(BASE["cost_centers"], "UTR", end_date=TODAY - timedelta(days=1))},
     {}, [("error", "ENDED_COST_CENTER", "tags.yaml", "UTR")]),
    ("cost center ending later", {"cost_centers": _with(BASE["cost_centers"], "UTR", end_date=TODAY)}, {}, []),
    ("unknown cost unit", {"cost_units": _without(BASE["cost_units"], "INT")}, {},
     [("error", "UNKNOWN_COST_UNIT", "tags.yaml", "INT"), ("error", "UNKNOWN_COST_UNIT", "defaults.yaml", "INT"),
      ("error", "UNKNOWN_COST_UNIT", "defaults.yaml", "INT")]),
    # VAT codes: missing, or an excluding code that would unbalance a gross expense.
    ("unknown VAT code", {"vat_codes": _without(BASE["vat_codes"], "2")}, {},
     [("error", "UNKNOWN_VAT_CODE", "vat.yaml", "Laag 9%")]),
    ("blocked VAT code", {"vat_codes": _with(BASE["vat_codes"], "1", is_blocked=True)}, {},
     [("error", "BLOCKED_VAT_CODE", "vat.yaml", "Hoog 21%")]),
    # Excluding codes are fine: the journal rules post the net so that Exact's VAT line makes the gross.
    ("excluding VAT code", {"vat_codes": _with(BASE["vat_codes"], "1", type="E")}, {}, []),
    # Without VAT on the journal, tax names are not looked up at all...
    ("journal without VAT", {"journals": _with(BASE["journals"], "90", allow_vat=False)},
     {"taxes": [PolicyTaxRate("id_TAX_X", "Nultarief", 0.0)]}, []),
    # Expensify's side: a new category and a new tag are found before any report carries them.
    ("unmapped category", {}, {"categories": [PolicyCategory("Gifts", "", True)]},
     [("error", "UNMAPPED_CATEGORY", "categories.yaml", "Gifts")]),
    # A disabled category cannot be picked any more.
    ("disabled category", {}, {"categories": [PolicyCategory("Gifts", "", False)]}, []),
    ("unmapped tag", {}, {"tags": [PolicyTag(1, "Den Haag", "")]},
     [("error", "UNMAPPED_TAG", "tags.yaml", "Den Haag")]),
    # Tags of a level tags.yaml does not configure set no dimension.
    ("tag at an unconfigured level", {}, {"tags": [PolicyTag(3, "Anything", "")]}, []),
    ("unmapped tax name", {}, {"taxes": [PolicyTaxRate("id_TAX_X", "Nultarief", 0.0)]},
     [("error", "UNMAPPED_TAX_NAME", "vat.yaml", "Nultarief")]),
    # Expensify's GL code disagreeing with the mapping is worth a look, but the mapping wins.
    ("GL code mismatch", {}, {"categories": [PolicyCategory("Hotel", "4599", True)]},
     [("warning", "GL_CODE_MISMATCH", "categories.yaml", "4599")]),
]


@pytest.mark.parametrize("dims_changes, policy_changes, expected",
                         [pytest.param(d, p, e, id=name) for name, d, p, e in RULES])
def test_check_rules_report_each_mapping_problem_with_its_file_and_nothing_else(dims_changes, policy_changes,
                                                                                 expected):
    project = load_project_config(MAPPINGS)
    findings = find_problems(project.connection(CONNECTION), project, _dims(**dims_changes),
                             _policy(**policy_changes), MappingLocations(MAPPINGS), TODAY)
    got = [(f.severity, f.code, Path(f.where.split(":")[0]).name) for f in findings]
    assert got == [(severity, code, file) for severity, code, file, _ in expected], [f.line() for f in findings]
    for finding, (*_, mentioned) in zip(findings, expected):
        assert mentioned in finding.message, finding.line()


def test_check_reports_require_vat_on_a_journal_without_vat_at_the_connections_posting_rules(tmp_path):
    mappings = write_mappings(tmp_path / "mappings", posting__require_vat=True)
    project = load_project_config(mappings)
    dims = _dims(journals=_with(BASE["journals"], "90", allow_vat=False))
    findings = find_problems(project.connection(CONNECTION), project, dims, _policy(), MappingLocations(mappings),
                             TODAY)
    connections = mappings / "connections.yaml"
    assert [(f.code, f.where) for f in findings] == [
        ("VAT_NOT_ALLOWED", f"{connections}:{_line_of(connections, 'require_vat')}")]
    # ...and with VAT allowed, require_vat has nothing to complain about.
    assert find_problems(project.connection(CONNECTION), project, _dims(), _policy(), MappingLocations(mappings),
                         TODAY) == []


def test_check_reports_a_configured_policy_expensify_does_not_return():
    project = load_project_config(MAPPINGS)
    findings = find_problems(project.connection(CONNECTION), project, _dims(), {}, MappingLocations(MAPPINGS), TODAY)
    assert [(f.code, f.where) for f in findings] == [
        ("UNKNOWN_POLICY", f"{MAPPINGS / 'connections.yaml'}:{_line_of(MAPPINGS / 'connections.yaml', 'policy_ids')}")]


def test_mapping_locations_point_at_the_line_of_each_category_tag_vat_code_and_connection_key():
    locations = MappingLocations(MAPPINGS)
    cases = [
        (locations.category("Hotel"), "categories.yaml", "category: Hotel"),
        (locations.tag(1, "Eindhoven"), "tags.yaml", "Eindhoven: EHV"),
        (locations.tag(2, "Internal"), "tags.yaml", "Internal: INT"),
        (locations.vat("Laag 9%"), "vat.yaml", "Laag 9%"),
        (locations.connection(CONNECTION, "exact", "journal"), "connections.yaml", "journal:"),
        (locations.connection(CONNECTION, "exact", "card_accounts", "amex"), "connections.yaml", "amex:"),
    ]
    for location, filename, text in cases:
        assert (Path(location.path).name, location.line) == (filename, _line_of(MAPPINGS / filename, text)), text
    assert locations.category("No such category").line is None


# --- check against the sandbox ---------------------------------------------------------------------------

@pytest.fixture
def authorized(capsys, sandbox_mappings, state_url):
    assert _cli(capsys, sandbox_mappings, state_url, "secrets", "set", "--connection", CONNECTION,
                "--from-env")[0] == 0
    return sandbox_mappings


def test_check_against_the_demo_sandbox_reports_exactly_the_gifts_category_and_the_missing_ehv_cost_center(
        capsys, authorized, state_url):
    code, out, _ = _cli(capsys, authorized, state_url, "check")
    problems = [line for line in out.splitlines() if ": error: " in line or ": warning: " in line]
    assert code == 1
    eindhoven = _line_of(authorized / "tags.yaml", "Eindhoven: EHV")
    assert sorted(problems) == sorted([
        f"{authorized / 'tags.yaml'}:{eindhoven}: error: UNKNOWN_COST_CENTER: cost center EHV (tag 'Eindhoven', "
        f"level 1) does not exist in Exact division {seed.DIVISION} [{CONNECTION}]",
        f"{authorized / 'categories.yaml'}: error: UNMAPPED_CATEGORY: category 'Gifts' of Expensify policy {POLICY} "
        f"maps to no GL account; add a row to categories.yaml [{CONNECTION}]",
    ])

    code, out, _ = _cli(capsys, authorized, state_url, "check", "--json")
    report = json.loads(out)
    assert code == 1 and report["problems"] == 2 and report["warnings"] == 0
    assert {f["code"] for f in report["findings"]} == {"UNKNOWN_COST_CENTER", "UNMAPPED_CATEGORY"}

    # Fixing the two mappings makes the check pass: it judges the config, not the data.
    categories = authorized / "categories.yaml"
    categories.write_text(categories.read_text() + '  - {category: Gifts, gl_account: "4520"}\n')
    tags = authorized / "tags.yaml"
    tags.write_text(tags.read_text().replace("Eindhoven: EHV", "Eindhoven: AMS"))
    code, out, _ = _cli(capsys, authorized, state_url, "check")
    assert code == 0, out
    assert "no problems found" in out

    # The rate budget the check saw is left for `status`, which then needs no Exact call.
    code, out, _ = _cli(capsys, authorized, state_url, "status", "--json")
    budget = json.loads(out)["connections"][CONNECTION]["rate_budget"]
    assert budget["source"] == "audit (check)" and budget["remaining_daily"] > 0


def test_check_exits_3_and_names_the_file_and_line_when_the_mappings_are_invalid(capsys, tmp_path, state_url):
    mappings = write_mappings(tmp_path / "mappings")
    tags = mappings / "tags.yaml"
    tags.write_text(tags.read_text().replace("Utrecht: UTR", "Utrecht: UTR\n      Utrecht: UTX"))
    code, out, err = _cli(capsys, mappings, state_url, "check")
    assert code == 3
    assert f"{tags}:{_line_of(tags, 'Utrecht: UTX')}: duplicate key 'Utrecht'" in err

    code, out, _ = _cli(capsys, mappings, state_url, "check", "--json")
    assert code == 3 and "duplicate key 'Utrecht'" in json.loads(out)["config_error"]


def test_check_reports_missing_credentials_as_a_problem_with_the_command_that_fixes_them(capsys, tmp_path,
                                                                                          state_url):
    mappings = write_mappings(tmp_path / "mappings")
    code, out, _ = _cli(capsys, mappings, state_url, "check")
    assert code == 1
    assert "UNREACHABLE" in out and "expensify-exact secrets set --connection vermeerhals-nl" in out


# --- status ----------------------------------------------------------------------------------------------

def test_status_lists_credential_names_never_values_and_exits_1_until_everything_is_stored(
        capsys, tmp_path, state_url, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "no_instance_yet"))
    mappings = write_mappings(tmp_path / "mappings")
    code, out, _ = _cli(capsys, mappings, state_url, "status")
    assert code == 1
    assert "MISSING: exact_client_id, exact_client_secret, exact_tokens" in out
    assert "no Dagster instance yet" in out

    assert _cli(capsys, mappings, state_url, "secrets", "set", "--connection", CONNECTION, "--from-env")[0] == 0
    code, out, _ = _cli(capsys, mappings, state_url, "status")
    assert code == 0, out
    assert "present: expensify_partner_user_id, expensify_partner_user_secret, exact_client_id" in out
    assert "not yet exchanged" in out
    for secret in (seed.EXPENSIFY_PARTNER_USER_SECRET, seed.EXACT_CLIENT_SECRET, seed.EXACT_INITIAL_REFRESH_TOKEN):
        assert secret not in out
    code, out, _ = _cli(capsys, mappings, state_url, "status", "--json")
    assert secret not in out and json.loads(out)["connections"][CONNECTION]["missing_credentials"] == []


def test_status_warns_and_exits_1_when_the_refresh_token_nears_exacts_30_day_idle_expiry(tmp_path, state_url):
    from expensify_exact.api.exact.tokens import ExactTokens
    from expensify_exact.core.connections import VaultTokenStore
    from expensify_exact.defs.resources import ConnectorResource

    connector = ConnectorResource(mappings_dir=str(MAPPINGS), state_url=state_url)
    conn = connector.project().connection(CONNECTION)
    now = datetime(2026, 11, 25, 9, 0, tzinfo=timezone.utc)
    issued = now - timedelta(days=26)
    VaultTokenStore(connector.store(), connector.vault()).save(
        CONNECTION, ExactTokens("a", "r", access_expires_at=issued + timedelta(minutes=10), issued_at=issued))
    status = collect_status(connector, [conn], None, now)
    assert status["connections"][CONNECTION]["tokens"]["age_seconds"] == 26 * 86400
    warning = status["connections"][CONNECTION]["tokens"]["idle_warning"]
    assert "26 days old" in warning and "2026-11-29" in warning
    assert any("26 days old" in reason for reason in needs_attention(status))
    assert "WARNING       Exact refresh token" in render_text(status)

    fresh = collect_status(connector, [conn], None, issued + timedelta(days=3))
    assert fresh["connections"][CONNECTION]["tokens"]["idle_warning"] is None


def test_status_after_the_seeded_problem_days_shows_quarantine_by_reason_ledger_counts_and_the_run(
        capsys, authorized, sandbox, state_url, tmp_path, monkeypatch):
    import dagster as dg

    from expensify_exact.defs.runs import run_range

    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(EMBEDDED_INSTANCE_CONFIG)  # what `expensify-exact run` writes
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    amsterdam = __import__("zoneinfo").ZoneInfo("Europe/Amsterdam")
    seeded = {seed._report_id(101), seed._report_id(102)}
    days = sorted(r.approved.replace(tzinfo=timezone.utc).astimezone(amsterdam).date()
                  for r in sandbox.seed.approved_reports if r.report_id in seeded)
    with dg.DagsterInstance.get() as instance:
        summary = run_range(days[0], days[-1], mappings_dir=str(authorized), state_url=state_url, instance=instance)
    assert summary.success, summary.failure
    posted = int((summary.outcomes["outcome"] == "posted").sum())

    code, out, _ = _cli(capsys, authorized, state_url, "status", "--json")
    status = json.loads(out)
    conn = status["connections"][CONNECTION]
    assert code == 0, status["attention"]
    assert conn["quarantine_open"] == 2
    assert conn["quarantine_by_reason"] == {"UNKNOWN_COST_CENTER": 1, "UNMAPPED_CATEGORY": 1}
    assert conn["ledger"] == {"posted": posted, "pending": 0}
    assert [(r["run_id"], r["status"]) for r in status["runs"]["latest"]] == [(summary.run_id, "SUCCESS")]
    assert conn["last_run"]["run_id"] == summary.run_id
    assert conn["tokens"]["age_seconds"] < 600, "the run exchanged the stored refresh token"
    # The run's Exact answers left the daily budget on the shared board, so status knows it without a call.
    assert conn["rate_budget"]["source"] == "the last Exact answer" and conn["rate_budget"]["remaining_daily"] > 0
    [row] = status["overview"]["rows"]
    assert (row["connection"], row["quarantine_open"], row["last_run"]["run_id"]) == (CONNECTION, 2, summary.run_id)
    assert row["quarantine_by_reason"] == conn["quarantine_by_reason"]

    code, out, _ = _cli(capsys, authorized, state_url, "status")
    assert "quarantine    2 open report(s): UNKNOWN_COST_CENTER 1, UNMAPPED_CATEGORY 1" in out
    assert f"{summary.run_id[:8]}  SUCCESS" in out

    # --live asks Exact (current/Me has no rate headers; system/Divisions does).
    code, out, _ = _cli(capsys, authorized, state_url, "status", "--live", "--json")
    budget = json.loads(out)["connections"][CONNECTION]["rate_budget"]
    assert budget["source"] == "live" and budget["remaining_daily"] > 0


def test_status_reads_the_budget_of_the_last_exact_answer_any_process_got(tmp_path, state_url):
    from expensify_exact.api.http.pacing import RateLimitSnapshot
    from expensify_exact.core.connections import StoredRateLimitBoard
    from expensify_exact.defs.resources import ConnectorResource

    connector = ConnectorResource(mappings_dir=str(MAPPINGS), state_url=state_url)
    conn = connector.project().connection(CONNECTION)
    now = datetime(2026, 11, 25, 9, 0, tzinfo=timezone.utc)
    assert collect_status(connector, [conn], None, now)["connections"][CONNECTION]["rate_budget"] is None
    midnight = datetime(2026, 11, 26, tzinfo=timezone.utc)
    StoredRateLimitBoard(connector.store(), conn.exact.division).save(RateLimitSnapshot(
        now - timedelta(minutes=3), 12, 60, now - timedelta(minutes=2), 4321, 5000, midnight))
    budget = collect_status(connector, [conn], None, now)["connections"][CONNECTION]["rate_budget"]
    assert budget == {"source": "the last Exact answer", "as_of": "2026-11-25T08:57:00+00:00",
                      "remaining_daily": 4321, "daily_resets_at": "2026-11-26T00:00:00+00:00",
                      "remaining_minutely": 12}


def test_status_reports_a_configured_webhook_without_its_url_as_missing(tmp_path, state_url, capsys, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    mappings = write_mappings(tmp_path / "mappings", notify={"alerts": {"webhook_format": "slack"}})
    assert main(["--mappings", str(mappings), "--state-url", state_url, "secrets", "set", "--connection",
                 "vermeerhals-nl", "--from-env"]) == 0
    capsys.readouterr()
    assert main(["--mappings", str(mappings), "--state-url", state_url, "status", "--json"]) == 1
    conn = json.loads(capsys.readouterr().out)["connections"]["vermeerhals-nl"]
    assert conn["missing_credentials"] == ["alert_webhook_url"]
    assert conn["notify"] == {"digest_to": 0, "alert_channels": ["webhook"], "last_digest_mailed": None}

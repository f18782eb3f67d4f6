"""`expensify-exact check`: validates mappings/ against Exact's dimensions and Expensify's policies before a run.

Everything a run would quarantine because of the configuration (an unmapped category, a cost center Exact lacks,
a blocked account, a journal of the wrong type) is reported here first, one line per problem, with the file and
line of the mapping row to fix.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Collection
from dataclasses import asdict, dataclass
from datetime import date

import pandas as pd

from expensify_exact.cli.support import EXIT_CONFIG, add_command, describe_connection, open_connections, print_outcome
from expensify_exact.clock import connection_today
from expensify_exact.config import CATEGORIES_FILE, TAGS_FILE, VAT_FILE, Connection, ProjectConfig
from expensify_exact.core.journal import (
    Reason,
    account_problem,
    dimension_problem,
    end_date,
    gl_code_for,
    index_by_code,
    journal_problems,
    vat_code_for,
    vat_code_problem,
)
from expensify_exact.core.mapping_locations import MappingLocations
from expensify_exact.errors import ConfigError, ConnectorError

ERROR, WARNING = "error", "warning"
# Only the tables a mapping can point at; financial periods belong to a run's date, not to the config.
CHECKED_DIMENSIONS = ("gl_accounts", "cost_centers", "cost_units", "journals", "vat_codes")
# Findings that are not quarantine reasons (the rest are core.journal's Reasons, found by its own rules).
GL_CODE_MISMATCH = "GL_CODE_MISMATCH"
UNKNOWN_POLICY = "UNKNOWN_POLICY"
UNREACHABLE = "UNREACHABLE"
MISSING_EXPENSIFY_LOGIN = "MISSING_EXPENSIFY_LOGIN"  # once per credential, however many connections share it


@dataclass(frozen=True)
class Finding:
    severity: str  # error | warning
    code: str  # a quarantine Reason where one fits, so `check` and the quarantine speak the same language
    connection: str
    where: str  # file or file:line of the mapping row, or the service that answered
    message: str

    def line(self) -> str:
        return f"{self.where}: {self.severity}: {self.code}: {self.message} [{self.connection}]"


def find_problems(conn: Connection, project: ProjectConfig, dims: dict[str, pd.DataFrame], policies: dict,
                  locations: MappingLocations, today: date) -> list[Finding]:
    """Every mapping of `conn` checked against Exact's dimension snapshots and Expensify's policies, by the rules
    the journal drafts apply (`core.journal`: `journal_problems`, `account_problem`, `dimension_problem`, ...).

    Args:
        conn: the connection whose division and policies are checked.
        project: the loaded mappings.
        dims: DataFrames as `snapshots.fetch_dimension` returns them, by name (CHECKED_DIMENSIONS).
        policies: `ExpensifyClient.get_policies(conn.expensify.policy_ids)`; None when they could not be read
            (`read_policies`), so the policies' categories and tags are not checked.
        locations: line numbers of the mapping rows.
        today: the day against which end dates count.

    Returns:
        Findings in the order of the mapping files; errors would quarantine reports, warnings would not.
    """
    findings: list[Finding] = []

    def add(severity: str, code: str, where, message: str) -> None:
        findings.append(Finding(severity, str(code), conn.name, str(where), message))

    gl = index_by_code(dims["gl_accounts"])
    tables = {"cost_center": index_by_code(dims["cost_centers"]), "cost_unit": index_by_code(dims["cost_units"])}
    journals, vat_codes = index_by_code(dims["journals"]), index_by_code(dims["vat_codes"])
    division = f"Exact division {conn.exact.division}"

    def account(code: str, what: str, where) -> None:
        reason = account_problem(gl.get(code))
        if reason is not None:
            state = "does not exist" if reason == Reason.UNKNOWN_GL_ACCOUNT else "is blocked"
            add(ERROR, reason, where, f"GL account {code} ({what}) {state} in {division}")

    # connections.yaml: the journal and the credit side.
    journal = journals.get(conn.exact.journal)
    where = locations.connection(conn.name, "exact", "journal")
    for reason in journal_problems(journal):
        state = {Reason.UNKNOWN_JOURNAL: f"does not exist in {division}",
                 Reason.BLOCKED_JOURNAL: f"is blocked in {division}",
                 Reason.INVALID_JOURNAL_TYPE: f"has type {(journal or {}).get('type')}, not 90 (general journal)"}
        add(ERROR, reason, where, f"journal {conn.exact.journal} {state[reason]}")
    credit = [("employee_payable_account", conn.exact.employee_payable_account, ("exact", "employee_payable_account")),
              ("card_liability_account", conn.exact.card_liability_account, ("exact", "card_liability_account"))]
    credit += [(f"card_accounts.{card}", code, ("exact", "card_accounts", card))
               for card, code in conn.exact.card_accounts.items()]
    if conn.exact.rounding_account:
        credit.append(("rounding_account", conn.exact.rounding_account, ("exact", "rounding_account")))
    for what, code, keys in credit:
        account(code, what, locations.connection(conn.name, *keys))

    # categories.yaml: the rows that apply to this connection's policies.
    for row in project.categories:
        if row.policy_id is None or row.policy_id in conn.expensify.policy_ids:
            account(row.gl_account, f"category {row.category!r}", locations.category(row.category, row.policy_id))

    def dimension(kind: str, code: str, what: str, where) -> None:
        """A cost center or cost unit code must exist in Exact and not have ended before today."""
        row = tables[kind].get(code)
        reason = dimension_problem(kind, row, today)
        if reason is not None:
            state = "does not exist" if row is None else f"ended on {end_date(row)}"
            add(ERROR, reason, where, f"{kind.replace('_', ' ')} {code} ({what}) {state} in {division}")

    # tags.yaml: every code a tag (or a level's default) can set.
    for level in project.tags:
        for name, code in level.values.items():
            dimension(level.dimension, code, f"tag {name!r}, level {level.level}", locations.tag(level.level, name))
        if level.default:
            dimension(level.dimension, level.default, f"default of level {level.level}",
                      locations.tag_default(level.level))

    # defaults.yaml: per-employee and per-category cost centers and cost units.
    defaults = getattr(project, "defaults", None)
    for section in ("employees", "categories"):
        for key, row in (getattr(defaults, section, None) or {}).items():
            for kind in ("cost_center", "cost_unit"):
                if code := getattr(row, kind, None):
                    dimension(kind, code, f"default for {key!r}", locations.default(section, key, kind))

    # vat.yaml: a wrong code is reported even on a journal without VAT, where it is not used yet: it would be the
    # day the journal changes.
    for tax_name, code in project.vat_codes.items():
        if code == "":
            continue  # "" posts that tax name gross, without a VAT code
        reason = vat_code_problem(vat_codes.get(code))
        if reason is not None:
            state = "does not exist" if reason == Reason.UNKNOWN_VAT_CODE else "is blocked"
            add(ERROR, reason, locations.vat(tax_name), f"VAT code {code} (tax {tax_name!r}) {state} in {division}")
    if journal is not None and any(vat_code_for(name, project, conn, journal)[1] == Reason.VAT_NOT_ALLOWED
                                   for name in project.vat_codes):
        add(ERROR, Reason.VAT_NOT_ALLOWED, locations.connection(conn.name, "posting", "require_vat"),
            f"journal {conn.exact.journal} does not allow VAT, yet posting.require_vat quarantines every expense "
            f"whose tax maps to a VAT code; use a journal with AllowVAT or turn require_vat off")

    # Expensify's policies: what employees can pick, before any report uses it.
    levels = {level.level: level for level in project.tags}
    for policy_id in conn.expensify.policy_ids if policies is not None else ():
        policy = policies.get(policy_id)
        if policy is None:
            add(ERROR, UNKNOWN_POLICY, locations.connection(conn.name, "expensify", "policy_ids"),
                f"Expensify returned no policy {policy_id}; check the ID and that the partner user can see it")
            continue
        for category in policy.categories:
            if not category.enabled:
                continue
            code = gl_code_for(project, conn, category.name, policy_id, category.gl_code)
            mapped = project.gl_account_for(category.name, policy_id)
            if code is None:
                add(ERROR, Reason.UNMAPPED_CATEGORY, locations.file(CATEGORIES_FILE),
                    f"category {category.name!r} of Expensify policy {policy_id} maps to no GL account; "
                    f"add a row to {CATEGORIES_FILE}")
            elif mapped is None:  # Expensify's own GL code, by posting.fallback_to_category_gl_code
                account(code, f"Expensify GL code of category {category.name!r}", locations.file(CATEGORIES_FILE))
            elif category.gl_code and category.gl_code != mapped:
                add(WARNING, GL_CODE_MISMATCH, locations.category(category.name, policy_id),
                    f"category {category.name!r} maps to {mapped}, but Expensify policy {policy_id} gives it GL "
                    f"code {category.gl_code}; the mapping wins")
        for rate in policy.tax_rates:
            # Once vat.yaml has rows, a tax name it lacks quarantines the report on a journal that allows VAT.
            if vat_code_for(rate.name, project, conn, journal)[1] == Reason.UNMAPPED_TAX_NAME:
                add(ERROR, Reason.UNMAPPED_TAX_NAME, locations.file(VAT_FILE),
                    f"tax {rate.name!r} of Expensify policy {policy_id} maps to no VAT code; add it to "
                    f"{VAT_FILE} (\"\" posts it gross)")
        for tag in policy.tags:
            level = levels.get(tag.level)
            # A level no tags.yaml entry configures sets no dimension, so any tag there is fine.
            if not tag.enabled or level is None or tag.name in level.values:
                continue
            add(ERROR, Reason.UNMAPPED_TAG, locations.tag_level(tag.level),
                f"tag {tag.name!r} (level {tag.level}) of Expensify policy {policy_id} maps to no "
                f"{level.dimension.replace('_', ' ')}; add it to {TAGS_FILE}")
    return findings


def check_connection(connector, conn: Connection, project: ProjectConfig, locations: MappingLocations,
                     policies: dict | None) -> list[Finding]:
    """Reads Exact's dimensions for `conn` and checks the mappings against them and against its Expensify
    `policies` (`read_policies`; None: not read, only Exact's side is checked), as of the connection's day by the
    connector's clock."""
    from expensify_exact.core.snapshots import fetch_dimension, needed_codes

    try:
        client = connector.exact_client(conn)
        with client:
            needed = needed_codes(conn, project)
            dims = {name: fetch_dimension(client, name, needed.get(name)) for name in CHECKED_DIMENSIONS}
            _remember_rate_budget(connector, conn, client)
    except ConnectorError as exc:
        return [Finding(ERROR, UNREACHABLE, conn.name, f"Exact division {conn.exact.division}",
                        f"cannot read the dimensions: {exc}")]
    return find_problems(conn, project, dims, policies, locations, connection_today(conn.timezone, connector.clock()))


def read_policies(connector, connections: list[Connection],
                  missing: Collection[str]) -> tuple[dict[str, dict | None], list[Finding]]:
    """Each connection's Expensify policies, read with one policy-getter call per credential (Expensify's limits are
    per partner login), and one finding per credential Expensify did not answer. A connection whose credential is
    `missing` or unanswered gets None."""
    from expensify_exact.core.exports import by_credential

    policies: dict[str, dict | None] = {conn.name: None for conn in connections}
    findings = []
    for credential, group in by_credential(connections).items():
        if credential in missing:
            continue
        try:
            with connector.expensify_client(group[0]) as expensify:
                found = expensify.get_policies([policy for conn in group for policy in conn.expensify.policy_ids])
        except ConnectorError as exc:
            findings.append(Finding(ERROR, UNREACHABLE, ", ".join(c.name for c in group), "Expensify",
                                    f"cannot read the policies: {exc}"))
            continue
        policies |= {conn.name: {p: found[p] for p in conn.expensify.policy_ids if p in found} for conn in group}
    return policies, findings


def missing_logins(connector, project: ProjectConfig, connections: list[Connection]) -> dict[str, list[Connection]]:
    """The Expensify credentials of `connections` whose partner login is not stored, each with every configured
    connection sharing it. Empty when the vault cannot be opened: each connection's check then says why."""
    from expensify_exact.core.connections import missing_expensify_credentials

    checked = {c.name for c in connections}
    try:
        missing = missing_expensify_credentials(connector.vault(), list(project.connections))
    except ConnectorError:
        return {}
    return {credential: group for credential, group in missing.items() if any(c.name in checked for c in group)}


def missing_login_finding(credential: str, group: list[Connection]) -> Finding:
    """One finding for a credential whose login is missing, however many connections share it."""
    from expensify_exact.core.connections import store_expensify_login_command

    names = ", ".join(c.name for c in group)
    shared = len(group) > 1 or group[0].expensify.credential
    whose = f"Expensify credential {credential} (connections {names})" if shared else f"connection {credential}"
    where = f"Expensify credential {credential}" if shared else "Expensify"
    return Finding(ERROR, MISSING_EXPENSIFY_LOGIN, names, where,
                   f"the Expensify partner login of {whose} is not stored, so no policy can be read; run "
                   f"`{store_expensify_login_command(group)}`")


def _remember_rate_budget(connector, conn: Connection, client) -> None:
    """Leave Exact's rate budget in the audit log, where `status` finds it without spending a call."""
    status = client.rate_limits.status()
    if status.get("remaining_daily") is not None:
        connector.store().audit("exact_rate_budget", connection=conn.name, detail=status | {"source": "check"})


def cmd_check(args) -> int:
    """Validate mappings/ and check every mapped GL account, cost center, cost unit, journal, credit account and VAT
    code against Exact Online, and every category and tag of the connection's Expensify policies against the
    mappings. One line per problem, with the file:line of the mapping row where there is one.

    Exit codes: 0 no problems (warnings allowed), 1 problems found or a service unreachable, 3 the configuration
    itself is invalid. Uses about 7 Exact calls per connection and 1 Expensify call per credential (the
    connections sharing an Expensify login are read together).
    """
    try:
        connector, project, connections = open_connections(args)
    except ConfigError as exc:
        if args.json:
            print(json.dumps(_summary([], config_error=str(exc)), indent=2))
        else:
            print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    locations = MappingLocations(args.mappings)
    missing = missing_logins(connector, project, connections)
    findings = [missing_login_finding(credential, group) for credential, group in missing.items()]
    policies, unanswered = read_policies(connector, connections, missing)
    findings.extend(unanswered)
    for conn in connections:
        if not args.json:
            print(f"{conn.name}: {describe_connection(conn)}", flush=True)
        findings.extend(check_connection(connector, conn, project, locations, policies[conn.name]))
    summary = _summary(findings, [c.name for c in connections])
    lines = [f.line() for f in findings]
    lines.append(f"{summary['problems']} problem(s), {summary['warnings']} warning(s)" if findings
                 else "no problems found")
    return print_outcome(args, summary, lines, failed=summary["problems"] > 0)


def _summary(findings: list[Finding], checked: list[str] | None = None, config_error: str | None = None) -> dict:
    """`check --json`'s object."""
    errors = sum(f.severity == ERROR for f in findings)
    return {"ok": config_error is None and not errors, "config_error": config_error, "connections": checked or [],
            "problems": errors, "warnings": sum(f.severity == WARNING for f in findings),
            "findings": [asdict(f) for f in findings]}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(subparsers, "check", cmd_check,
                    help="validate mappings/ against Exact's dimensions and Expensify's policies")
    p.add_argument("--connection", help="check only this connection (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")

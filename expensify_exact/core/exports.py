"""Which connections share an Expensify credential, and how one export for all their policies is split back into
each connection's reports (Expensify's 5 requests per 10 s and its export jobs count per credential)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from typing import Protocol

from expensify_exact.config import Connection


class ReportExporter(Protocol):
    """What one shared export needs from the Expensify client."""

    def export_reports(self, start: date, end: date, policy_ids: Sequence[str], *, timezone: str = ...,
                       source_timezone: str = ...) -> list[dict]: ...


def credential_of(conn: Connection) -> str:
    """The name an Expensify partner login is kept under: `expensify.credential`, else the connection's own name
    (`Connection.expensify_credential`, which config validation also groups by)."""
    return conn.expensify_credential


def by_credential(connections: list[Connection]) -> dict[str, list[Connection]]:
    """The connections grouped by the credential they export with, each group in the given order."""
    groups: dict[str, list[Connection]] = {}
    for conn in connections:
        groups.setdefault(credential_of(conn), []).append(conn)
    return groups


def export_together(client: ReportExporter, connections: list[Connection], start: date, end: date
                    ) -> dict[str, list[dict]]:
    """Each connection's approved reports of start..end from one export over all their policies (`connections`
    share one credential, hence one timezone by config validation; `client` is logged in with it)."""
    first = connections[0]
    reports = client.export_reports(start, end, [p for c in connections for p in c.expensify.policy_ids],
                                    timezone=first.timezone, source_timezone=first.expensify.timestamp_timezone)
    return split_by_policy(reports, connections)


def names_by_credential(connections: list[Connection]) -> dict[str, list[str]]:
    """`by_credential`, naming the connections: the groups a step exports for together."""
    return {credential: [conn.name for conn in group] for credential, group in by_credential(connections).items()}


def split_by_policy(reports: list[dict], connections: list[Connection]) -> dict[str, list[dict]]:
    """Each connection's share of one export over all their policies, by the report's policy ID. A policy listed by
    two connections of one credential goes to the first (config validation refuses that case)."""
    owner: dict[str, str] = {}
    for conn in connections:
        for policy in conn.expensify.policy_ids:
            owner.setdefault(policy, conn.name)
    split: dict[str, list[dict]] = {conn.name: [] for conn in connections}
    for report in reports:
        name = owner.get(str(report.get("policyID", "")))
        if name is not None:
            split[name].append(report)
    return split

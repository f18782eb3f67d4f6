"""Reads Exact's dimension tables (accounts, cost centers, cost units, journals, VAT codes, periods) into DataFrames,
and keeps each division's last snapshot in the state DB, refreshed incrementally (docs/dimension-snapshots.md)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any, Protocol

import pandas as pd

from expensify_exact.api.exact.odata import AMSTERDAM, datetime_literal, string_literal
from expensify_exact.clock import Clock
from expensify_exact.config import Connection, ProjectConfig
from expensify_exact.core.journal import Dimensions
from expensify_exact.errors import ApiError

logger = logging.getLogger(__name__)


class DimensionReader(Protocol):
    def get_all(self, path: str, select, filter: str | None = None, orderby: str | None = None) -> list[dict]: ...

    def sync_rows(self, path: str, select: Sequence[str], since: int = 1) -> list[dict]: ...


# name -> (endpoint, {Exact field: our column}); $select is always explicit (exact-online.md §4.6).
DIMENSION_QUERIES: dict[str, tuple[str, dict[str, str]]] = {
    "gl_accounts": ("financial/GLAccounts", {
        "ID": "id", "Code": "code", "Description": "description", "Type": "type", "IsBlocked": "is_blocked",
        "UseCostcenter": "use_costcenter", "UseCostunit": "use_costunit"}),
    "cost_centers": ("hrm/Costcenters", {"ID": "id", "Code": "code", "Description": "description",
                                         "EndDate": "end_date"}),
    "cost_units": ("hrm/Costunits", {"ID": "id", "Code": "code", "Description": "description",
                                     "EndDate": "end_date"}),
    "journals": ("financial/Journals", {
        "ID": "id", "Code": "code", "Description": "description", "Type": "type", "AllowVAT": "allow_vat",
        "AllowVariableCurrency": "allow_variable_currency", "IsBlocked": "is_blocked"}),
    "vat_codes": ("vat/VATCodes", {"ID": "id", "Code": "code", "Description": "description", "Type": "type",
                                   "Percentage": "percentage", "IsBlocked": "is_blocked"}),
    "financial_periods": ("financial/FinancialPeriods", {
        "ID": "id", "FinYear": "fin_year", "FinPeriod": "fin_period", "StartDate": "start_date",
        "EndDate": "end_date"}),
}
# financial/GLAccounts has a sync twin, so Exact may refuse it unfiltered (mandatory filtering, §13): read the twin
# by row version, or the codes one needs by `Code`. The twin itself is unconfirmed (§13), so both ways exist.
GL_SYNC_PATH = "sync/Financial/GLAccounts"
# `Code eq '…' or …` clauses are ~35 bytes URL-encoded: 40 keep a query far below the 8 KB limit (§13).
CODES_PER_QUERY = 40


def _frame(name: str, records: Iterable[dict]) -> pd.DataFrame:
    _path, fields = DIMENSION_QUERIES[name]
    frame = pd.DataFrame(list(records), columns=list(fields)).rename(columns=fields)
    for column in ("start_date", "end_date"):
        if column in frame:
            # Exact's dates are Amsterdam wall-clock (exact-online.md §4.5): keep the calendar day.
            frame[column] = frame[column].map(lambda v: v.date() if hasattr(v, "date") and v is not None
                                              and not pd.isna(v) else None)
    return frame


def _code_filters(codes: Iterable[str]) -> list[str]:
    ordered = sorted({c for c in codes if c})
    return [" or ".join(f"Code eq {string_literal(c)}" for c in ordered[i:i + CODES_PER_QUERY])
            for i in range(0, len(ordered), CODES_PER_QUERY)]


def read_codes(client: DimensionReader, name: str, codes: Iterable[str]) -> list[dict]:
    """The rows of these codes only (`Code eq … or …`, batched): a filter every endpoint accepts (§13)."""
    path, fields = DIMENSION_QUERIES[name]
    rows: list[dict] = []
    for flt in _code_filters(codes):
        rows.extend(client.get_all(path, select=list(fields), filter=flt))
    return rows


def read_gl_sync(client: DimensionReader, after: int) -> list[dict]:
    """GL accounts changed after row version `after` (`sync/Financial/GLAccounts?$filter=Timestamp gt NL`).

    Raises:
        ApiError: with status 400/404 when this division has no such endpoint (it is unconfirmed, §13).
    """
    _path, fields = DIMENSION_QUERIES["gl_accounts"]
    return client.sync_rows(GL_SYNC_PATH, list(fields), since=int(after))


def _no_endpoint(exc: ApiError) -> bool:
    return exc.status in (400, 404)


def fetch_dimension(client: DimensionReader, name: str, codes: Iterable[str] | None = None) -> pd.DataFrame:
    """One dimension table read afresh, in full.

    GL accounts are read through the sync twin; where it does not exist, the `codes` (the ones the mappings need)
    are read by Code, and without codes the plain endpoint is asked (which Exact may refuse, §13).
    """
    path, fields = DIMENSION_QUERIES[name]
    if name != "gl_accounts":
        return _frame(name, client.get_all(path, select=list(fields)))
    try:
        return _frame(name, read_gl_sync(client, 1))
    except ApiError as exc:
        if not _no_endpoint(exc):
            raise
        logger.info("%s is not available (%s); reading GL accounts by code", GL_SYNC_PATH, exc)
    if codes is not None:
        return _frame(name, read_codes(client, name, codes))
    return _frame(name, client.get_all(path, select=list(fields)))


def fetch_dimensions(client: DimensionReader, needed: dict[str, set[str]] | None = None) -> Dimensions:
    """Every dimension table read afresh (replay, check, reconciliation); `needed` as `needed_codes` returns it."""
    needed = needed or {}
    return Dimensions(**{name: fetch_dimension(client, name, needed.get(name)) for name in DIMENSION_QUERIES})


def needed_codes(conn: Connection, config: ProjectConfig) -> dict[str, set[str]]:
    """The codes this connection's mappings name, per dimension table: what a snapshot must know about."""
    policies = set(conn.expensify.policy_ids)
    gl = {row.gl_account for row in config.categories if row.policy_id is None or row.policy_id in policies}
    gl |= {conn.exact.employee_payable_account, conn.exact.card_liability_account, *conn.exact.card_accounts.values()}
    if conn.exact.rounding_account:
        gl.add(conn.exact.rounding_account)
    by_dim: dict[str, set[str]] = {"cost_center": set(), "cost_unit": set()}
    for level in config.tags:
        by_dim[level.dimension] |= set(level.values.values())
        if level.default:
            by_dim[level.dimension].add(level.default)
    for d in [*config.defaults.employees.values(), *config.defaults.categories.values()]:
        by_dim["cost_center"] |= {d.cost_center} if d.cost_center else set()
        by_dim["cost_unit"] |= {d.cost_unit} if d.cost_unit else set()
    return {"gl_accounts": {c for c in gl if c}, "cost_centers": by_dim["cost_center"],
            "cost_units": by_dim["cost_unit"], "journals": {conn.exact.journal},
            "vat_codes": {c for c in config.vat_codes.values() if c}}


# --- the stored snapshot ------------------------------------------------------------------------------------

# Checked for changes on every run (one call each): the tables that change often and whose ending or blocking a run
# must see before it posts. The others are re-read in full on a webhook, on a miss, or when older than MAX_AGE.
PER_RUN = ("gl_accounts", "cost_centers")
MAX_AGE = timedelta(days=7)
DIVISION_CHECK_TTL = timedelta(hours=24)
DIVISION_ACCESS = "division_access"
# Re-read rows modified this long before the newest one seen: a change committed late is not skipped.
MODIFIED_OVERLAP = timedelta(minutes=10)
_DATETIME = "$datetime"


class SnapshotStore(Protocol):
    def snapshot_get(self, scope: str, dimension: str) -> dict[str, Any] | None: ...

    def snapshot_put(self, scope: str, dimension: str, *, rows: list[dict], cursor: str | None, meta: dict,
                     refreshed_at: datetime, checked_at: datetime) -> None: ...


def snapshot_scope(division: int) -> str:
    return f"exact:division:{int(division)}"


def _to_json(row: dict) -> dict:
    return {k: {_DATETIME: v.isoformat()} if isinstance(v, datetime) else v for k, v in row.items()
            if k != "__metadata"}


def _from_json(row: dict) -> dict:
    return {k: datetime.fromisoformat(v[_DATETIME]) if isinstance(v, dict) and _DATETIME in v else v
            for k, v in row.items()}


@dataclass
class SnapshotRefresh:
    """What one refresh did: per table how it was brought up to date, and the rows it now holds."""

    dimensions: Dimensions
    how: dict[str, str] = field(default_factory=dict)  # table -> full | delta | codes | cached | miss
    changed: dict[str, int] = field(default_factory=dict)  # table -> rows added, changed or dropped


class DivisionChecks:
    """Remembers a successful division check in the state DB for DIVISION_CHECK_TTL, so a run that finds it fresh
    skips `current/Me` + `system/Divisions`. A division that became unreachable since still fails the first call with
    403 (DivisionAccessError); only the list of reachable divisions in that message waits for the next check."""

    def __init__(self, store, division: int, clock: Clock, ttl: timedelta = DIVISION_CHECK_TTL):
        self._store, self._scope, self._clock, self._ttl = store, snapshot_scope(division), clock, ttl

    def fresh(self) -> bool:
        try:
            stored = self._store.snapshot_get(self._scope, DIVISION_ACCESS)
        except Exception as exc:  # noqa: BLE001 - an unreadable cache only costs the check
            logger.warning("could not read the stored division check of %s: %s", self._scope, exc)
            return False
        return stored is not None and self._clock.now() - stored["checked_at"] < self._ttl

    def record(self) -> None:
        moment = self._clock.now()
        try:
            self._store.snapshot_put(self._scope, DIVISION_ACCESS, rows=[], cursor=None, meta={},
                                     refreshed_at=moment, checked_at=moment)
        except Exception as exc:  # noqa: BLE001 - the next run checks again
            logger.warning("could not record the division check of %s: %s", self._scope, exc)


def refresh_snapshot(client: DimensionReader, store: SnapshotStore, division: int, needed: dict[str, set[str]],
                     *, now: datetime, today: date, invalidated: dict[str, int] | None = None) -> SnapshotRefresh:
    """Bring the division's stored snapshot up to date with as few calls as honesty allows, and return it.

    Per table: no snapshot, one a webhook invalidated, or one older than MAX_AGE → read in full. Otherwise GL
    accounts and cost centers (PER_RUN) are asked only for what changed since (sync Timestamp, or Modified); the
    other tables are used as stored unless a code the mappings need is missing, ended or blocked in them (a miss),
    or no period covers `today`, which re-reads that table before anything is quarantined. A miss that a fresh read
    confirms is remembered, so it does not cost a call every run.

    Args:
        client: the division's ExactClient.
        store: the StateStore.
        division: the Exact division.
        needed: `needed_codes` of the connection(s) validating against this division.
        invalidated: table → id of the newest webhook event about it (`webhooks.dimensions_changed_since`); a
            table whose stored snapshot has not seen that event is re-read in full.
        now: the current time, by the connector's clock.
        today: the connection's day (`clock.connection_today`): a period must cover it.
    """
    scope = snapshot_scope(division)
    frames, hows, counts = {}, {}, {}
    for name in DIMENSION_QUERIES:
        stored = store.snapshot_get(scope, name)
        event = (invalidated or {}).get(name, 0)
        codes = needed.get(name, set())
        if (stored is None or now - stored["refreshed_at"] >= MAX_AGE
                or int(stored["meta"].get("webhook_event", 0)) < event):
            rows, cursor, meta, how = _full(client, name, codes)
            meta["webhook_event"] = event
            refreshed_at = now
            changed = len(rows)
        else:
            rows = [_from_json(r) for r in stored["rows"]]
            cursor, meta, refreshed_at = stored["cursor"], dict(stored["meta"]), stored["refreshed_at"]
            before = _fingerprint(rows)
            if name in PER_RUN:
                rows, cursor, how = _delta(client, name, rows, cursor, meta, codes)
            else:
                how = "cached"
            # What a delta or a read by code just said is fresh: a code they lack (or show ended) is confirmed
            # missing without a second call. A table used as stored is read again on a miss it has not confirmed.
            missing = set() if how != "cached" else _misses(name, rows, codes, today) - set(
                meta.get("confirmed_missing", []))
            if missing:
                logger.info("%s: %s not in the stored snapshot (or ended/blocked there): reading it again",
                            name, ", ".join(sorted(missing)))
                rows, cursor, meta, _ = _full(client, name, codes | set(meta.get("codes", [])), meta)
                meta["webhook_event"] = max(event, int(stored["meta"].get("webhook_event", 0)))
                refreshed_at, how = now, "miss"
            changed = len(_fingerprint(rows) ^ before)
        if how != "cached":
            meta["confirmed_missing"] = sorted(_misses(name, rows, codes, today))
        store.snapshot_put(scope, name, rows=[_to_json(r) for r in rows], cursor=cursor, meta=meta,
                           refreshed_at=refreshed_at, checked_at=now)
        frames[name] = _frame(name, rows)
        hows[name], counts[name] = how, changed
    return SnapshotRefresh(Dimensions(**frames), hows, counts)


def _full(client: DimensionReader, name: str, codes: set[str], meta: dict | None = None
          ) -> tuple[list[dict], str | None, dict, str]:
    """Read a table in full: rows, the cursor to continue from, meta, and how ("full" or "codes")."""
    path, fields = DIMENSION_QUERIES[name]
    if name == "gl_accounts":
        if (meta or {}).get("source") != "codes":
            try:
                rows = read_gl_sync(client, 1)
                return rows, _max_timestamp(rows, None), {"source": "sync"}, "full"
            except ApiError as exc:
                if not _no_endpoint(exc):
                    raise
                logger.info("%s is not available (%s); GL accounts are read by code", GL_SYNC_PATH, exc)
        known = codes | set((meta or {}).get("codes", []))
        return read_codes(client, name, known), None, {"source": "codes", "codes": sorted(known)}, "codes"
    rows = client.get_all(path, select=[*fields, "Modified"])
    return rows, _max_modified(rows, None), {"source": "full"}, "full"


def _delta(client: DimensionReader, name: str, rows: list[dict], cursor: str | None, meta: dict,
           codes: set[str]) -> tuple[list[dict], str | None, str]:
    """Merge what changed since the cursor into the stored rows (one call when little changed)."""
    if name == "gl_accounts" and meta.get("source") == "codes":
        # Without the sync twin the codes are simply read again: that also drops a deleted account.
        known = codes | set(meta.get("codes", []))
        meta["codes"] = sorted(known)
        return read_codes(client, name, known), None, "codes"
    if name == "gl_accounts":
        changed = read_gl_sync(client, int(cursor or 1))
        return _merge(rows, changed), _max_timestamp(changed, cursor), "delta"
    path, fields = DIMENSION_QUERIES[name]
    since = datetime.fromisoformat(cursor) - MODIFIED_OVERLAP if cursor else datetime(1900, 1, 1)
    changed = client.get_all(path, select=[*fields, "Modified"], filter=f"Modified gt {datetime_literal(since)}")
    return _merge(rows, changed), _max_modified(changed, cursor), "delta"


def _merge(rows: list[dict], changed: list[dict]) -> list[dict]:
    by_id = {str(r.get("ID")).lower(): r for r in rows}
    for row in changed:
        by_id[str(row.get("ID")).lower()] = row
    return list(by_id.values())


def _max_timestamp(rows: list[dict], cursor: str | None) -> str | None:
    values = [int(r["Timestamp"]) for r in rows if r.get("Timestamp") not in (None, "")]
    if cursor:
        values.append(int(cursor))
    return str(max(values)) if values else cursor


def _max_modified(rows: list[dict], cursor: str | None) -> str | None:
    """The newest Modified as Amsterdam wall-clock ISO text (what a datetime'…' literal means, §4.4/§4.5)."""
    values = [r["Modified"].astimezone(AMSTERDAM).replace(tzinfo=None) if r["Modified"].tzinfo else r["Modified"]
              for r in rows if isinstance(r.get("Modified"), datetime)]
    if cursor:
        values.append(datetime.fromisoformat(cursor))
    return max(values).isoformat() if values else cursor


def _fingerprint(rows: list[dict]) -> set[tuple]:
    return {tuple(sorted((k, str(v)) for k, v in r.items() if k not in ("Modified", "Timestamp"))) for r in rows}


def _misses(name: str, rows: list[dict], codes: set[str], today: date) -> set[str]:
    """Needed codes the rows lack or show ended/blocked; for periods, `today` when no period covers it."""
    frame = _frame(name, rows)
    if name == "financial_periods":
        covered = any(s is not None and s <= today and (e is None or today <= e)
                      for s, e in zip(frame["start_date"], frame["end_date"]))
        return set() if covered else {today.isoformat()}
    by_code = {str(c).strip(): r for c, r in zip(frame["code"], frame.to_dict("records"))}
    out = set()
    for code in codes:
        row = by_code.get(code)
        if row is None or row.get("is_blocked") is True or (
                row.get("end_date") is not None and row["end_date"] <= today):
            out.add(code)
    return out

"""Keeps a Dagster instance usable after crashes and concurrent starts, for commands that run jobs in-process:
one file lock for creating it, repair of what a crashed first start left, dead-run recovery, and a cheap wait for
live runs over the same connections."""

from __future__ import annotations

import os
import socket
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
from filelock import FileLock, Timeout

from expensify_exact.defs.partitions import connections_of_run
from expensify_exact.errors import ConnectorError
from expensify_exact.store import StateStore, process_gone_here, process_stat

LOCK_FILE = "expensify-exact.lock"
LOCK_TIMEOUT_SECONDS = 300.0
# Where this process's in-process runs say who runs them: "host:pid:start ticks" (the start time tells a reused pid).
PROCESS_TAG = "expensify_exact/process"
# A run whose process cannot be asked (another host, or launched by something that does not set PROCESS_TAG) counts
# as dead after this long without any event. Long enough for the quietest step: posting a long backfill at Exact's
# 60 calls a minute logs nothing for a while.
SILENCE_BOUND_SECONDS = 2 * 3600
DEFAULT_WAIT_TIMEOUT_SECONDS = 15 * 60
POLL_SECONDS = 1.0
# Dagster's SQLite storages, relative to $DAGSTER_HOME; each keeps its schema revision in `alembic_version`.
SQLITE_STORAGES = ("history/runs.db", "history/runs/index.db", "schedules/schedules.db")


class RunWaitTimeout(ConnectorError):
    """A live run over the same connections went on for longer than the caller would wait."""


class BrokenInstance(ConnectorError):
    """The Dagster instance's storage is damaged in a way this module does not repair by itself."""


def tell(message: str) -> None:
    """One line for the operator, on stderr so that `--json` output stays one JSON object."""
    print(message, file=sys.stderr, flush=True)


def before_launch(instance: dg.DagsterInstance, store: StateStore, connections: list[str], configured: list[str], *,
                  timeout: float, say: Callable[[str], None] = tell) -> dict[str, str]:
    """What every in-process launch does first: fail dead runs, wait for live runs over any of `connections` (at
    most `timeout` s; `configured` are all connection names, in config order); returns the tags that let a later
    command tell whether this run's process still lives."""
    home = Path(instance.root_directory) if instance.is_persistent else None
    wait_for_runs(instance, store, connections, configured, home=home, timeout=timeout, say=say)
    return process_tag()


def process_tag() -> dict[str, str]:
    stat = process_stat(os.getpid())
    return {PROCESS_TAG: f"{socket.gethostname()}:{os.getpid()}:{stat[19] if stat else ''}"}


@contextmanager
def home_lock(home: Path) -> Iterator[None]:
    """Serializes creating, migrating and repairing what lives in $DAGSTER_HOME across processes."""
    lock = FileLock(str(home / LOCK_FILE))
    try:
        lock.acquire(timeout=LOCK_TIMEOUT_SECONDS)
    except Timeout as exc:
        raise ConnectorError(f"another expensify-exact command has held {home / LOCK_FILE} for more than "
                             f"{LOCK_TIMEOUT_SECONDS:.0f} s") from exc
    try:
        yield
    finally:
        lock.release()


def open_embedded(home: Path, open_state: Callable[[], StateStore],
                  say: Callable[[str], None]) -> tuple[dg.DagsterInstance, StateStore]:
    """The Dagster instance in `home` and the connector's state, created or migrated by one process at a time, after
    repairing what an earlier crash or race left behind (each repair is said in one line)."""
    with home_lock(home):
        for note in repair_sqlite_storages(home):
            say(note)
        instance = dg.DagsterInstance.get()
        # Touch every storage now, so their tables and schema revisions are created under the lock.
        instance.run_storage.get_run_records(limit=1)
        instance.event_log_storage.get_pool_config()
        if instance.schedule_storage is not None:
            instance.schedule_storage.all_instigator_state()
        store = open_state()
    return instance, store


def repair_sqlite_storages(home: Path) -> list[str]:
    """Two first starts at once (Dagster 1.13 creates SQLite storage without a lock) can leave `alembic_version`
    with two rows, an older revision next to the one in force, after which every command fails with "more than one
    head present". The tables are those of the newest row, so the older rows are the only damage: delete them."""
    notes = []
    for relative in SQLITE_STORAGES:
        path = home / relative
        if not path.exists():
            continue
        with sqlite3.connect(path, timeout=30) as db:
            try:
                rows = [r[0] for r in db.execute("SELECT version_num FROM alembic_version")]
            except sqlite3.OperationalError:
                continue  # not stamped yet: Dagster stamps it when it opens the storage
            if len(rows) < 2:
                continue
            keep = _newest_revision(rows, path)
            db.execute("DELETE FROM alembic_version WHERE version_num != ?", (keep,))
            db.execute("DELETE FROM alembic_version WHERE rowid NOT IN (SELECT min(rowid) FROM alembic_version)")
        notes.append(f"repaired {path}: alembic_version held {', '.join(rows)} (left by two first starts at once); "
                     f"kept {keep}, the revision its tables have")
    return notes


def _newest_revision(rows: list[str], path: Path) -> str:
    from alembic.script import ScriptDirectory
    from alembic.script.revision import RevisionError
    from alembic.util import CommandError
    from dagster._core.storage import runs
    from dagster._core.storage.sql import get_alembic_config

    script = ScriptDirectory.from_config(get_alembic_config(runs.__file__))
    distinct = set(rows)
    for candidate in distinct:
        try:
            ancestors = {r.revision for r in script.walk_revisions(base="base", head=candidate)}
        except (RevisionError, CommandError):
            continue  # not a revision of this Dagster
        if distinct <= ancestors:
            return candidate
    raise BrokenInstance(f"{path}: alembic_version holds revisions {', '.join(sorted(distinct))} that are not one "
                         f"line of history. Move Dagster's folders history/ and schedules/ in $DAGSTER_HOME aside "
                         f"(run history only; never expensify_exact_state.db, the posted ledger) and run again")


@dataclass(frozen=True)
class Holder:
    run_id: str
    status: str
    started: datetime | None
    process: str | None

    def describe(self) -> str:
        when = f" since {self.started:%Y-%m-%d %H:%M:%S} UTC" if self.started else ""
        host, _, rest = (self.process or "").partition(":")
        where = f", pid {rest.partition(':')[0]} on {host}" if self.process else ""
        return f"run {self.run_id} ({self.status}{when}{where})"


def _holder(record) -> Holder:
    run = record.dagster_run
    started = datetime.fromtimestamp(record.start_time, UTC) if record.start_time else None
    return Holder(run.run_id, run.status.value, started, run.tags.get(PROCESS_TAG))


def recover_dead_runs(instance: dg.DagsterInstance, store: StateStore, say: Callable[[str], None]) -> list[str]:
    """Marks failed the runs of this instance whose process is gone; says and audits each in one line. Returns the
    run ids it failed."""
    failed = []
    records = instance.get_run_records(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED,
                                                              dg.DagsterRunStatus.STARTING,
                                                              dg.DagsterRunStatus.CANCELING]))
    for record in records:
        why = _why_dead(instance, record)
        if why is None:
            continue
        holder = _holder(record)
        run = record.dagster_run
        instance.report_run_failed(run, message=f"marked failed by expensify-exact: {why}")
        failed.append(run.run_id)
        line = (f"recovered: {holder.describe()} was left running by a process that is gone ({why}); "
                f"marked it failed. Its posts are settled by the ledger, none is repeated.")
        say(line)
        store.audit("dead_run_recovered", run_id=run.run_id, detail={"reason": why, "process": holder.process,
                                                                      "job": run.job_name})
    return failed


def _why_dead(instance: dg.DagsterInstance, record) -> str | None:
    """Why the run's process is gone, or None while it may still be running."""
    run_id = record.dagster_run.run_id
    process = record.dagster_run.tags.get(PROCESS_TAG)
    if process:
        host, _, rest = process.partition(":")
        pid, _, started = rest.partition(":")
        if host == socket.gethostname():
            return f"pid {pid} is not running" if process_gone_here(host, pid, started or None) else None
    last = instance.event_log_storage.get_records_for_run(run_id, ascending=False, limit=50).records
    pids = {r.event_log_entry.dagster_event.pid for r in last if r.event_log_entry.dagster_event is not None} - {None}
    if not process and pids and _local_storage(instance):
        # A run someone else launched on this SQLite instance (a file on this host), e.g. from `dagster dev`: its
        # recent events name the processes that wrote them (launcher, run worker); dead only when all are gone.
        host = socket.gethostname()
        if all(process_gone_here(host, str(pid)) for pid in pids):
            return f"pid {', '.join(map(str, sorted(pids)))} not running"
        return None
    latest = last[0].timestamp if last else record.update_timestamp.timestamp()
    silent = time.time() - latest
    if silent > SILENCE_BOUND_SECONDS:
        return f"no event for {silent / 60:.0f} min (bound {SILENCE_BOUND_SECONDS / 60:.0f} min)"
    return None


def _local_storage(instance: dg.DagsterInstance) -> bool:
    from dagster._core.storage.event_log import SqliteEventLogStorage

    return isinstance(instance.event_log_storage, SqliteEventLogStorage)


def wait_for_runs(instance: dg.DagsterInstance, store: StateStore, connections: list[str], configured: list[str], *,
                  home: Path | None, timeout: float, say: Callable[[str], None],
                  sleep: Callable[[float], None] = time.sleep) -> None:
    """Returns once no live run covers any of `connections`, recovering dead runs on the way (under the home lock
    when there is a home): two runs never work on one division at once from here. While a live run does, names it
    once and sleeps between looks; raises RunWaitTimeout after `timeout` s. A run that is gone is never waited for."""
    wanted = set(connections)
    deadline = time.monotonic() + timeout
    named: set[str] = set()
    while True:
        with home_lock(home) if home is not None else nullcontext():
            recover_dead_runs(instance, store, say)
        busy = _busy(instance, wanted, configured)
        if not busy:
            return
        for holder, overlap in busy:
            if holder.run_id not in named:
                named.add(holder.run_id)
                say(f"waiting for {holder.describe()}, which works on {_names(overlap)}; giving up after "
                    f"{timeout:.0f} s (--wait-timeout)")
        left = deadline - time.monotonic()
        if left <= 0:
            held = "; ".join(f"{h.describe()} on {_names(overlap)}" for h, overlap in busy)
            raise RunWaitTimeout(f"gave up after waiting {timeout:.0f} s (--wait-timeout) for {held}. A live run is "
                                 f"never failed: let it finish, or stop it, then run again")
        sleep(min(POLL_SECONDS, left))


def _names(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _busy(instance: dg.DagsterInstance, wanted: set[str], configured: list[str]) -> list[tuple[Holder, list[str]]]:
    """The live runs of other processes that cover some of `wanted`, with those connections."""
    mine = process_tag()[PROCESS_TAG]
    busy = []
    for record in instance.get_run_records(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED,
                                                                   dg.DagsterRunStatus.STARTING,
                                                                   dg.DagsterRunStatus.CANCELING])):
        run = record.dagster_run
        if run.tags.get(PROCESS_TAG) == mine:
            continue
        overlap = [name for name in connections_of_run(run.tags, configured) if name in wanted]
        if overlap:
            busy.append((_holder(record), overlap))
    return busy

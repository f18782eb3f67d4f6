"""`expensify_exact.defs.recovery` on a real SQLite Dagster instance: which runs count as dead, which live runs a
launch waits for (those over any of its connections, by their partition or connection tags), what is said, and which
broken homes are repaired. The CLI-level proofs are tests/crash/test_sigkill_cli_run.py and
tests/processes/test_embedded_instance.py; these pin the rules in between.
"""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import uuid
from datetime import date

import dagster as dg
import pytest
from dagster._core.storage.dagster_run import DagsterRun

from expensify_exact.defs.partitions import CONNECTION_TAG, rectangle_tags
from expensify_exact.defs.recovery import (
    PROCESS_TAG,
    BrokenInstance,
    RunWaitTimeout,
    process_tag,
    recover_dead_runs,
    repair_sqlite_storages,
    wait_for_runs,
)
from expensify_exact.store import process_stat

CONFIGURED = ["a", "b", "c", "d"]
DAY = date(2026, 11, 24)


@pytest.fixture
def instance(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    from expensify_exact.cli.support import EMBEDDED_INSTANCE_CONFIG

    (tmp_path / "dagster.yaml").write_text(EMBEDDED_INSTANCE_CONFIG)
    with dg.DagsterInstance.get() as instance:
        yield instance


@pytest.fixture
def other_process():
    """The PROCESS_TAG of another live process on this host."""
    with subprocess.Popen(["sleep", "60"]) as sleeper:
        try:
            yield f"{socket.gethostname()}:{sleeper.pid}:{process_stat(sleeper.pid)[19]}"
        finally:
            sleeper.kill()


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def _run(instance, process: str | None, status=dg.DagsterRunStatus.STARTED, connections=("a",)) -> str:
    """A run of the main job over `connections` × DAY, said to be run by `process`."""
    run_id = str(uuid.uuid4())
    tags = rectangle_tags(list(connections), DAY, DAY) | ({PROCESS_TAG: process} if process else {})
    instance.add_run(DagsterRun(job_name="post_approved_expenses", run_id=run_id, status=status, tags=tags))
    return run_id


def _wait(instance, store, connections, timeout=0.0, said=None, sleeps=None) -> None:
    wait_for_runs(instance, store, connections, CONFIGURED, home=None, timeout=timeout,
                  say=(said if said is not None else []).append,
                  sleep=(sleeps if sleeps is not None else []).append)


def test_a_run_whose_process_is_gone_is_failed_and_said_once(instance, store):
    host = socket.gethostname()
    dead = _run(instance, f"{host}:{_dead_pid()}:")
    said: list[str] = []
    assert recover_dead_runs(instance, store, said.append) == [dead]
    assert instance.get_run_by_id(dead).status == dg.DagsterRunStatus.FAILURE
    assert len(said) == 1 and said[0].startswith(f"recovered: run {dead} (STARTED, pid ")
    assert [r["event"] for r in store.audit_rows()] == ["dead_run_recovered"]
    assert recover_dead_runs(instance, store, said.append) == [] and len(said) == 1
    _wait(instance, store, ["a"])  # a dead run is never waited for


def test_a_reused_pid_is_not_mistaken_for_the_run(instance, store):
    """The tag keeps the pid's start time: this process's pid, with another start time, is someone else."""
    host, pid, started = process_tag()[PROCESS_TAG].split(":")
    other = _run(instance, f"{host}:{_dead_pid()}:{started}")
    reused = str(uuid.uuid4())
    with subprocess.Popen(["sleep", "30"]) as sleeper:  # alive, but started later than the run's process
        instance.add_run(DagsterRun(job_name="j", run_id=reused, status=dg.DagsterRunStatus.STARTED,
                                    tags={PROCESS_TAG: f"{host}:{sleeper.pid}:1"}))
        try:
            assert set(recover_dead_runs(instance, store, lambda _: None)) == {other, reused}
        finally:
            sleeper.kill()


def test_a_live_run_over_some_of_the_same_connections_is_waited_for_named_once_and_given_up_on(
        instance, store, other_process):
    live = _run(instance, other_process, connections=("a", "b", "c"))
    said: list[str] = []
    sleeps: list[float] = []
    gave_up = rf"gave up after waiting 3 s \(--wait-timeout\) for run {live} \(STARTED.* on b, c\. A live run is never"
    with pytest.raises(RunWaitTimeout, match=gave_up):
        _wait(instance, store, ["b", "c", "d"], timeout=3, said=said, sleeps=sleeps)
    assert instance.get_run_by_id(live).status == dg.DagsterRunStatus.STARTED
    pid = other_process.split(":")[1]
    assert len(said) == 1 and said[0].startswith(f"waiting for run {live} (")
    assert said[0].endswith(f", pid {pid} on {socket.gethostname()}), which works on b, c; giving up after 3 s "
                            f"(--wait-timeout)")
    assert sleeps and all(0 < s <= 1.0 for s in sleeps), "it sleeps between looks"


def test_runs_over_other_connections_or_of_this_process_are_not_waited_for(instance, store, other_process):
    _run(instance, other_process, connections=("a", "b"))
    _run(instance, process_tag()[PROCESS_TAG], connections=("c",))
    said: list[str] = []
    _wait(instance, store, ["c", "d"], said=said)
    assert said == []


def test_a_run_named_by_its_connection_tag_is_waited_for(instance, store, other_process):
    """A run without partitions (a replay) says its connections in CONNECTION_TAG; one no longer configured too."""
    replay = str(uuid.uuid4())
    instance.add_run(DagsterRun(job_name="quarantine_replay", run_id=replay, status=dg.DagsterRunStatus.STARTED,
                                tags={CONNECTION_TAG: "d,gone", PROCESS_TAG: other_process}))
    with pytest.raises(RunWaitTimeout, match=f"for run {replay} .* on gone"):
        _wait(instance, store, ["gone"])
    with pytest.raises(RunWaitTimeout, match=f"for run {replay} .* on d"):
        _wait(instance, store, ["d"])
    _wait(instance, store, ["a"])


def test_runs_on_another_host_are_left_to_the_silence_bound(instance, store):
    _run(instance, f"not-{socket.gethostname()}:{_dead_pid()}:")
    assert recover_dead_runs(instance, store, lambda _: None) == []  # it spoke just now


def test_two_alembic_rows_on_one_line_of_history_are_repaired_and_other_damage_is_refused(instance, tmp_path):
    runs_db = tmp_path / "history" / "runs.db"
    with sqlite3.connect(runs_db) as db:
        [head] = [r[0] for r in db.execute("SELECT version_num FROM alembic_version")]
        db.execute("INSERT INTO alembic_version VALUES ('5771160a95ad')")
    [note] = repair_sqlite_storages(tmp_path)
    assert note.startswith(f"repaired {runs_db}") and note.endswith(f"kept {head}, the revision its tables have")
    with sqlite3.connect(runs_db) as db:
        assert [r[0] for r in db.execute("SELECT version_num FROM alembic_version")] == [head]
        db.execute("INSERT INTO alembic_version VALUES ('not-a-revision-of-dagster')")
    with pytest.raises(BrokenInstance, match="not one line of history. Move Dagster's folders history/ and sch"):
        repair_sqlite_storages(tmp_path)

"""`expensify_exact.defs.recovery` on a real SQLite Dagster instance: which runs count as dead, what is freed, what is
said, and which broken homes are repaired. The CLI-level proofs are tests/crash/test_sigkill_cli_run.py and
tests/processes/test_embedded_instance.py; these pin the rules in between.
"""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import uuid

import dagster as dg
import pytest
from dagster._core.storage.dagster_run import DagsterRun

from expensify_exact.defs.recovery import (
    PROCESS_TAG,
    BrokenInstance,
    PoolWaitTimeout,
    process_tag,
    recover_dead_runs,
    repair_sqlite_storages,
    wait_for_pools,
)

POOL = "exact_division_1"


@pytest.fixture
def instance(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    from expensify_exact.cli.support import EMBEDDED_INSTANCE_CONFIG

    (tmp_path / "dagster.yaml").write_text(EMBEDDED_INSTANCE_CONFIG)
    with dg.DagsterInstance.get() as instance:
        instance.event_log_storage.set_concurrency_slots(POOL, 1)
        yield instance


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def _holding_run(instance, process: str | None, status=dg.DagsterRunStatus.STARTED) -> str:
    run_id = str(uuid.uuid4())
    instance.add_run(DagsterRun(job_name="post_approved_expenses", run_id=run_id, status=status,
                                tags={PROCESS_TAG: process} if process else {}))
    assert instance.event_log_storage.claim_concurrency_slot(POOL, run_id, "posting").is_claimed
    return run_id


def test_a_run_whose_process_is_gone_is_failed_its_slot_freed_and_said_once(instance, store):
    host = socket.gethostname()
    dead = _holding_run(instance, f"{host}:{_dead_pid()}:")
    said: list[str] = []
    assert recover_dead_runs(instance, store, said.append) == [dead]
    assert instance.get_run_by_id(dead).status == dg.DagsterRunStatus.FAILURE
    assert instance.event_log_storage.get_concurrency_info(POOL).claimed_slots == []
    assert len(said) == 1 and said[0].startswith(f"recovered: run {dead} (STARTED, pid ")
    assert [r["event"] for r in store.audit_rows()] == ["dead_run_recovered"]
    assert recover_dead_runs(instance, store, said.append) == [] and len(said) == 1


def test_a_reused_pid_is_not_mistaken_for_the_run(instance, store):
    """The tag keeps the pid's start time: this process's pid, with another start time, is someone else."""
    host, pid, started = process_tag()[PROCESS_TAG].split(":")
    other = _holding_run(instance, f"{host}:{_dead_pid()}:{started}")
    reused = str(uuid.uuid4())
    with subprocess.Popen(["sleep", "30"]) as sleeper:  # alive, but started later than the run's process
        instance.add_run(DagsterRun(job_name="j", run_id=reused, status=dg.DagsterRunStatus.STARTED,
                                    tags={PROCESS_TAG: f"{host}:{sleeper.pid}:1"}))
        try:
            assert set(recover_dead_runs(instance, store, lambda _: None)) == {other, reused}
        finally:
            sleeper.kill()


def test_a_live_holder_is_waited_for_named_once_and_given_up_on(instance, store):
    live = _holding_run(instance, process_tag()[PROCESS_TAG])
    said: list[str] = []
    sleeps: list[float] = []
    gave_up = rf"gave up after waiting 3 s \(--wait-timeout\) for {POOL} by run {live}"
    with pytest.raises(PoolWaitTimeout, match=gave_up):
        wait_for_pools(instance, store, [POOL], home=None, timeout=3, say=said.append, sleep=sleeps.append)
    assert instance.get_run_by_id(live).status == dg.DagsterRunStatus.STARTED
    assert [s.split(":")[0] for s in said] == [f"waiting for pool {POOL}"]
    assert sleeps and all(0 < s <= 1.0 for s in sleeps), "it sleeps between looks"


def test_slots_still_held_by_a_finished_run_are_freed(instance, store):
    finished = _holding_run(instance, None, status=dg.DagsterRunStatus.SUCCESS)
    said: list[str] = []
    recover_dead_runs(instance, store, said.append)
    assert said == [f"recovered: freed the pool slots still held by run {finished}, which is success"]
    wait_for_pools(instance, store, [POOL], home=None, timeout=0, say=said.append, sleep=lambda _: None)


def test_runs_on_another_host_are_left_to_the_silence_bound(instance, store):
    _holding_run(instance, f"not-{socket.gethostname()}:{_dead_pid()}:")
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


def test_a_paused_pool_is_said_and_given_up_on(instance, store):
    instance.event_log_storage.set_concurrency_slots(POOL, 0)
    said: list[str] = []
    with pytest.raises(PoolWaitTimeout, match=f"for {POOL} by its limit of 0"):
        wait_for_pools(instance, store, [POOL], home=None, timeout=2, say=said.append, sleep=lambda _: None)
    assert said == [f"waiting for pool {POOL}: its limit is 0 (paused; `dagster instance concurrency set {POOL} 1` "
                    f"resumes it); giving up after 2 s (--wait-timeout)"]

"""The executor is the operator's choice (`EXPENSIFY_EXACT_EXECUTOR`), and scale-out on Celery works: the main job's
steps spread over two worker processes, each started as an operator starts one (`scripts/celery-worker.sh`) on this
machine's RabbitMQ, the run started with `dagster job execute` on a PostgreSQL Dagster instance with
EXPENSIFY_EXACT_EXECUTOR=celery. Every step runs in a worker's pool process, both workers take steps, every report is
posted exactly once, and the division's minute limit holds across the processes (the shared rate-limit board in the
state DB), with the limit set below what the run needs, so it has to wait.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import dagster as dg
import kombu
import pytest
import yaml

from expensify_exact.config import load_project_config
from expensify_exact.defs import executor
from expensify_exact.defs.executor import BROKER_ENV, DEFAULT_BROKER, EXECUTOR_ENV
from expensify_exact.defs.jobs import MAIN_JOB_NAME
from expensify_exact.defs.partitions import partition_tags
from expensify_exact_sandbox import seed
from tests.conftest import MAPPINGS, REPO
from tests.crash.driver import assert_exactly_once_and_ledger_matches
from tests.factories import run_cli

BIN = Path(sys.executable).parent
CONNECTION = "vermeerhals-nl"  # the shipped mappings' connection, on the sandbox's demo division
WORKERS = ("first", "second")
DEADLINE = 300  # seconds any one wait may take before the test fails instead of hanging
QUARANTINED = {seed._report_id(101), seed._report_id(102)}  # the demo data's two deliberate problems
# Exact calls a minute the division allows here: fewer than the run makes, so the workers' steps must share one
# budget and wait for the next minute instead of earning 429s.
MINUTELY_LIMIT = 20


def _approved_in_demo_window(sandbox) -> tuple[str, str, set[str]]:
    """The demo's 30 days (the seed's days before today) and the reports approved on them, in Amsterdam time."""
    start, end = sandbox.seed.today - timedelta(days=31), sandbox.seed.today - timedelta(days=1)
    amsterdam = ZoneInfo("Europe/Amsterdam")
    reports = {r.report_id for r in sandbox.seed.approved_reports
               if start <= r.approved.replace(tzinfo=ZoneInfo("UTC")).astimezone(amsterdam).date() <= end}
    return start.isoformat(), end.isoformat(), reports


def _broker_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture
def broker():
    """RabbitMQ on 127.0.0.1:5672 (`.ci/run` starts it); skipped without it, except in CI."""
    if not _broker_reachable():
        if os.environ.get("CI"):
            pytest.fail("RabbitMQ is not listening on 127.0.0.1:5672 (.ci/run starts it)")
        pytest.skip("RabbitMQ is not listening on 127.0.0.1:5672")
    return DEFAULT_BROKER


@pytest.fixture
def queue(broker, monkeypatch):
    """A queue of this test's own, so no other worker on the broker takes its steps; deleted afterwards."""
    name = f"expensify_exact_test_{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("EXPENSIFY_EXACT_CELERY_QUEUE", name)
    monkeypatch.setenv(BROKER_ENV, broker)
    yield name
    with kombu.Connection(broker) as connection:
        connection.default_channel.queue_delete(name)


@pytest.fixture
def workers(tmp_path):
    """Started worker processes by name, each the leader of its own process group (its pool processes under it),
    SIGKILLed at the end whatever happened; their logs are printed when the test failed."""
    started: dict[str, subprocess.Popen] = {}
    yield started
    for process in started.values():
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)
    for log in sorted((tmp_path / "logs").glob("*.log")):
        print(f"----- {log.name} (last 3000 characters) -----\n{log.read_text(errors='replace')[-3000:]}")


def _descendants(pid: int) -> set[int]:
    """Every process under `pid`, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def _wait_ready(workers: dict[str, subprocess.Popen], logs: Path) -> None:
    deadline = time.monotonic() + DEADLINE
    waiting = set(workers)
    while waiting and time.monotonic() < deadline:
        for name in list(waiting):
            if workers[name].poll() is not None:
                pytest.fail(f"worker {name} exited with {workers[name].returncode} before it was ready")
            if " ready." in (logs / f"{name}.log").read_text(errors="replace"):
                waiting.discard(name)
        time.sleep(0.2)
    assert not waiting, f"workers not ready after {DEADLINE} s: {sorted(waiting)}"


@pytest.mark.parametrize(("setting", "executor_name"), [
    (None, "multi_or_in_process_executor"), ("multiprocess", "multi_or_in_process_executor"), (" Celery ", "celery")])
def test_the_operator_chooses_the_executor_in_the_environment(monkeypatch, setting, executor_name):
    if setting is None:
        monkeypatch.delenv(EXECUTOR_ENV, raising=False)
    else:
        monkeypatch.setenv(EXECUTOR_ENV, setting)
    assert executor.build(load_project_config(str(MAPPINGS))).executor.name == executor_name


def test_an_unknown_executor_is_refused_when_the_code_location_loads(monkeypatch):
    monkeypatch.setenv(EXECUTOR_ENV, "k8s")
    with pytest.raises(ValueError, match=f"{EXECUTOR_ENV}='k8s': expected 'multiprocess' or 'celery'"):
        executor.build(load_project_config(str(MAPPINGS)))


@pytest.mark.postgres
@pytest.mark.slow
def test_two_celery_workers_share_the_main_jobs_steps_and_post_every_report_once(
        sandbox, sandbox_mappings, pg_database, queue, workers, tmp_path, monkeypatch):
    state_url = pg_database  # Dagster's tables and the connector's share the database, as in production
    assert run_cli(sandbox_mappings, state_url, "secrets", "set", "--connection", CONNECTION, "--from-env") == 0
    sandbox.exact.set_knobs(minutely_limit=MINUTELY_LIMIT)
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(
        {"storage": {"postgres": {"postgres_url": pg_database}}, "telemetry": {"enabled": False}}))
    env = {**os.environ, "DAGSTER_HOME": str(home), "EXPENSIFY_EXACT_MAPPINGS": str(sandbox_mappings),
           "EXPENSIFY_EXACT_STATE_URL": state_url, "EXPENSIFY_EXACT_EXECUTOR": "celery",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}

    # Two workers, as a user starts them, one pool process each, so that both must take steps for the run to finish
    # the parallel ones side by side.
    logs = tmp_path / "logs"
    logs.mkdir()
    for name in WORKERS:
        with open(logs / f"{name}.log", "wb") as out:
            workers[name] = subprocess.Popen(
                ["bash", str(REPO / "scripts" / "celery-worker.sh"), "--hostname", f"{name}@%h", "--concurrency", "1"],
                env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    _wait_ready(workers, logs)

    start, end, approved = _approved_in_demo_window(sandbox)
    expected = approved - QUARANTINED
    tags = partition_tags(CONNECTION, CONNECTION, start, end)
    execute = subprocess.run(
        [str(BIN / "dagster"), "job", "execute", "-m", "expensify_exact.definitions", "-j", MAIN_JOB_NAME,
         "--tags", json.dumps(tags)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=DEADLINE)
    assert execute.returncode == 0, execute.stdout[-5000:] + execute.stderr[-5000:]

    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as instance:
        [run] = instance.get_runs(filters=dg.RunsFilter(job_name=MAIN_JOB_NAME))
        assert run.status == dg.DagsterRunStatus.SUCCESS
        succeeded = {r.dagster_event.step_key
                     for r in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_SUCCESS)}
        worker_of_step = {}
        for record in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
            metadata = record.dagster_event.event_specific_data.metadata
            if "Celery worker" in metadata:
                worker_of_step[record.dagster_event.step_key] = metadata["Celery worker"].value.split("@")[0]
        step_pids = {r.dagster_event.step_key: r.dagster_event.pid
                     for r in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_START)}

    assert len(succeeded) >= 4, f"the chain's steps: {sorted(succeeded)}"
    assert set(worker_of_step) == succeeded, "every step was executed by a Celery worker"
    assert set(worker_of_step.values()) == set(WORKERS), f"both workers took steps: {worker_of_step}"
    pool_of = {name: _descendants(workers[name].pid) for name in WORKERS}
    for step, pid in step_pids.items():
        assert pid in pool_of[worker_of_step[step]], f"{step} ran in pid {pid}, not in {worker_of_step[step]}'s pool"

    # Every report once in Exact, the ledger entry for entry the same, no intent left open.
    assert_exactly_once_and_ledger_matches(sandbox, state_url, expected, CONNECTION, seed.DIVISION)

    # The division's limit held across both workers' processes: the run needed more than a minute's calls, and waited.
    stats = sandbox.exact.stats
    assert stats["calls_by_division"][str(seed.DIVISION)] > MINUTELY_LIMIT, stats["calls_by_division"]
    assert stats["rate_limited"] == {"minutely": 0, "daily": 0}
    assert stats["max_calls_per_minute"][str(seed.DIVISION)] <= MINUTELY_LIMIT
    assert sandbox.expensify.stats["rate_limited"] == 0

"""The Dagster UI a new user opens after `make demo`: a real dagster-webserver on 127.0.0.1, driven by Debian's
Chromium through Playwright (no browser download; shared/reference/browser-tests.md).

The instance is filled the way the demo fills it: the demo window through `run_range` against the sandbox. The
webserver then loads the code location for the same mappings, and the test reads what a person would see: the
asset graph of the chain (one asset per stage, partitioned by connection × day), the connection's days of the
journal drafts, and a quarantined day's reports. Screenshots are
kept under artifacts/ for a human to look at.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, write_mappings

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps calling outside hosts, which CI refuses.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
ARTIFACTS = REPO / "artifacts"
CONNECTION = "vermeerhals-nl"
GROUP = "expenses"  # keys.GROUP: one group for the chain of every connection
LOCATION = "expensify_exact.definitions"  # the code location's name under `-m expensify_exact.definitions`
STARTUP_TIMEOUT = 90.0
UI_TIMEOUT_MS = 30_000


def _require_browser() -> None:
    """Skip outside CI when Chromium or the driver is genuinely missing; in CI that is a failure."""
    missing = []
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(f"{CHROMIUM} is missing (`make test` installs it as root: apt-get install -y chromium)")
    if importlib.util.find_spec("playwright") is None:
        missing.append("the playwright package is missing (pip install -e '.[browser]'; never `playwright install`)")
    if not missing:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail("CI must run the browser test: " + "; ".join(missing))
    pytest.skip("; ".join(missing))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_location(base: str, process: subprocess.Popen, log: Path) -> None:
    """Until the webserver answers and the code location has loaded; a load error fails with its message."""
    query = ("{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus "
             "locationOrLoadError { __typename ... on PythonError { message } } } } } }")
    deadline = time.monotonic() + STARTUP_TIMEOUT
    last = "no answer"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"dagster-webserver exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            answer = httpx.post(f"{base}/graphql", json={"query": query}, timeout=5).json()
            entries = answer["data"]["workspaceOrError"]["locationEntries"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            last = repr(exc)
        else:
            entry = next((e for e in entries if e["name"] == LOCATION), None)
            error = (entry or {}).get("locationOrLoadError") or {}
            if error.get("__typename") == "PythonError":
                pytest.fail(f"the code location failed to load: {error['message']}")
            if entry and entry["loadStatus"] == "LOADED" and error.get("__typename") == "RepositoryLocation":
                return
            last = json.dumps(entries)
        time.sleep(0.5)
    pytest.fail(f"dagster-webserver was not ready within {STARTUP_TIMEOUT:.0f} s ({last}):\n{log.read_text()[-3000:]}")


def _dismiss_community_dialog(base: str) -> None:
    """The UI greets a new instance with a "Join the Dagster community" dialog over the page; mark it seen."""
    httpx.post(f"{base}/graphql", json={"query": "mutation { setNuxSeen }"}, timeout=10).raise_for_status()
    answer = httpx.post(f"{base}/graphql", json={"query": "{ shouldShowNux }"}, timeout=10).json()
    assert answer["data"]["shouldShowNux"] is False, answer


@pytest.fixture(scope="module")
def demo_ui(tmp_path_factory):
    """dagster-webserver on a Dagster home holding the demo window's run, for the mappings that run used.

    The webserver starts before the run (it only loads the code location), so both get going at once.
    """
    import dagster as dg
    from cryptography.fernet import Fernet

    from expensify_exact.cli.main import main
    from expensify_exact.defs.runs import run_range
    from expensify_exact_sandbox.cli import DEMO_CREDENTIALS_ENV
    from expensify_exact_sandbox.server import SandboxServer

    _require_browser()
    root = tmp_path_factory.mktemp("dagster_ui")
    home = root / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    state_url = f"sqlite:///{root / 'state.db'}"
    ARTIFACTS.mkdir(exist_ok=True)
    log = ARTIFACTS / "dagster-webserver.log"
    base = f"http://127.0.0.1:{(port := _free_port())}"
    with pytest.MonkeyPatch.context() as env, SandboxServer() as sandbox:
        env.setenv("DAGSTER_HOME", str(home))
        env.setenv("EXPENSIFY_EXACT_KEY", Fernet.generate_key().decode())
        for name, value in DEMO_CREDENTIALS_ENV.items():  # a module fixture: the autouse env fixture comes later
            env.setenv(name, value)
        sandbox.expensify.set_knobs(render_delay_seconds=0.3)
        mappings = write_mappings(root / "mappings", sandbox, expensify__poll_interval_seconds=0.2)
        server_env = os.environ | {"EXPENSIFY_EXACT_MAPPINGS": str(mappings), "EXPENSIFY_EXACT_STATE_URL": state_url,
                                   "PYTHONUNBUFFERED": "1"}
        command = [str(Path(sys.executable).parent / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port),
                   "-m", LOCATION]
        with log.open("w") as out:
            process = subprocess.Popen(command, cwd=REPO, env=server_env, stdout=out, stderr=subprocess.STDOUT)
        try:
            assert main(["--mappings", str(mappings), "--state-url", state_url, "secrets", "set",
                         "--connection", CONNECTION, "--from-env"]) == 0
            start, end = sandbox.seed.today - timedelta(days=31), sandbox.seed.today - timedelta(days=1)
            with dg.DagsterInstance.get() as instance:
                summary = run_range(start, end, mappings_dir=str(mappings), state_url=state_url, instance=instance)
            assert summary.success, summary.failure
            quarantined = int((summary.outcomes["outcome"] == "quarantined").sum())
            assert quarantined == 2, "the demo seeds two problems"
            _wait_for_location(base, process, log)
            _dismiss_community_dialog(base)
            held = summary.outcomes[summary.outcomes["outcome"] == "quarantined"]
            yield {"base": base, "start": start, "end": end, "days": (end - start).days + 1,
                   "quarantined": {day: sorted(c for codes in rows["reason_codes"] for c in codes)
                                   for day, rows in held.groupby("partition_date")}}
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    _require_browser()
    playwright = sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
    finally:
        playwright.stop()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    yield context.new_page()
    context.close()


def _open(page, url: str, ready_text: str) -> None:
    """Go to `url` and wait until `ready_text` shows (the UI loads its data after the page)."""
    from playwright.sync_api import expect

    page.goto(url)
    expect(page.get_by_text(ready_text, exact=True).first).to_be_visible(timeout=UI_TIMEOUT_MS)


def _metadata_value(page, key: str) -> str:
    """The value of a row of a metadata table: the last non-empty cell after the key (the asset's overview has Key |
    Timestamp | Value, a partition's Key | Value and an empty cell)."""
    from playwright.sync_api import expect

    row = page.locator("tr").filter(has=page.get_by_text(key, exact=True)).first
    expect(row).to_be_visible(timeout=UI_TIMEOUT_MS)
    return next((t.strip() for t in reversed(row.locator("td").all_inner_texts()[1:]) if t.strip()), "")


# The daily-partitioned chain; the dimension snapshots beside it (exact/gl_accounts, …) are shown but not counted.
CHAIN = ("expensify/raw_reports", "expensify/expense_lines", "exact/journal_drafts", "exact/journal_entries_posted",
         "quarantine")
SNAPSHOTS = ("exact/gl_accounts", "exact/cost_centers")


def test_asset_graph_shows_the_connections_asset_chain_materialized_for_every_demo_day(demo_ui, page):
    from playwright.sync_api import expect

    _open(page, f"{demo_ui['base']}/locations/{LOCATION}/asset-groups/{GROUP}", "journal_drafts")
    for key in CHAIN + SNAPSHOTS:
        expect(page.get_by_text(key.split("/")[-1], exact=True).first).to_be_visible()
    # Each node's live data (latest event, partitions) arrives after the graph itself.
    expect(page.get_by_text("Loading...")).to_have_count(0, timeout=UI_TIMEOUT_MS)
    expect(page.get_by_text(re.compile(r"^\d+% filled$")).first).to_be_visible()
    expect(page.get_by_role("dialog")).to_have_count(0)
    page.screenshot(path=str(ARTIFACTS / "dagster-asset-graph.png"))

    # The list view of the same group counts each asset's materialized days: the demo window, none failed.
    _open(page, f"{demo_ui['base']}/locations/{LOCATION}/asset-groups/{GROUP}/list",
          "exact / journal_drafts")
    for key in CHAIN + SNAPSHOTS:
        expect(page.locator(f'a[href="/assets/{key}"]').first).to_be_visible()
    # The counts arrive after the rows: each partitioned asset shows the window's days as materialized.
    expect(page.get_by_text(str(demo_ui["days"]), exact=True).nth(len(CHAIN) - 1)).to_be_visible(
        timeout=UI_TIMEOUT_MS)
    page.screenshot(path=str(ARTIFACTS / "dagster-asset-list.png"))


def test_journal_drafts_partitions_show_the_demo_days_and_each_quarantined_days_reports(demo_ui, page):
    from playwright.sync_api import expect

    drafts = f"{demo_ui['base']}/assets/exact/journal_drafts"
    # One asset for every connection: its partitions are connection × day, the demo connection's days materialized.
    _open(page, f"{drafts}?view=partitions", f"Materialized ({demo_ui['days']})")
    expect(page.get_by_text("Failed (0)", exact=True)).to_be_visible()
    expect(page.get_by_placeholder("Filter by connection…")).to_be_visible()
    expect(page.get_by_text(CONNECTION, exact=True).first).to_be_visible()
    expect(page.get_by_text(demo_ui["end"].isoformat(), exact=True).first).to_be_visible()
    # The list is virtualized: the window's first day shows once the list is filtered to it.
    page.get_by_placeholder("Filter by day…").fill(demo_ui["start"].isoformat())
    expect(page.get_by_text(demo_ui["start"].isoformat(), exact=True).first).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "dagster-journal-drafts-partitions.png"))

    # Each (connection, day) keeps its own metadata: a quarantined day shows its rejected reports and why.
    assert sum(len(codes) for codes in demo_ui["quarantined"].values()) == 2, "the demo seeds two problems"

    for day, codes in sorted(demo_ui["quarantined"].items()):
        partition = f"{CONNECTION}|{day}"
        _open(page, f"{drafts}?view=partitions&partition={partition}", partition)
        assert _metadata_value(page, "rejected_reports") == str(len(codes))
        for code in codes:
            expect(page.get_by_text(code, exact=True).first).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / f"dagster-journal-drafts-{day}.png"), full_page=True)

        _open(page, f"{demo_ui['base']}/assets/quarantine?view=partitions&partition={partition}", partition)
        assert _metadata_value(page, "quarantined_reports") == str(len(codes))
        for code in codes:
            assert _metadata_value(page, f"reason_{code}") == "1"
        page.screenshot(path=str(ARTIFACTS / f"dagster-quarantine-{day}.png"), full_page=True)

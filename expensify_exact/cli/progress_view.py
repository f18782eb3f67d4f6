"""What `expensify-exact run` and `quarantine replay` show while they work: on a terminal a live `rich` display
(days and reports done of the total, posted/quarantined so far, and any rate-limit wait: how long and why);
otherwise, or with `--json`, a plain line per day (on stderr with `--json`, so stdout stays one JSON object)."""

from __future__ import annotations

import os
import sys
from abc import ABC, abstractmethod
from collections import Counter
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Iterator, Self, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from expensify_exact import progress

PLAIN_WAIT_SECONDS = 5.0  # shorter waits are not worth a line of their own


class _Tally:
    """What the events said so far, shared by both displays."""

    def __init__(self, total_days: int | None):
        self.total_days = total_days
        self.days_done = 0
        self.reports_total = 0
        self.reports_done = 0
        self.outcomes: Counter[str] = Counter()

    def update(self, event: progress.Event) -> None:
        if isinstance(event, progress.ReportsPlanned):
            self.reports_total += sum(event.reports_per_day.values())
        elif isinstance(event, progress.ReportSettled):
            self.reports_done += 1
            self.outcomes[event.outcome] += 1
        elif isinstance(event, progress.DayDone):
            self.days_done += 1

    def so_far(self) -> str:
        o = self.outcomes
        text = f"posted {o['posted']}, quarantined {o['quarantined']}, already posted {o['already_posted']}"
        if o["deferred"]:
            text += f", deferred {o['deferred']}"
        return text


class _View(ABC):
    """Both displays: a progress subscriber that tallies each event, then draws it (`_draw`), until closed."""

    def __init__(self, total_days: int | None):
        self.tally = _Tally(total_days)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self._close()

    def __call__(self, event: progress.Event) -> None:
        self.tally.update(event)
        self._draw(event, self.tally)

    @abstractmethod
    def _draw(self, event: progress.Event, t: _Tally) -> None:
        """Show what `event` changed; `t` already counts it."""

    @abstractmethod
    def _close(self) -> None:
        """Leave the terminal or stream as the command's own output expects it."""


class RichView(_View):
    def __init__(self, console: Console, total_days: int | None):
        super().__init__(total_days)
        self._progress = Progress(TextColumn("{task.description:<8}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console)
        self._days = self._progress.add_task("days", total=total_days, info="", visible=total_days is not None)
        self._reports = self._progress.add_task("reports", total=None, info="")
        self._status = self._progress.add_task("", total=None, info="starting", visible=True)

    def __enter__(self) -> Self:
        self._progress.start()
        return self

    def _close(self) -> None:
        self._progress.stop()

    def _draw(self, event: progress.Event, t: _Tally) -> None:
        self._progress.update(self._days, completed=t.days_done)
        self._progress.update(self._reports, completed=t.reports_done, total=t.reports_total or None,
                              info=t.so_far())
        if isinstance(event, progress.Waiting):
            until = f" (until {event.until:%H:%M:%S} UTC)" if event.until else ""
            self._status_text(f"waiting {event.seconds:.0f} s for {_service(event.service)}: {event.reason}{until}")
        elif isinstance(event, progress.Phase):
            self._status_text(f"{event.connection}: {event.text}")
        elif isinstance(event, progress.PostingStopped):
            self._status_text(_stopped(event))
        elif isinstance(event, progress.ReportSettled):
            self._status_text(f"{event.connection}: {event.day} report {event.report_id} {event.outcome}"
                              + (f": {event.reason}" if event.reason else ""))
        elif isinstance(event, progress.DayDone):
            self._status_text(f"{event.connection}: {event.day} done")
        if not isinstance(event, progress.ReportSettled) or event.reason:
            # Each day and each wait is drawn when it happens; single reports wait for rich's own refresh.
            self._progress.refresh()

    def _status_text(self, text: str) -> None:
        self._progress.update(self._status, info=text)


class LineView(_View):
    def __init__(self, stream: TextIO, total_days: int | None):
        super().__init__(total_days)
        self._stream = stream

    def _close(self) -> None:
        self._stream.flush()

    def _draw(self, event: progress.Event, t: _Tally) -> None:
        if isinstance(event, progress.DayDone):
            c = event.counts
            of = f"/{t.total_days}" if t.total_days else ""  # a replay does not know its days in advance
            self._line(f"{event.day} {event.connection}: posted {c.get('posted', 0)}, quarantined "
                       f"{c.get('quarantined', 0)}, already posted {c.get('already_posted', 0)}"
                       + (f", deferred {c['deferred']}" if c.get("deferred") else "")
                       + f" — day {t.days_done}{of}, reports {t.reports_done}/{t.reports_total}")
        elif isinstance(event, progress.Waiting) and event.seconds >= PLAIN_WAIT_SECONDS:
            self._line(f"waiting {event.seconds:.0f} s for {_service(event.service)}: {event.reason}")
        elif isinstance(event, progress.PostingStopped):
            self._line(_stopped(event))
        elif isinstance(event, progress.ReportSettled) and event.reason:
            self._line(f"{event.day} {event.connection}: report {event.report_id} deferred: {event.reason}")

    def _line(self, text: str) -> None:
        print(f"{datetime.now(timezone.utc):%H:%M:%S} {text}", file=self._stream, flush=True)


def _stopped(event: progress.PostingStopped) -> str:
    resets = f" (resets {event.resets_at})" if event.resets_at else ""
    return f"{event.connection}: {event.reason}{resets}; {event.deferred} report(s) deferred to the next run"


def _service(name: str) -> str:
    return {"exact": "Exact Online", "expensify": "Expensify"}.get(name, name)


@contextmanager
def showing_progress(*, json_output: bool, total_days: int | None = None) -> Iterator[RichView | LineView]:
    """Subscribe the fitting display for the duration of a run.

    On a terminal (stdout a TTY, no `--json`): the live display on stdout. Otherwise a plain line per day: on
    stderr with `--json` (stdout carries only the JSON object), else on stdout.
    """
    target = sys.stderr if json_output else sys.stdout
    target.flush()
    with _own_copy(target) as stream:
        if not json_output and stream.isatty():
            view: RichView | LineView = RichView(Console(file=stream), total_days)
        else:
            view = LineView(stream, total_days)
        with view, progress.subscribed(view):
            yield view


@contextmanager
def _own_copy(target: TextIO) -> Iterator[TextIO]:
    """A copy of the stream's file descriptor, taken before the run: Dagster captures fds 1 and 2 into its compute
    logs while a step executes, which would swallow everything the display draws during the steps. A stream
    without a descriptor (a test's capture) is used as it is."""
    try:
        fd = os.dup(target.fileno())
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both an OSError and a ValueError
        yield target
        return
    with os.fdopen(fd, "w", encoding="utf-8", buffering=1) as stream:
        yield stream

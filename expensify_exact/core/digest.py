"""The daily digest for accountants: per connection and approval day, what was posted, what waits in quarantine
(with the fix for each reason), what the reconciliation found, and the health of Exact's rate budget and tokens.

A digest is built once as a neutral document (`Digest`: sections of paragraphs, bullet lists and tables), then
rendered as Markdown or as self-contained HTML for e-mail, where every value is escaped. The document is also
stored as JSON beside the renderings, so `expensify-exact digest` can print either format later.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from expensify_exact.core.journal import REASON_FIXES, Reason
from expensify_exact.core.posting import Outcome
from expensify_exact.core.reconcile import FINDING_FIXES, Finding, Reconciliation
from expensify_exact.store import IntentStatus, LedgerRow, QuarantineItem, QuarantineStatus

DIGEST_DIR_ENV = "EXPENSIFY_EXACT_DIGEST_DIR"
FORMATS = ("md", "html")
REFRESH_IDLE_DAYS = 30  # an unused refresh token dies after 30 days (exact-online.md §2.3)
TABLE_LIMIT = 200


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    bullets: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)


@dataclass
class Digest:
    connection: str
    day: str
    generated_at: str
    headline: str
    sections: list[Section]
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return f"Expense posting digest — {self.connection} — {_long_date(self.day)}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str) -> Digest:
        data = json.loads(text)
        sections = [Section(s["title"], s["paragraphs"], s["bullets"], [Table(**t) for t in s["tables"]])
                    for s in data.pop("sections")]
        return cls(sections=sections, **data)

    def render(self, fmt: str) -> str:
        if fmt == "md":
            return render_markdown(self)
        if fmt == "html":
            return render_html(self)
        raise ValueError(f"unknown digest format {fmt!r}; use one of {', '.join(FORMATS)}")


# --- building -------------------------------------------------------------------------------------------

def build_digest(*, connection: str, day: str, ledger: Sequence[LedgerRow], quarantine: Sequence[QuarantineItem],
                 outcomes: pd.DataFrame | None = None, reconciliation: Reconciliation | None = None,
                 token_ages: dict[str, tuple[datetime, datetime]] | None = None,
                 now: datetime, currency: str = "EUR",
                 last_day_posted: tuple[str, datetime] | None = None) -> Digest:
    """One connection's digest for one approval day.

    Args:
        connection: the connection name.
        day: the approval day, `YYYY-MM-DD`.
        ledger: the connection's ledger rows (the day's posted reports are taken from here when `outcomes` is None).
        quarantine: the connection's open quarantine items (the day's and the older backlog).
        outcomes: the day's `journal_entries_posted` value (posting.OUTCOME_COLUMNS), if the day was run.
        reconciliation: the day's reconciliation, if it ran; its `exact_status` feeds the rate health.
        token_ages: `StateStore.token_ages()`.
        now: the time the digest is made (aware), by the connector's clock.
        currency: the division's currency, in which the connector posts.
        last_day_posted: `StateStore.last_day_posted()`: the connection's newest complete day and when it was posted.
    """
    posted, counts, posted_total = _posted_section(day, ledger, outcomes, currency)
    posted.bullets.append(f"Last complete day posted: {last_day_posted[0]}, at {_when(last_day_posted[1].isoformat())}."
                          if last_day_posted else "Last complete day posted: none yet.")
    waiting, open_today, open_total = _quarantine_sections(day, quarantine)
    checked = _reconciliation_section(reconciliation)
    health = _health_section(connection, reconciliation, token_ages or {}, now)
    counts |= {"quarantined_today": open_today, "quarantine_open": open_total,
               "findings": len(reconciliation.findings) if reconciliation is not None else -1}
    if reconciliation is None:
        verdict = "reconciliation has not run for this day"
    elif reconciliation.clean:
        verdict = "reconciliation found 0 differences — Exact matches Expensify"
    else:
        verdict = f"reconciliation found {len(reconciliation.findings)} difference(s) that need attention"
    headline = (f"{counts['posted_today']} report(s) posted ({posted_total}), "
                f"{counts['already_posted']} already in Exact, {open_today} from this day in quarantine "
                f"({open_total} open in total); {verdict}.")
    return Digest(connection, day, now.isoformat(timespec="seconds"), headline,
                  [posted, *waiting, checked, health], counts)


def _posted_section(day: str, ledger: Sequence[LedgerRow], outcomes: pd.DataFrame | None,
                    currency: str) -> tuple[Section, dict[str, int], str]:
    section = Section("Posted to Exact")
    rows, totals = [], {}
    counts = {"posted_today": 0, "already_posted": 0, "deferred": 0}
    if outcomes is not None and len(outcomes):
        labels = {"posted": "posted now", "already_posted": "already posted", "deferred": "deferred (API budget)"}
        keys = {"posted": "posted_today", "already_posted": "already_posted", "deferred": "deferred"}
        for o in outcomes.sort_values("report_id").itertuples(index=False):
            if o.outcome not in labels:
                continue
            counts[keys[o.outcome]] += 1
            if o.outcome == Outcome.POSTED:
                totals[currency] = totals.get(currency, 0) + int(o.total_cents)
            rows.append([o.report_id, _number(o.entry_number), _money(int(o.total_cents), currency),
                         str(len(o.transaction_ids)), labels[o.outcome]])
    else:
        # No posting run's outcomes at hand (e.g. the CLI): the ledger says what is posted for the day.
        for row in sorted((r for r in ledger if r.partition_date == day), key=lambda r: r.report_id):
            if row.status == IntentStatus.POSTED:
                counts["posted_today"] += 1
                totals[currency] = totals.get(currency, 0) + row.total_cents
                state = f"posted {row.posted_at:%Y-%m-%d}" if row.posted_at else "posted"
            else:
                state = "intent pending — settles on the next run"
            rows.append([row.report_id, _number(row.entry_number), _money(row.total_cents, currency),
                         str(len(row.transaction_ids)), state])
    if rows:
        section.tables.append(Table(["Report", "Exact entry", "Amount", "Expenses", "Status"], rows))
    else:
        section.paragraphs.append("Nothing was approved on this day, so nothing was posted.")
    posted_total = ", ".join(_money(v, cur) for cur, v in sorted(totals.items())) or _money(0, currency)
    return section, counts, posted_total


def _quarantine_sections(day: str, items: Sequence[QuarantineItem]) -> tuple[list[Section], int, int]:
    open_items = [i for i in items if i.status == QuarantineStatus.OPEN]
    today = [i for i in open_items if i.partition_date == day]
    older = [i for i in open_items if i.partition_date != day]
    if not open_items:
        return [Section("Waiting in quarantine", paragraphs=["Nothing waits in quarantine."])], 0, 0
    sections = []
    for title, group in (("Waiting in quarantine: approved on this day", today),
                         ("Waiting in quarantine: still open from earlier days", older)):
        if not group:
            continue
        section = Section(title, paragraphs=[f"{len(group)} report(s); each is posted by "
                                             f"'expensify-exact quarantine replay' once its cause is fixed."])
        for item in sorted(group, key=lambda i: (i.partition_date or "", i.report_id)):
            for reason in item.reasons:
                code = str(reason.get("code", ""))
                where = f", transaction {reason['transaction_id']}" if reason.get("transaction_id") else ""
                message = _one_line(reason.get("message", "")).rstrip(".")
                section.bullets.append(f"Report {item.report_id} (approved {item.partition_date or '?'}{where}) — "
                                       f"{code}: {message}. Fix: {_reason_fix(code)}")
        sections.append(section)
    return sections, len(today), len(open_items)


def _reconciliation_section(result: Reconciliation | None) -> Section:
    section = Section("Reconciliation: Expensify, the connector's ledger and Exact")
    if result is None:
        section.paragraphs.append("The reconciliation has not run for this day yet, so nothing was read back "
                                  "from Exact.")
        return section
    stats = result.stats
    section.paragraphs.append(
        f"Compared {stats.get('reports_approved', 0)} approved report(s) with the ledger and read back "
        f"{stats.get('entries_checked', 0)} entr{'y' if stats.get('entries_checked', 0) == 1 else 'ies'} "
        f"({stats.get('exact_lines_read', 0)} line(s)) from Exact.")
    if result.clean:
        section.paragraphs.append("0 findings: every approved report is posted or waits in quarantine, every "
                                  "posted entry is in Exact exactly once and unchanged, and the totals per GL "
                                  "account and cost center agree.")
    else:
        rows = [[f.code, f.report_id or "—", _number(f.entry_number), f.gl_account_code or "—",
                 f.cost_center or "—", _one_line(f.message)] for f in result.findings.itertuples(index=False)]
        section.tables.append(Table(["Finding", "Report", "Entry", "GL account", "Cost center", "What differs"],
                                    rows[:TABLE_LIMIT]))
        for code in sorted(set(result.findings["code"])):
            section.bullets.append(f"{code}: {FINDING_FIXES[Finding(code)]}")
    if stats.get("reports_not_compared"):
        section.paragraphs.append("Not compared line by line (their posted content is disputed, see above): "
                                  + ", ".join(stats["reports_not_compared"]) + ".")
    totals = result.totals
    if len(totals):
        section.paragraphs.append("Totals per GL account and cost center (Expensify vs Exact):")
        section.tables.append(Table(
            ["GL account", "Cost center", "Expensify", "Exact", "Difference"],
            [[t.gl_account_code, t.cost_center or "—", _money(int(t.expected_cents), t.currency),
              _money(int(t.actual_cents), t.currency), _money(int(t.difference_cents), t.currency)]
             for t in totals.itertuples(index=False)][:TABLE_LIMIT]))
    return section


def _health_section(connection: str, result: Reconciliation | None,
                    token_ages: dict[str, tuple[datetime, datetime]], now: datetime) -> Section:
    section = Section("Exact API and token health")
    status = result.exact_status if result is not None else {}
    if status:
        left = status.get("remaining_daily")
        resets = status.get("daily_resets_at")
        section.bullets.append(
            f"Calls made by the reconciliation: {status.get('calls_made', 0)}; daily budget left: "
            f"{left if left is not None else 'unknown'}" + (f" (resets {_when(resets)})" if resets else "")
            + f"; this minute: {status.get('remaining_minutely') if status.get('remaining_minutely') is not None else 'unknown'} left.")
        if left is not None and left < 500:
            section.bullets.append("Warning: fewer than 500 calls left today; large backfills may be deferred to "
                                   "tomorrow.")
    else:
        section.bullets.append("No Exact calls were recorded for this digest.")
    ages = token_ages.get(connection)
    if ages is None:
        section.bullets.append("No Exact tokens are stored: run `expensify-exact authorize --connection "
                               f"{connection}`.")
    else:
        issued, refresh_issued = ages
        if refresh_issued.year <= 2000:
            # `secrets set` stores a refresh token with a placeholder issue time: its real age is unknown.
            section.bullets.append("The stored refresh token has not been exchanged yet; the next run does that.")
            return section
        expires = refresh_issued + timedelta(days=REFRESH_IDLE_DAYS)
        section.bullets.append(f"Access token issued {age_text(now - issued)} ago (it lasts 10 minutes and is renewed "
                               f"automatically).")
        days_left = (expires - now).total_seconds() / 86400
        warn = " — re-authorize soon" if days_left < 7 else ""
        section.bullets.append(f"Refresh token issued {age_text(now - refresh_issued)} ago; unused, it would expire "
                               f"{_when(expires.isoformat())}{warn}.")
    return section


# --- rendering ------------------------------------------------------------------------------------------

def render_markdown(digest: Digest) -> str:
    out = [f"# {_md(digest.title)}", "", f"**{_md(digest.headline)}**", ""]
    for section in digest.sections:
        out += [f"## {_md(section.title)}", ""]
        for paragraph in section.paragraphs:
            out += [_md(paragraph), ""]
        for table in section.tables:
            out.append("| " + " | ".join(_md_cell(c) for c in table.columns) + " |")
            out.append("|" + "|".join("---" for _ in table.columns) + "|")
            out += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in table.rows]
            out.append("")
        if section.bullets:
            out += [f"- {_md(b)}" for b in section.bullets] + [""]
    out.append(f"_Generated {_md(_when(digest.generated_at))} by expensify-exact._")
    return "\n".join(out) + "\n"


def render_html(digest: Digest) -> str:
    e = html.escape
    cell = "border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top"
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(digest.title)}</title>",
           "</head>", '<body style="font-family:Arial,Helvetica,sans-serif;font-size:14px;color:#222">',
           f"<h1 style=\"font-size:20px\">{e(digest.title)}</h1>", f"<p><strong>{e(digest.headline)}</strong></p>"]
    for section in digest.sections:
        out.append(f"<h2 style=\"font-size:16px\">{e(section.title)}</h2>")
        out += [f"<p>{e(p)}</p>" for p in section.paragraphs]
        for table in section.tables:
            out.append('<table style="border-collapse:collapse">')
            out.append("<tr>" + "".join(f'<th style="{cell}">{e(c)}</th>' for c in table.columns) + "</tr>")
            out += ["<tr>" + "".join(f'<td style="{cell}">{e(str(v))}</td>' for v in row) + "</tr>"
                    for row in table.rows]
            out.append("</table>")
        if section.bullets:
            out.append("<ul>" + "".join(f"<li>{e(b)}</li>" for b in section.bullets) + "</ul>")
    out.append(f'<p style="color:#777">Generated {e(_when(digest.generated_at))} by expensify-exact.</p>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# --- files ----------------------------------------------------------------------------------------------

def digest_dir() -> Path:
    """`$EXPENSIFY_EXACT_DIGEST_DIR`, else `$DAGSTER_HOME/digests`, else `.dagster_home/digests`."""
    if configured := os.environ.get(DIGEST_DIR_ENV):
        return Path(configured)
    return Path(os.environ.get("DAGSTER_HOME") or Path.cwd() / ".dagster_home") / "digests"


def digest_path(connection: str, day: str, fmt: str, base: Path | None = None) -> Path:
    return (base or digest_dir()) / connection / f"{day}.{fmt}"


def write_digest(digest: Digest, base: Path | None = None) -> dict[str, Path]:
    """Write `<connection>/<day>.md`, `.html` and `.json` (the document, for re-rendering); returns the paths."""
    paths = {fmt: digest_path(digest.connection, digest.day, fmt, base) for fmt in (*FORMATS, "json")}
    paths["md"].parent.mkdir(parents=True, exist_ok=True)
    for fmt, path in paths.items():
        text = digest.to_json() if fmt == "json" else digest.render(fmt)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)  # a reader never sees half a digest
    return paths


def read_digest(connection: str, day: str, base: Path | None = None) -> Digest | None:
    path = digest_path(connection, day, "json", base)
    return Digest.from_json(path.read_text(encoding="utf-8")) if path.exists() else None


# --- formatting helpers ---------------------------------------------------------------------------------

def _reason_fix(code: str) -> str:
    try:
        return REASON_FIXES.get(Reason(code), "see the quarantine item")
    except ValueError:
        return "see the quarantine item"


def _money(cents: int, currency: str = "EUR") -> str:
    sign = "-" if cents < 0 else ""
    return f"{currency} {sign}{abs(cents) / 100:,.2f}"


def _number(value: Any) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and pd.isna(value)):
        return "—"
    return str(int(value))


def _one_line(text: Any) -> str:
    return " ".join(str(text or "").split())


def _long_date(day: str) -> str:
    d = date.fromisoformat(day)
    return f"{d:%A} {d.day} {d:%B %Y}"


def _when(iso: str | None) -> str:
    if not iso:
        return "?"
    moment = datetime.fromisoformat(str(iso))
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def age_text(delta: timedelta) -> str:
    """How old a token is, for people (the digest and `status`): under a minute, 12 min, 3 h 5 min, 4 days."""
    seconds = max(0, int(delta.total_seconds()))
    if seconds < 60:
        return "under a minute"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} days"


def _md(text: str) -> str:
    # Keep Expensify's free text (merchants, comments) from turning into Markdown markup or HTML.
    out = _one_line(text)
    for ch in "\\`*[]<>":
        out = out.replace(ch, "\\" + ch)
    return out


def _md_cell(value: Any) -> str:
    return _md(str(value)).replace("|", "\\|")

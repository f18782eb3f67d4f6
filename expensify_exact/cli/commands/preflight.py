"""`expensify-exact preflight --connection NAME`: before the first run against the real services, tries every
assumption the connector makes about Exact Online and Expensify and says per assumption OK, FAILED or UNKNOWN,
with what to do. Read-only by default; `--write-test` posts one test entry to a named test division and deletes it.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import date

from expensify_exact.cli.support import (
    EXIT_CONFIG,
    EXIT_USAGE,
    add_command,
    describe_connection,
    open_connections,
    print_outcome,
)
from expensify_exact.clock import Clock, connection_today
from expensify_exact.core.settlement import KEEPS_CLIENT_ENTRY_ID, Fate
from expensify_exact.errors import (
    AuthenticationError,
    ConfigError,
    ConnectorError,
    DivisionAccessError,
    ErrorBudgetExhausted,
    ReconsentRequired,
)

OK, FAILED, UNKNOWN = "OK", "FAILED", "UNKNOWN"
# When preflight last saw Exact rotate this connection's tokens, and which pair that produced.
TOKEN_ROTATION_VERIFIED = "exact_token_rotation_verified"
# A day before Expensify existed (2008): an export of it is surely empty, whatever the account holds.
EMPTY_EXPORT_DAY = date(2001, 1, 1)
TEST_AMOUNT = 0.01


@dataclass(frozen=True)
class Verdict:
    check: str  # stable ID, for --json consumers
    assumption: str  # what the connector relies on
    status: str  # OK | FAILED | UNKNOWN
    detail: str  # what was seen
    advice: str = ""  # what to do, where there is something to do

    def lines(self) -> list[str]:
        out = [f"{self.status:<8} {self.assumption}", f"         {self.detail}"]
        if self.advice:
            out.append(f"         -> {self.advice}")
        return out


def _error_text(exc: BaseException) -> str:
    """Connector errors are built secret-free (errors.py, http/redaction.py); anything else shows only its type."""
    return str(exc) if isinstance(exc, ConnectorError) else type(exc).__name__


def _read_advice(exc: BaseException, what: str, connection: str) -> str:
    text = _error_text(exc).lower()
    status = getattr(exc, "status", None)
    reason = str(getattr(exc, "reason", None) or "").lower()
    if isinstance(exc, ErrorBudgetExhausted) or "block" in reason:
        return ("Exact blocks an app's endpoint for the rest of the clock hour after 10 errors (exact-online.md §6): "
                "`expensify-exact status` shows what this connection earned; fix the cause, then run preflight "
                "again after the next full hour")
    if "$filter" in text or ("filter" in text and status == 400):
        return (f"Exact requires a $filter on {what} that this connector version does not send (mandatory "
                "filtering, exact-online.md §13): do not run the connector against this division; report this output")
    if "too long" in text or status == 414:
        return f"Exact refused the length of the URL for {what}: report this output"
    if isinstance(exc, DivisionAccessError):
        return (f"grant the division on Exact's consent screen (`expensify-exact authorize --connection {connection}`) "
                "or fix exact.division in mappings/connections.yaml")
    if isinstance(exc, AuthenticationError) or status in (401, 403):
        return (f"the authorized Exact user or the app registration may not read {what}: give the user the rights "
                f"(or the app the scope) in Exact, then `expensify-exact authorize --connection {connection}` again")
    if status == 429 or "rate limit" in text:
        return "Exact's rate limit is used up by another app on this division: run preflight again later"
    return "Exact refused a read the connector makes every run: report this output before the first real run"


class Preflight:
    """Runs the checks for one connection; each check returns Verdicts and never raises a ConnectorError."""

    def __init__(self, connector, conn, clock: Clock | None = None):
        self.connector = connector
        self.conn = conn
        self.clock = clock or connector.clock()
        self.verdicts: list[Verdict] = []

    def add(self, check: str, assumption: str, status: str, detail: str, advice: str = "") -> Verdict:
        verdict = Verdict(check, assumption, status, detail, advice)
        self.verdicts.append(verdict)
        return verdict

    # --- read-only -------------------------------------------------------------------------------------

    def read_only(self) -> None:
        self.exact_tokens()
        self.exact_reads()
        self.expensify()

    def exact_tokens(self) -> None:
        """Token refresh and rotation, without ever refreshing inside Exact's 570 s floor."""
        from expensify_exact.core.connections import build_token_refresher

        assumption = "Exact token refresh works and rotates the refresh token (stored encrypted, old one spent)"
        store = self.connector.store()
        try:
            refresher = build_token_refresher(self.conn, self.connector.vault(), store)
            stored = refresher.store.load(self.conn.name)
        except ConnectorError as exc:
            self.add("exact_tokens", assumption, FAILED, _error_text(exc),
                     f"store the Exact credentials: `expensify-exact secrets set --connection {self.conn.name}`")
            return
        if stored is None:
            self.add("exact_tokens", assumption, FAILED, "no Exact tokens are stored for this connection",
                     f"run `expensify-exact authorize --connection {self.conn.name}`")
            return
        now = self.clock.now()
        if now < refresher.refresh_window_opens(stored) and stored.is_valid_at(now):
            age = int((now - stored.issued_at).total_seconds())
            seen = store.connection_fact_get(self.conn.name, TOKEN_ROTATION_VERIFIED)
            if isinstance(seen, dict) and seen.get("issued_at") == stored.issued_at.isoformat():
                self.add("exact_tokens", assumption, OK,
                         f"the stored pair is {age} s old and came from a rotation preflight saw at "
                         f"{seen.get('verified_at')}; Exact allows the next refresh after "
                         f"{refresher.refresh_window_opens(stored):%H:%M:%S} UTC")
            else:
                self.add("exact_tokens", assumption, UNKNOWN,
                         f"the stored pair is only {age} s old: Exact refuses a refresh sooner than 570 s after "
                         f"the last, so rotation was not tried now",
                         f"run preflight again after {refresher.refresh_window_opens(stored):%H:%M:%S} UTC")
            return
        try:
            fresh = refresher.refresh(stale=stored)
        except ReconsentRequired as exc:
            self.add("exact_tokens", assumption, FAILED, _error_text(exc),
                     f"run `expensify-exact authorize --connection {self.conn.name}`")
            return
        except ConnectorError as exc:
            self.add("exact_tokens", assumption, FAILED, _error_text(exc),
                     "check exact_client_id / exact_client_secret (`expensify-exact secrets set`) and that the "
                     "token endpoint of exact.region is reachable")
            return
        if fresh.access_token == stored.access_token:
            self.add("exact_tokens", assumption, UNKNOWN,
                     "Exact refused the refresh as too early and the current access token was kept",
                     "run preflight again in 10 minutes")
            return
        reloaded = refresher.store.load(self.conn.name)
        if reloaded is None or reloaded.refresh_token != fresh.refresh_token:
            self.add("exact_tokens", assumption, FAILED, "the new token pair was not found in the state database",
                     "check that EXPENSIFY_EXACT_STATE_URL is writable, then `expensify-exact authorize`")
            return
        rotated = fresh.refresh_token != stored.refresh_token
        store.connection_fact_put(self.conn.name, TOKEN_ROTATION_VERIFIED,
                                  {"verified_at": now.isoformat(timespec="seconds"),
                                   "issued_at": fresh.issued_at.isoformat(), "rotated": rotated})
        self.add("exact_tokens", assumption, OK,
                 "Exact issued a new access token and " + ("a new refresh token; the new pair is stored encrypted"
                                                           if rotated else
                                                           "kept the refresh token (no rotation); the connector "
                                                           "works either way"))

    def exact_reads(self) -> None:
        """Division, rate headers and every read the connector makes, through the client's own methods."""
        from expensify_exact.core.readback import read_back_entries
        from expensify_exact.core.settlement import find_posted
        from expensify_exact.core.snapshots import DIMENSION_QUERIES, fetch_dimension

        division = self.conn.exact.division
        try:
            client = self.connector.exact_client(self.conn)
        except ConnectorError as exc:
            self.add("exact_division", f"Exact division {division} is reachable", FAILED, _error_text(exc),
                     f"store the Exact credentials: `expensify-exact secrets set --connection {self.conn.name}`")
            return
        probe_entry = str(uuid.uuid4())  # no entry has it: each lookup must answer "none", not an error
        probe_report = "PF" + uuid.uuid4().hex[:10].upper()
        reads: list[tuple[str, str, str, Callable[[], str]]] = [
            (f"exact_read_{name}", f"Exact accepts the {name.replace('_', ' ')} read ({path})", path,
             lambda name=name: f"{len(fetch_dimension(client, name))} rows")
            for name, (path, _) in DIMENSION_QUERIES.items()]
        reads += [
            ("exact_read_lines_by_entry_id", "Exact accepts the TransactionLines read-back by EntryID (reconciliation)",
             "financialtransaction/TransactionLines",
             lambda: f"{len(client.transaction_lines([probe_entry]))} lines for an unknown EntryID, as expected"),
            ("exact_read_entry_by_entry_id", "Exact accepts the GeneralJournalEntries lookup by EntryID (settling "
             "an unknown POST outcome)", "generaljournalentry/GeneralJournalEntries",
             lambda: "no entry for an unknown EntryID, as expected" if client.get_entry(probe_entry) is None
             else "an entry answered for a random EntryID"),
            ("exact_read_settlement_lookup", "Exact accepts the lookup settlement uses for an entry whose POST "
             "outcome is unknown (by EntryID, then by its lines' Description)",
             "generaljournalentry/GeneralJournalEntryLines",
             lambda: "no entry for an unknown report, as expected"
             if find_posted(client, self.connector.store(), self.conn.name, _probe_body(probe_report),
                            sent_entry_id=probe_entry) is None else "an entry answered for an unknown report"),
            ("exact_read_lines_by_report", "Exact accepts the read-back of lines by Expensify report ID "
             "(reconciliation)", "sync/Financial/TransactionLines",
             lambda: f"{len(read_back_entries(client, [], [probe_report]))} lines for an unknown report, as expected"),
        ]
        with client:
            try:
                client.check_division()
            except ConnectorError as exc:
                self.add("exact_division", f"Exact division {division} is reachable", FAILED, _error_text(exc),
                         _read_advice(exc, "system/Divisions", self.conn.name))
                self.add("exact_rate_headers", "Exact's answers carry X-RateLimit headers", UNKNOWN,
                         f"not tried: division {division} is not reachable")
                for check, assumption, _, _ in reads:
                    self.add(check, assumption, UNKNOWN, f"not tried: division {division} is not reachable")
                return
            self.add("exact_division", f"Exact division {division} is reachable", OK,
                     f"current/Me and system/Divisions list division {division}")
            budget = client.rate_limits.status()
            if budget.get("remaining_daily") is None or budget.get("remaining_minutely") is None:
                self.add("exact_rate_headers", "Exact's answers carry X-RateLimit headers", FAILED,
                         "system/Divisions came back without X-RateLimit-Remaining / X-RateLimit-Minutely-Remaining",
                         "the connector paces by these headers (exact-online.md §6); without them it only backs "
                         "off on 429s: report this output before running large backfills")
            else:
                self.add("exact_rate_headers", "Exact's answers carry X-RateLimit headers", OK,
                         f"{budget['remaining_daily']} calls left today, {budget['remaining_minutely']} this minute")
            for check, assumption, path, read in reads:
                try:
                    self.add(check, assumption, OK, read())
                except ConnectorError as exc:
                    self.add(check, assumption, FAILED, _error_text(exc), _read_advice(exc, path, self.conn.name))

    def expensify(self) -> None:
        """Credentials, each configured policy, and the export template on an empty day."""
        from expensify_exact.api.expensify.client import POLICY_FIELDS

        policy_ids = list(self.conn.expensify.policy_ids)
        credentials = "Expensify accepts the partner credentials"
        try:
            client = self.connector.expensify_client(self.conn)
        except ConnectorError as exc:
            self.add("expensify_credentials", credentials, FAILED, _error_text(exc), f"store them: {self._login()}")
            return
        with client:
            try:
                policies = client.get_policies(policy_ids)
            except AuthenticationError as exc:
                self.add("expensify_credentials", credentials, FAILED, _error_text(exc),
                         "generate a new partnerUserID/secret at expensify.com/tools/integrations and store them: "
                         + self._login())
                policies = None
            except ConnectorError as exc:
                self.add("expensify_credentials", credentials, UNKNOWN, f"the policy getter failed: "
                                                                        f"{_error_text(exc)}",
                         "run preflight again; if it persists, report this output")
                policies = None
            else:
                self.add("expensify_credentials", credentials, OK, "the policy getter answered")
            for policy_id in policy_ids:
                assumption = f"Expensify policy {policy_id} is readable ({', '.join(POLICY_FIELDS)})"
                if policies is None:
                    self.add(f"expensify_policy_{policy_id}", assumption, UNKNOWN, "not readable: see above")
                elif policy_id not in policies:
                    self.add(f"expensify_policy_{policy_id}", assumption, FAILED,
                             "Expensify returned no such policy for these credentials",
                             "check expensify.policy_ids, and that the partner user is an admin of the policy")
                else:
                    policy = policies[policy_id]
                    no_code = sum(1 for c in policy.categories if not c.gl_code)
                    self.add(f"expensify_policy_{policy_id}", assumption, OK,
                             f"{len(policy.categories)} categories ({no_code} without a GL code), "
                             f"{len(policy.tags)} tags, {len(policy.tax_rates)} tax rates")
            template = "Expensify renders the export template (an empty one-day export comes back complete)"
            try:
                reports = client.export_reports(EMPTY_EXPORT_DAY, EMPTY_EXPORT_DAY, policy_ids)
            except ConnectorError as exc:
                self.add("expensify_template", template, FAILED, _error_text(exc),
                         "an empty export must render as a complete file (expensify.md §2.3); report this output")
            else:
                self.add("expensify_template", template, OK,
                         f"export of {EMPTY_EXPORT_DAY} rendered and downloaded: {len(reports)} reports, end trailer "
                         f"present, {client.calls['download']} download poll(s)")

    def _login(self) -> str:
        """The command that stores the connection's Expensify login, and who else uses it when it is shared."""
        from expensify_exact.core.connections import store_expensify_login_command
        from expensify_exact.core.exports import by_credential, credential_of

        group = by_credential(list(self.connector.project().connections))[credential_of(self.conn)]
        others = [c.name for c in group if c.name != self.conn.name]
        shared = f" (credential {credential_of(self.conn)}, also used by {', '.join(others)})" if others else ""
        return f"`{store_expensify_login_command(group)}`{shared}"

    # --- write test ------------------------------------------------------------------------------------

    def write_test(self, division: int, debit: str, credit: str, journal: str) -> None:
        """Post one balanced two-line entry to `division` the way posting does, find it every way settlement does,
        delete it, record whether Exact kept the client's EntryID."""
        from expensify_exact.core.settlement import Settled, post_and_settle

        test_conn = self.conn.model_copy(update={"exact": self.conn.exact.model_copy(update={"division": division})})
        posted = None
        try:
            client = self.connector.exact_client(test_conn)
        except ConnectorError as exc:
            self.add("write_test_post", f"a test entry can be posted to division {division}", FAILED,
                     _error_text(exc))
            return
        with client:
            try:
                body = self._test_entry(client, debit, credit, journal)
            except (ConnectorError, ValueError) as exc:
                self.add("write_test_post", f"a test entry can be posted to division {division}", FAILED,
                         _error_text(exc) if isinstance(exc, ConnectorError) else str(exc),
                         "name two existing, unblocked GL accounts of the test division and a type-90 journal")
                return
            sent = body["EntryID"]
            try:
                settled = post_and_settle(client, self.connector.store(), self.conn.name, body)
            except ConnectorError as exc:
                settled = Settled("not_sent", message=_error_text(exc))
            if settled.outcome != Fate.POSTED:
                status = f"HTTP {settled.status}: " if settled.status else ""
                self.add("write_test_post", f"a test entry can be posted to division {division}", FAILED,
                         f"{settled.outcome}: {status}{settled.message}",
                         "see Exact's message: usually an account, journal or period of the test division"
                         + (f"; if entry {sent} shows up in division {division} after all, delete it by hand"
                            if settled.outcome == Fate.UNKNOWN else ""))
                return
            posted = {"EntryID": settled.entry_id, "EntryNumber": settled.entry_number}
            try:
                self._after_post(client, division, sent, posted, body)
            finally:
                self._delete(client, division, sent, posted)

    def _test_entry(self, client, debit: str, credit: str, journal: str) -> dict:
        from expensify_exact.api.exact.odata import string_literal
        from expensify_exact.core.snapshots import fetch_dimension

        accounts = {}
        for code in (debit, credit):
            rows = client.get_all("financial/GLAccounts", ["ID", "Code", "IsBlocked"],
                                  filter=f"Code eq {string_literal(code)}")
            if not rows:
                raise ValueError(f"GL account {code} does not exist in division {client.division}")
            if rows[0].get("IsBlocked"):
                raise ValueError(f"GL account {code} is blocked in division {client.division}")
            accounts[code] = rows[0]["ID"]
        today = connection_today(self.conn.timezone, self.clock)
        periods = fetch_dimension(client, "financial_periods")
        period = next((p for p in periods.to_dict("records")
                       if p["start_date"] and p["end_date"] and p["start_date"] <= today <= p["end_date"]), None)
        if period is None:
            raise ValueError(f"division {client.division} has no financial period containing {today}")
        body = _probe_body("PF" + uuid.uuid4().hex[:10].upper(), accounts[debit], accounts[credit], today)
        body |= {"EntryID": str(uuid.uuid4()), "JournalCode": journal, "FinancialYear": int(period["fin_year"]),
                 "FinancialPeriod": int(period["fin_period"]), "Currency": self.conn.exact.division_currency}
        return body

    def _after_post(self, client, division: int, sent: str, posted: dict, body: dict) -> None:
        report_key = _report_key(body)
        got = str(posted.get("EntryID") or "")
        self.add("write_test_post", f"a test entry can be posted to division {division}", OK,
                 f"entry {posted.get('EntryNumber')} posted (two lines, {TEST_AMOUNT:.2f} each side, report key "
                 f"{report_key})")
        keeps = got.lower() == sent.lower()
        self.connector.store().connection_fact_put(
            self.conn.name, KEEPS_CLIENT_ENTRY_ID, keeps,
            {"division": division, "sent": sent, "echoed": got,
             "tested_at": self.clock.now().isoformat(timespec="seconds")})
        self.add(KEEPS_CLIENT_ENTRY_ID, "whether Exact keeps the EntryID the connector sends (posting handles either)", OK,
                 ("yes: the echoed EntryID is the one sent; posting looks entries up by it directly"
                  if keeps else
                  f"no: Exact assigned its own EntryID (sent {sent}, got {got}); posting records Exact's and "
                  "settles unknown outcomes by report key")
                 + f" (recorded as {KEEPS_CLIENT_ENTRY_ID}={str(keeps).lower()})")
        self._lookup("write_test_find_by_entry_id", "the posted entry is found by its EntryID",
                     lambda: self._find_by_entry_id(client, sent, got),
                     "report this output: settling an unknown POST outcome depends on this lookup")
        self._lookup("write_test_find_by_report_key", "the posted entry is found by its Expensify report key",
                     lambda: self._find_by_report_key(client, body, got),
                     "report this output: when Exact assigns its own EntryIDs, an unknown POST outcome can only "
                     "be settled by this lookup")

    def _lookup(self, check: str, assumption: str, find: Callable[[], str | None], advice: str) -> None:
        """`find` returns what it found, or None; a refusal is a failed lookup too."""
        try:
            found = find()
        except ConnectorError as exc:
            self.add(check, assumption, FAILED, _error_text(exc), advice)
            return
        if found is None:
            self.add(check, assumption, FAILED, "not found right after posting it", advice)
        else:
            self.add(check, assumption, OK, found)

    @staticmethod
    def _find_by_entry_id(client, sent: str, got: str) -> str | None:
        if not got or client.get_entry(got) is None:
            return None
        by_sent = "the same one" if got.lower() == sent.lower() else (
            "also found" if client.get_entry(sent) is not None else "not found")
        return f"found by the EntryID Exact echoed ({got}); by the one sent: {by_sent}"

    def _find_by_report_key(self, client, body: dict, got: str) -> str | None:
        """Settlement's own lookup, without the EntryID: what finds an entry when Exact assigned its own."""
        from expensify_exact.core.settlement import find_posted

        found = find_posted(client, self.connector.store(), self.conn.name, body, sent_entry_id=None)
        if found is None or found.entry_id != got.lower():
            return None
        how = {"lines": "GeneralJournalEntryLines by Description", "sync": "sync/Financial/TransactionLines"}
        return (f"entry {found.entry_number} found by report key {_report_key(body)} through "
                f"{how.get(found.found_by, found.found_by)}")

    def _delete(self, client, division: int, sent: str, posted: dict | None) -> None:
        got = str((posted or {}).get("EntryID") or sent)
        assumption = "the test entry is deleted again"
        try:
            client.delete_general_journal_entry(got)
            left = client.get_entry(got)
        except ConnectorError as exc:
            self.add("write_test_delete", assumption, FAILED, _error_text(exc),
                     f"delete entry {(posted or {}).get('EntryNumber')} (EntryID {got}) in division {division} by "
                     "hand")
            return
        if left is not None:
            self.add("write_test_delete", assumption, FAILED, f"entry {got} is still there after the DELETE",
                     f"delete entry {(posted or {}).get('EntryNumber')} in division {division} by hand")
        else:
            self.add("write_test_delete", assumption, OK, f"entry {got} deleted; a lookup no longer finds it")


def _probe_body(report_key: str, debit_id: str = "", credit_id: str = "", day: date | None = None) -> dict:
    """Lines traced like the connector's own (transform/journal.py: IDs first in Description, then Notes)."""
    text = f"{report_key}/1 expensify-exact preflight test entry"
    notes = f"Expensify report {report_key}, transaction 1: expensify-exact preflight, deleted right after"
    when = (day or EMPTY_EXPORT_DAY).isoformat()
    return {"GeneralJournalEntryLines": [
        {"GLAccount": debit_id, "AmountFC": TEST_AMOUNT, "Date": when, "Description": text, "Notes": notes},
        {"GLAccount": credit_id, "AmountFC": -TEST_AMOUNT, "Date": when, "Description": text, "Notes": notes}]}


def _report_key(body: dict) -> str:
    return body["GeneralJournalEntryLines"][0]["Description"].split("/", 1)[0]


def _confirm(division: int, conn, args) -> bool:
    """Type the division number to go ahead; the prompt goes to stderr, so --json output stays one object."""
    if args.yes:
        return True
    if not sys.stdin.isatty():
        print("preflight --write-test needs a confirmation: run it in a terminal, or add --yes", file=sys.stderr)
        return False
    own = " — the connection's own division, not a test division —" if division == conn.exact.division else ""
    print(f"This posts a balanced test entry of {TEST_AMOUNT:.2f} {conn.exact.division_currency} (debit "
          f"{args.debit_account}, credit {args.credit_account}, journal {args.journal or conn.exact.journal}) to "
          f"Exact division {division}{own} and deletes it again.\nType the division number to go ahead: ",
          end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip() == str(division)


def cmd_preflight(args) -> int:
    """Checks one connection against the real services: Exact token refresh and rotation, the division, rate-limit
    headers, every read the connector makes; Expensify credentials, each policy, the export template on an empty
    day. One verdict per assumption (OK, FAILED, UNKNOWN) with what to do. Read-only unless --write-test is given.

    Exit codes: 0 every assumption holds, 1 one failed or could not be tried, 2 usage (or the write test was not
    confirmed), 3 invalid configuration. --write-test posts one balanced two-line entry to the named test division,
    finds it by EntryID and by report key, deletes it and records whether Exact kept the client's EntryID, which
    posting then uses.
    """
    if args.write_test and (args.division is None or not args.debit_account or not args.credit_account):
        print("--write-test needs --division N (a test division), --debit-account CODE and --credit-account CODE",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        connector, _, [conn] = open_connections(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.write_test and not _confirm(args.division, conn, args):
        return EXIT_USAGE
    if not args.json:
        print(f"preflight {conn.name}: {describe_connection(conn)}", flush=True)
    run = Preflight(connector, conn)
    run.read_only()
    if args.write_test:
        run.write_test(args.division, args.debit_account, args.credit_account, args.journal or conn.exact.journal)
    counts = {status: sum(v.status == status for v in run.verdicts) for status in (OK, FAILED, UNKNOWN)}
    passed = counts[FAILED] == 0 and counts[UNKNOWN] == 0
    # What posting will go by: True/False from a write test (this one or an earlier), None if never tested.
    keeps = connector.store().connection_fact_get(conn.name, KEEPS_CLIENT_ENTRY_ID)
    return print_outcome(args, {"connection": conn.name, "ok": passed, "counts": counts, KEEPS_CLIENT_ENTRY_ID: keeps,
                                "verdicts": [asdict(v) for v in run.verdicts]},
                         [*(line for v in run.verdicts for line in v.lines()),
                          f"{counts[OK]} OK, {counts[FAILED]} FAILED, {counts[UNKNOWN]} UNKNOWN"],
                         failed=not passed)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(subparsers, "preflight", cmd_preflight,
                    help="try every assumption about Exact and Expensify before the first real run")
    p.add_argument("--connection", required=True, help="the connection to check")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    p.add_argument("--write-test", action="store_true",
                   help="also post and delete one test entry in --division (asks to confirm)")
    p.add_argument("--division", type=int, help="the Exact test division for --write-test")
    p.add_argument("--debit-account", metavar="CODE", help="GL account code for the test entry's debit line")
    p.add_argument("--credit-account", metavar="CODE", help="GL account code for the test entry's credit line")
    p.add_argument("--journal", metavar="CODE", help="type-90 journal for the test entry (default: exact.journal)")
    p.add_argument("--yes", action="store_true", help="do not ask to confirm the write test")

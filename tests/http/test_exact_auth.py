"""Exact's token lifecycle against scripted token endpoints (httpx.MockTransport).

Exact's refresh tokens are single-use: one refresh too many, or one rotated token not saved, and a
person has to re-authorize. These tests pin the order lock → reload → refresh → persist → use.
"""

import socket
import threading
import time
from datetime import datetime, timedelta, timezone
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from expensify_exact.api.exact.auth import ExactAuth, TokenRefresher
from expensify_exact.api.exact.oauth import build_authorize_url, exchange_code, parse_redirect, wait_for_callback
from expensify_exact.api.exact.tokens import ExactTokens, InMemoryTokenStore
from expensify_exact.errors import AuthenticationError, ReconsentRequired, TransientApiError
from tests.factories import FakeClock as _FakeClock

BASE = "https://start.exactonline.nl"
TOKEN_URL = f"{BASE}/api/oauth2/token"
API_URL = f"{BASE}/api/v1/123/financial/GLAccounts?$select=Code"
T0 = datetime(2024, 5, 13, 8, 0, tzinfo=timezone.utc)


def FakeClock(start: datetime = T0) -> _FakeClock:
    return _FakeClock(start)


SECRET = "client-secret-value"
CONN = "acme"


def tokens(n: int, issued_at: datetime, lifetime: float = 600) -> ExactTokens:
    return ExactTokens(access_token=f"access-{n}", refresh_token=f"refresh-{n}",
                       access_expires_at=issued_at + timedelta(seconds=lifetime), issued_at=issued_at)


class TokenEndpoint:
    """A token endpoint with single-use refresh tokens; `script` overrides the next answers."""

    def __init__(self, clock: FakeClock, first: int = 1, expires_in: object = "600"):
        self.clock = clock
        self.next_n = first + 1
        self.current_refresh = f"refresh-{first}"
        self.used: set[str] = set()
        self.script: list[httpx.Response] = []
        self.requests: list[dict[str, str]] = []
        self.expires_in = expires_in
        self.lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        form = {k: v[0] for k, v in parse_qs(request.content.decode()).items()}
        with self.lock:
            self.requests.append(form)
            if self.script:
                return self.script.pop(0)
            presented = form.get("refresh_token")
            if presented in self.used or presented != self.current_refresh:
                return old_refresh_token_used()
            self.used.add(presented)
            n, self.next_n = self.next_n, self.next_n + 1
            self.current_refresh = f"refresh-{n}"
            return httpx.Response(200, json={"access_token": f"access-{n}", "token_type": "bearer",
                                             "expires_in": self.expires_in, "refresh_token": f"refresh-{n}"})


def too_early(status: int = 400) -> httpx.Response:
    return httpx.Response(status, headers={"Reason": "TooEarlyToRefreshTokens: Rate limit exceeded: access_token not expired"},
                          json={"error": "access_denied",
                                "error_description": "Rate limit exceeded: access_token not expired"})


def old_refresh_token_used() -> httpx.Response:
    return httpx.Response(401, json={"error": "unauthorized_client", "error_description": "Old refresh token used."})


def refresher_for(store, clock, endpoint, **kw) -> TokenRefresher:
    return TokenRefresher(store, CONN, TOKEN_URL, "client-id", SECRET, clock,
                          transport=httpx.MockTransport(endpoint), **kw)


# --- when to refresh ---------------------------------------------------------------------------

@pytest.mark.parametrize("elapsed, lifetime, expect_refresh", [
    (0, 600, False),      # fresh token: use it
    (479, 600, False),    # before the 2-minute margin
    (481, 600, False),    # inside the margin but before the 570 s floor: Exact would refuse
    (569, 600, False),    # one second before the floor
    (570, 600, True),     # floor reached and inside the margin: the window is open
    (700, 600, True),     # expired: refresh
    (100, 200, False),    # a short-lived token still waits for the floor (window = max of both rules)
    (570, 3600, False),   # a long-lived token waits for the margin, not just the floor
    (3480, 3600, True),   # ... and refreshes once the margin opens
])
def test_refresh_window_is_the_first_moment_inside_both_rules(elapsed, lifetime, expect_refresh):
    clock = FakeClock()
    store = InMemoryTokenStore({CONN: tokens(1, T0, lifetime)})
    endpoint = TokenEndpoint(clock)
    refresher = refresher_for(store, clock, endpoint)
    clock.advance(elapsed)
    got = refresher.current()
    assert (got.access_token == "access-2") is expect_refresh
    assert len(endpoint.requests) == (1 if expect_refresh else 0)


def test_refresh_sends_the_form_grant_and_accepts_expires_in_as_a_string():
    clock = FakeClock()
    store = InMemoryTokenStore({CONN: tokens(1, T0)})
    endpoint = TokenEndpoint(clock, expires_in="600")
    clock.advance(575)
    got = refresher_for(store, clock, endpoint).current()
    assert endpoint.requests == [{"refresh_token": "refresh-1", "grant_type": "refresh_token",
                                  "client_id": "client-id", "client_secret": SECRET}]
    assert got.access_expires_at == clock.now() + timedelta(seconds=600)
    assert got.issued_at == clock.now()


def test_expires_in_as_an_int_is_accepted_too():
    clock = FakeClock()
    store = InMemoryTokenStore({CONN: tokens(1, T0)})
    clock.advance(575)
    got = refresher_for(store, clock, TokenEndpoint(clock, expires_in=300)).current()
    assert got.access_expires_at == clock.now() + timedelta(seconds=300)


def test_rotated_tokens_are_saved_before_the_new_access_token_is_used():
    clock = FakeClock()
    store = InMemoryTokenStore({CONN: tokens(1, T0)})
    endpoint = TokenEndpoint(clock)
    seen_in_store: list[str] = []

    def app(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/oauth2/token":
            return endpoint(request)
        # the moment a new bearer is used, the store must already hold it
        seen_in_store.append(store.load(CONN).access_token)
        assert request.headers["Authorization"] == f"Bearer {store.load(CONN).access_token}"
        return httpx.Response(200, json={"d": {"results": []}})

    refresher = refresher_for(store, clock, endpoint)
    with httpx.Client(auth=ExactAuth(refresher), transport=httpx.MockTransport(app)) as http:
        http.get(API_URL)
        clock.advance(580)
        http.get(API_URL)
    assert seen_in_store == ["access-1", "access-2"]
    assert store.load(CONN).refresh_token == "refresh-2"


# --- ExactAuth: 401 handling -------------------------------------------------------------------

def test_a_401_forces_one_refresh_and_one_retry():
    clock = FakeClock()
    store = InMemoryTokenStore({CONN: tokens(1, T0 - timedelta(seconds=300), lifetime=900)})
    endpoint = TokenEndpoint(clock)
    api_calls: list[str] = []

    def app(request):
        if request.url.path == "/api/oauth2/token":
            return endpoint(request)
        api_calls.append(request.headers["Authorization"])
        if request.headers["Authorization"] == "Bearer access-1":
            return httpx.Response(401, headers={"WWW-Authenticate": "Bearer error=invalid_token"})
        return httpx.Response(200, json={"ok": True})

    with httpx.Client(auth=ExactAuth(refresher_for(store, clock, endpoint)),
                      transport=httpx.MockTransport(app)) as http:
        assert http.post(API_URL, json={"x": 1}).json() == {"ok": True}
    assert api_calls == ["Bearer access-1", "Bearer access-2"]
    assert len(endpoint.requests) == 1


def test_a_second_401_raises_authentication_error_without_looping():
    clock = FakeClock()
    store = InMemoryTokenStore({CONN: tokens(1, T0 - timedelta(seconds=300), lifetime=900)})
    endpoint = TokenEndpoint(clock)
    api_calls = 0

    def app(request):
        nonlocal api_calls
        if request.url.path == "/api/oauth2/token":
            return endpoint(request)
        api_calls += 1
        return httpx.Response(401, headers={"WWW-Authenticate": "Bearer error=invalid_token"})

    with httpx.Client(auth=ExactAuth(refresher_for(store, clock, endpoint)),
                      transport=httpx.MockTransport(app)) as http:
        with pytest.raises(AuthenticationError) as info:
            http.get(API_URL)
    assert api_calls == 2 and len(endpoint.requests) == 1
    assert "access-2" not in str(info.value) and "refresh-2" not in str(info.value)


def test_a_401_before_the_floor_keeps_the_token_when_exact_says_too_early():
    clock = FakeClock()
    store = InMemoryTokenStore({CONN: tokens(1, T0)})
    endpoint = TokenEndpoint(clock)
    endpoint.script = [too_early()]
    calls = 0

    def app(request):
        nonlocal calls
        if request.url.path == "/api/oauth2/token":
            return endpoint(request)
        calls += 1
        return httpx.Response(401) if calls == 1 else httpx.Response(200, json={})

    with httpx.Client(auth=ExactAuth(refresher_for(store, clock, endpoint)),
                      transport=httpx.MockTransport(app)) as http:
        assert http.get(API_URL).status_code == 200
    assert store.load(CONN).access_token == "access-1" and store.saves == 0


def test_async_use_is_refused():
    auth = ExactAuth(refresher_for(InMemoryTokenStore(), FakeClock(), TokenEndpoint(FakeClock())))
    with pytest.raises(RuntimeError):
        auth.async_auth_flow(httpx.Request("GET", API_URL))


# --- siblings and refusals ---------------------------------------------------------------------

def test_a_sibling_that_already_rotated_wins_without_a_token_call():
    clock = FakeClock()
    store = InMemoryTokenStore({CONN: tokens(1, T0)})
    endpoint = TokenEndpoint(clock)
    mine = refresher_for(store, clock, endpoint)
    assert mine.current().access_token == "access-1"  # cached in this process
    clock.advance(580)
    store.save(CONN, tokens(7, clock.now()))          # another process rotated meanwhile
    assert mine.current().access_token == "access-7"
    assert endpoint.requests == []


@pytest.mark.parametrize("status", [400, 401])  # observed 400, documented 401 (§2.4)
def test_too_early_keeps_the_still_valid_token(status):
    clock = FakeClock()
    store = InMemoryTokenStore({CONN: tokens(1, T0, lifetime=900)})
    endpoint = TokenEndpoint(clock)
    endpoint.script = [too_early(status)]
    clock.advance(800)  # window open by our margin, yet Exact refuses
    got = refresher_for(store, clock, endpoint).current()
    assert got.access_token == "access-1" and store.saves == 0
    assert len(endpoint.requests) == 1


def test_too_early_with_an_expired_token_waits_for_the_floor_and_tries_once_more():
    clock = FakeClock()
    # a skewed store: the access token already expired before the 570 s floor
    store = InMemoryTokenStore({CONN: tokens(1, T0, lifetime=300)})
    endpoint = TokenEndpoint(clock)
    endpoint.script = [too_early()]
    clock.advance(400)
    got = refresher_for(store, clock, endpoint).current()
    assert got.access_token == "access-2"
    assert clock.now() == T0 + timedelta(seconds=570)
    assert len(endpoint.requests) == 2


def test_old_refresh_token_used_needs_reconsent_with_an_actionable_message():
    clock = FakeClock()
    store = InMemoryTokenStore({CONN: tokens(1, T0)})
    endpoint = TokenEndpoint(clock)
    endpoint.script = [old_refresh_token_used()]
    clock.advance(600)
    with pytest.raises(ReconsentRequired) as info:
        refresher_for(store, clock, endpoint).current()
    assert "expensify-exact authorize --connection acme" in str(info.value)
    assert len(endpoint.requests) == 1  # no retry loop
    assert "refresh-1" not in str(info.value) and SECRET not in str(info.value)


def test_old_refresh_token_used_after_an_unlocked_sibling_rotated_uses_theirs():
    clock = FakeClock()
    store = InMemoryTokenStore({CONN: tokens(1, T0)})

    def endpoint(request):
        # a process outside our lock rotated and saved just before our request reached Exact
        store.save(CONN, tokens(9, clock.now()))
        return old_refresh_token_used()

    clock.advance(600)
    got = refresher_for(store, clock, endpoint).current()
    assert got.access_token == "access-9"


@pytest.mark.parametrize("response, expected", [
    # refresh token idle for more than 30 days (§2.5)
    (httpx.Response(400, json={"error": "invalid_request", "error_description":
                               "The refresh token expired at 10/11/2022 9:18:20 PM and it is now 10/28/2022 4:15:50 PM."}),
     ReconsentRequired),
    # corrupt or foreign token
    (httpx.Response(400, json={"error": "invalid_grant",
                               "error_description": "Token is not allowed, because of invalid or empty chainId"}),
     ReconsentRequired),
    # wrong client id/secret: an authentication problem, not a lost consent
    (httpx.Response(400, json={"error": "invalid_request"}), AuthenticationError),
])
def test_token_refusals_are_typed(response, expected):
    clock = FakeClock()
    store = InMemoryTokenStore({CONN: tokens(1, T0)})
    endpoint = TokenEndpoint(clock)
    endpoint.script = [response]
    clock.advance(600)
    with pytest.raises(expected) as info:
        refresher_for(store, clock, endpoint).current()
    assert type(info.value) is expected
    assert SECRET not in str(info.value) and "refresh-1" not in str(info.value)


def test_nothing_stored_means_authorize_first():
    with pytest.raises(ReconsentRequired, match="authorize --connection acme"):
        refresher_for(InMemoryTokenStore(), FakeClock(), TokenEndpoint(FakeClock())).current()


def test_threads_sharing_a_store_rotate_exactly_once():
    clock = FakeClock()
    store = InMemoryTokenStore({CONN: tokens(1, T0)})
    endpoint = TokenEndpoint(clock)
    clock.advance(580)
    refreshers = [refresher_for(store, clock, endpoint) for _ in range(8)]
    results: list[str] = []
    threads = [threading.Thread(target=lambda r=r: results.append(r.current().access_token)) for r in refreshers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["access-2"] * 8
    assert len(endpoint.requests) == 1


@pytest.mark.parametrize("age_days, warns", [
    (1, False),    # recently rotated
    (24.9, False),  # just under the threshold
    (25, True),    # threshold reached: warn before Exact's 30-day idle expiry
    (40, True),    # probably already dead: still worth saying
])
def test_refresh_token_idle_warning(age_days, warns):
    store = InMemoryTokenStore({CONN: tokens(1, T0)})
    refresher = refresher_for(store, FakeClock(), TokenEndpoint(FakeClock()))
    warning = refresher.refresh_token_idle_warning(T0 + timedelta(days=age_days))
    assert (warning is not None) is warns
    if warns:
        assert "expensify-exact authorize --connection acme" in warning


def test_reprs_hide_tokens_and_secrets():
    t = tokens(1, T0)
    refresher = refresher_for(InMemoryTokenStore({CONN: t}), FakeClock(), TokenEndpoint(FakeClock()))
    for text in (repr(t), str(t), repr(refresher), repr(ExactAuth(refresher))):
        assert "access-1" not in text and "refresh-1" not in text and SECRET not in text


# --- authorization-code flow -------------------------------------------------------------------

def test_authorize_url_carries_the_registered_parameters_and_a_random_state():
    url, state = build_authorize_url(BASE, "cid", "https://app.example/callback")
    other_url, other_state = build_authorize_url(BASE, "cid", "https://app.example/callback")
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == f"{BASE}/api/oauth2/auth"
    assert query == {"client_id": "cid", "redirect_uri": "https://app.example/callback",
                     "response_type": "code", "force_login": "0", "state": state}
    assert state != other_state and len(state) >= 16


@pytest.mark.parametrize("pasted, expected", [
    # the full redirect with %21 for "!" (§2.1)
    ("https://app.example/callback?code=XTzM%21IAAAACbPTz&state=s1", "XTzM!IAAAACbPTz"),
    # surrounding whitespace from a terminal paste
    ("  https://app.example/callback?state=s1&code=XTzM%21IA  \n", "XTzM!IA"),
    # a bare code, still encoded
    ("XTzM%21IAAAACbPTz", "XTzM!IAAAACbPTz"),
    # a bare code, already decoded
    ("XTzM!IAAAACbPTz", "XTzM!IAAAACbPTz"),
])
def test_parse_redirect(pasted, expected):
    assert parse_redirect(pasted, expected_state="s1") == expected


@pytest.mark.parametrize("pasted", [
    "https://app.example/callback?code=abc&state=other",            # state from another attempt
    "https://app.example/callback?code=abc",                        # state missing
    "https://app.example/callback?error=access_denied&state=s1",    # the user declined
    "https://app.example/callback?code=&state=s1",                   # empty code
])
def test_parse_redirect_refuses(pasted):
    with pytest.raises(AuthenticationError):
        parse_redirect(pasted, expected_state="s1")


def test_exchange_code_posts_the_form_and_returns_tokens():
    seen = {}

    def app(request):
        seen.update({k: v[0] for k, v in parse_qs(request.content.decode()).items()})
        seen["content-type"] = request.headers["Content-Type"]
        return httpx.Response(200, json={"access_token": "A1", "token_type": "Bearer", "expires_in": "600",
                                         "refresh_token": "R1"})

    clock = FakeClock()
    got = exchange_code(BASE, "cid", SECRET, "https://app.example/cb", "XT!1", clock,
                        transport=httpx.MockTransport(app))
    assert got.access_token == "A1" and got.refresh_token == "R1"
    assert got.access_expires_at == T0 + timedelta(seconds=600)
    assert seen == {"code": "XT!1", "redirect_uri": "https://app.example/cb", "grant_type": "authorization_code",
                    "client_id": "cid", "client_secret": SECRET,
                    "content-type": "application/x-www-form-urlencoded"}


def test_exchange_code_refusal_explains_the_three_minute_single_use_rule():
    app = lambda request: httpx.Response(400, text="Bad Request")  # noqa: E731
    with pytest.raises(AuthenticationError, match="3 minutes") as info:
        exchange_code(BASE, "cid", SECRET, "https://app.example/cb", "XT!1", FakeClock(),
                      transport=httpx.MockTransport(app))
    assert SECRET not in str(info.value) and "XT!1" not in str(info.value)


def test_wait_for_callback_returns_the_code_from_a_real_redirect():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = {}
    thread = threading.Thread(target=lambda: result.update(code=wait_for_callback(port, "s1", timeout=5)))
    thread.start()
    for _ in range(50):
        try:
            response = httpx.get(f"http://127.0.0.1:{port}/callback?code=AB%21cd&state=s1")
            break
        except httpx.ConnectError:
            time.sleep(0.05)
    thread.join(5)
    assert response.status_code == 200
    assert result["code"] == "AB!cd"


# --- against the sandbox simulator -------------------------------------------------------------
# Two workers share one connection (one TokenStore), as two Dagster runs would. The simulator
# enforces single-use refresh tokens and the 570 s floor, so any race shows up as a refusal.

from expensify_exact.api.exact.client import ExactClient  # noqa: E402
from expensify_exact.api.exact.regions import token_url  # noqa: E402
from expensify_exact_sandbox import seed as S  # noqa: E402
from expensify_exact_sandbox.clock import SandboxClock  # noqa: E402
from expensify_exact_sandbox.exact_app import ExactSimulator  # noqa: E402
from expensify_exact_sandbox.server import SandboxServer  # noqa: E402


def share_one_connection_for_30_minutes(sim, clock, base, transport_factory, workers=2, step_seconds=15):
    issued = sim.issue_tokens()
    now = clock.now()
    store = InMemoryTokenStore({CONN: ExactTokens(issued["access_token"], issued["refresh_token"],
                                                  now + timedelta(seconds=int(issued["expires_in"])), now)})
    end = now + timedelta(minutes=30)
    failures: list[BaseException] = []
    calls = [0] * workers

    def worker(i):
        transport = transport_factory()
        refresher = TokenRefresher(store, CONN, token_url(base), S.EXACT_CLIENT_ID, S.EXACT_CLIENT_SECRET,
                                   clock, transport=transport)
        try:
            with ExactClient(base, S.DIVISION, ExactAuth(refresher), clock, transport=transport) as client:
                while clock.now() < end:
                    client.get_all("financial/Journals", ["Code"])
                    calls[i] += 1
                    clock.sleep(step_seconds)
        except BaseException as exc:  # reported below; a thread must not die silently
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return failures, calls, store


def test_sim_two_workers_sharing_a_connection_for_30_minutes_never_reuse_a_refresh_token():
    clock = SandboxClock(start=datetime.now(timezone.utc).replace(microsecond=0), frozen=True)
    sim = ExactSimulator(seed=S.build_seed(clock.now().date()), clock=clock)
    sim.public_base_url = "http://exact.sandbox"
    failures, calls, store = share_one_connection_for_30_minutes(
        sim, clock, "http://exact.sandbox", lambda: httpx.WSGITransport(app=sim))
    stats = sim.stats
    assert failures == []
    assert stats["old_refresh_token_used"] == 0
    assert stats["refusals"].get("too_early", 0) == 0
    assert 3 <= stats["token"]["refreshes"] <= 4     # one rotation per ~10 minutes, not one per worker
    assert all(c > 10 for c in calls)
    assert store.load(CONN).issued_at > clock.now() - timedelta(minutes=11)


def test_sim_over_http_two_workers_sharing_a_connection_never_reuse_a_refresh_token():
    with SandboxServer() as server:
        failures, calls, _ = share_one_connection_for_30_minutes(
            server.exact, server.clock, server.exact_url, httpx.HTTPTransport, step_seconds=30)
        stats = server.exact.stats
    assert failures == []
    assert stats["old_refresh_token_used"] == 0
    assert stats["token"]["refreshes"] >= 3


def test_sim_refresh_whose_answer_is_lost_needs_reconsent_not_a_loop():
    # Exact rotated but the answer never came back: the new refresh token is unknown to us and the
    # old one is spent. Nothing can fix that except a person; the client must say so, once.
    with SandboxServer() as server:
        sim, clock = server.exact, server.clock
        issued = sim.issue_tokens()
        now = clock.now()
        store = InMemoryTokenStore({CONN: ExactTokens(issued["access_token"], issued["refresh_token"],
                                                      now + timedelta(seconds=600), now)})
        refresher = TokenRefresher(store, CONN, token_url(server.exact_url), S.EXACT_CLIENT_ID,
                                   S.EXACT_CLIENT_SECRET, clock, transport=httpx.HTTPTransport())
        clock.advance(580)
        sim.faults.arm("exact.token", "drop_after_rotate")
        with pytest.raises(TransientApiError):
            refresher.current()
        with pytest.raises(ReconsentRequired, match="authorize --connection acme"):
            refresher.current()
        assert sim.stats["token"]["calls"] == 2

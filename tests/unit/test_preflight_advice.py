"""What `preflight` tells an operator to do about a refused read: the advice must fit the refusal."""

import pytest

from expensify_exact.cli.commands.preflight import _read_advice
from expensify_exact.errors import (
    ApiError,
    AuthenticationError,
    ConnectionStopped,
    DivisionAccessError,
    ErrorBudgetExhausted,
)

CASES = [
    (ApiError("exact", "GET …: This endpoint has mandatory filtering applied. A GET request for this endpoint must "
                       "have a $filter parameter", status=400), "mandatory filtering"),
    (ConnectionStopped("exact", "GET …: Forbidden", status=403, reason="BlockedByErrorLimit"), "next full hour"),
    (ErrorBudgetExhausted("exact", "hrm/Costcenters: 5 errors this hour"), "next full hour"),
    (DivisionAccessError("exact", "division 1 is not accessible", status=403, reason="NoDivisionAccess"),
     "consent screen"),
    (AuthenticationError("exact", "GET …: unauthorized", status=401), "rights"),
    (ApiError("exact", "GET …: rate limit", status=429), "later"),
    (ApiError("exact", "GET …: Bad Request - Query String Too Long", status=400), "length of the URL"),
    (ApiError("exact", "GET …: something else", status=400), "report this output"),
]


@pytest.mark.parametrize(("error", "advice"), CASES, ids=[type(e).__name__ + str(e.status) for e, _ in CASES])
def test_each_refusal_gets_the_advice_that_fits_it(error, advice):
    assert advice in _read_advice(error, "hrm/Costcenters", "vermeerhals-nl")

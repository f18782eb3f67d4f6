"""Secrets never reach logs or exception text: tokens, client secrets, codes and passwords are masked."""

import pytest

from expensify_exact.api.http.redaction import MASK, redact_headers, redact_text, redact_url


@pytest.mark.parametrize("url, expected", [
    # OAuth code and client secret in a query string
    ("https://start.exactonline.nl/api/oauth2/token?code=XT%21abc&state=s1&client_secret=shh",
     "https://start.exactonline.nl/api/oauth2/token?code=***&state=s1&client_secret=***"),
    # an ordinary OData URL is returned exactly as it was
    ("https://start.exactonline.nl/api/v1/1/financial/GLAccounts?$select=Code,Description&$filter=Code eq '4406'",
     "https://start.exactonline.nl/api/v1/1/financial/GLAccounts?$select=Code,Description&$filter=Code eq '4406'"),
    # credentials in the userinfo part
    ("https://user:pw@proxy.local:8080/path", "https://***@proxy.local:8080/path"),
])
def test_redact_url(url, expected):
    assert redact_url(url) == expected


def test_redact_headers_masks_credentials_only():
    assert redact_headers({"Authorization": "Bearer AAEAAG", "Accept": "application/json", "Cookie": "a=b"}) == {
        "Authorization": MASK, "Accept": "application/json", "Cookie": MASK}


@pytest.mark.parametrize("text, secrets, must_not_contain, must_contain", [
    # a refresh-grant form body
    ("refresh_token=Gcp7!IAAAABh4&grant_type=refresh_token&client_id=c1&client_secret=s3cr3t",
     (), ["Gcp7!IAAAABh4", "s3cr3t"], ["client_id=c1"]),
    # a token-endpoint JSON body
    ('{"access_token":"AAEAAGxWulSx","token_type":"bearer","expires_in":"600","refresh_token":"Gcp7!IA"}',
     (), ["AAEAAGxWulSx", "Gcp7!IA"], ['"expires_in":"600"']),
    # a bearer header echoed into text
    ("request had Authorization: Bearer AAEAAGxWulSx.abc", (), ["AAEAAGxWulSx"], ["Bearer ***"]),
    # Expensify credentials inside requestJobDescription JSON
    ('{"credentials":{"partnerUserID":"aa_me","partnerUserSecret":"xyz123"}}', (), ["xyz123"], ["aa_me"]),
    # a known secret anywhere in free text
    ("Exact said: token 'verysecretvalue' is bad", ("verysecretvalue",), ["verysecretvalue"], []),
    # Exact's own Code fields are not secrets
    ('{"Code":"4406","JournalCode":"90"}', (), [], ['"Code":"4406"', '"JournalCode":"90"']),
])
def test_redact_text(text, secrets, must_not_contain, must_contain):
    out = redact_text(text, secrets=secrets)
    for s in must_not_contain:
        assert s not in out
    for s in must_contain:
        assert s in out


def test_redact_text_truncates_after_scrubbing():
    out = redact_text("x" * 1000 + "refresh_token=abc", limit=50)
    assert len(out) <= 51 and "abc" not in out

"""schemathesis against the admin API's OpenAPI document (console/openapi.json, the one the
server serves) and a real `iomtca serve`: generated requests for every operation, as an operator of
the security role (who may call all of them). Every answer must be below 500 and match the
document: status codes, content types and JSON bodies (schemathesis' default checks).

Bounded: `max_examples` per operation (IOMTCA_SCHEMATHESIS_EXAMPLES, 25 by default) keeps this
under a minute in `make test`.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from tests.console.test_console_api import tokens  # noqa: E402,F401

OPENAPI = Path(__file__).parents[2] / "console" / "openapi.json"
EXAMPLES = int(os.environ.get("IOMTCA_SCHEMATHESIS_EXAMPLES", "25"))
schema = schemathesis.openapi.from_path(OPENAPI)


@pytest.fixture(scope="module")
def srv(start_server):
    server = start_server("console-schemathesis")
    for n in range(5):   # something for the listing and device routes to find
        server.ca.add_device(f"st-pump-{n}")
    return server


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_answers_as_documented(case, srv, tokens):
    # ignored_auth is left out: it replaces one scheme's credentials while our valid bearer token
    # stays in the headers, and the document says bearer OR cookie (tests/console/test_console_api.py
    # shows nobody, a wrong token and an ended session get 401)
    excluded = [schemathesis.checks.ignored_auth]
    if case.media_type == "text/csv":
        # a CSV's header row and columns are beyond what a JSON schema can say: its strings are
        # generated at random, so the server refusing one is no mismatch (tests/console/test_console_sync.py
        # shows what a CSV upsert does)
        excluded.append(schemathesis.checks.positive_data_acceptance)
    if isinstance(case.body, dict) and case.body.get("udi") not in (None, ""):
        # a UDI's check digit is beyond a schema too: the registry checks it (ca/udi.py, its own tests)
        excluded.append(schemathesis.checks.positive_data_acceptance)
    excluded += beyond_schema(case)
    response = case.call_and_validate(base_url=srv.console, headers={"Authorization": f"Bearer {tokens['security']}"},
                                      verify=str(srv.ca.root), excluded_checks=excluded)
    assert response.status_code < 500


def beyond_schema(case) -> list:
    """What a password, a token label or a lifetime the server takes is beyond a schema's pattern:
    Unicode categories (str.isprintable), at most 365 days (ca/operators.py; tests/ca/test_operators.py)."""
    if isinstance(case.body, dict) and any(k in case.body for k in ("password", "new", "label", "expires")):
        return [schemathesis.checks.positive_data_acceptance]
    return []


@schema.include(path_regex="^/api/v1/(operators|me/password)").parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_operator_management_answers_as_documented(case, srv, tokens):
    """The operator routes as an admin (the run above, as security, only sees them refuse with 403).
    Runs last: generated requests may add, demote or disable accounts, though never the last admin."""
    excluded = [schemathesis.checks.ignored_auth, *beyond_schema(case)]
    response = case.call_and_validate(base_url=srv.console, headers={"Authorization": f"Bearer {tokens['admin']}"},
                                      verify=str(srv.ca.root), excluded_checks=excluded)
    assert response.status_code < 500

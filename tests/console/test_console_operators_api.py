"""The operator routes of the admin API (console/operators_api.py) against a real `iomtca serve`,
with curl as the client: only an admin manages accounts (every other role gets 403 and changes
nothing), a generated password is answered once and logs in, role and disabling take effect on
the next request, the last enabled admin keeps its role, an API token answered once works until
it is revoked, and an operator changes its own password only with the current one."""
from __future__ import annotations

import json

import pytest

from tests.console.test_console_api import PASSWORD, Browser, api, post_json, tokens  # noqa: F401
from tests.enroll.conftest import IOMTCA, run

NEW_PASSWORD = "a much longer new password"


@pytest.fixture(scope="module")
def srv(start_server):
    return start_server("console-operators-api")


def send(srv, method: str, path: str, body: dict | None, token: str):
    data = ["-H", "Content-Type: application/json", "--data-binary", json.dumps(body)] if body is not None else []
    return api(srv, path, "-X", method, *data, token=token)


def accounts(srv, token: str) -> dict[str, dict]:
    reply = api(srv, "/api/v1/operators", token=token)
    assert reply.status == 200, reply
    return {a["name"]: a for a in json.loads(reply.body)["operators"]}


def audit_actions(srv, token: str) -> list[str]:
    return [e["action"] for e in json.loads(api(srv, "/api/v1/audit?limit=500", token=token).body)["entries"]]


@pytest.mark.parametrize("role", ["auditor", "engineer", "security"])
def test_below_admin_every_operator_route_is_403_and_changes_nothing(srv, tokens, role):
    before = accounts(srv, tokens["admin"])
    token = tokens[role]
    calls = [("GET", "/api/v1/operators", None), ("GET", "/api/v1/operators/op-admin", None),
             ("POST", "/api/v1/operators", {"name": f"sneak-{role}", "role": "admin"}),
             ("PATCH", f"/api/v1/operators/op-{role}", {"role": "admin"}),
             ("PATCH", "/api/v1/operators/op-admin", {"disabled": True}),
             ("POST", "/api/v1/operators/op-admin/password", {}),
             ("POST", f"/api/v1/operators/op-{role}/tokens", {"label": "mine"}),
             ("DELETE", "/api/v1/operators/op-admin/tokens/1", None)]
    for method, path, body in calls:
        reply = send(srv, method, path, body, token)
        assert reply.status == 403, (method, path, reply)
        assert "admin" in json.loads(reply.body)["message"]
    assert accounts(srv, tokens["admin"]) == before


def test_an_added_operator_logs_in_with_the_password_answered_once(srv, tokens):
    reply = send(srv, "POST", "/api/v1/operators", {"name": "api-nurse", "role": "engineer"}, tokens["admin"])
    assert reply.status == 201, reply
    made = json.loads(reply.body)
    assert made["operator"] == {**made["operator"], "name": "api-nurse", "role": "engineer", "disabled": False}
    password = made["password"]
    assert len(password) == 20 and password.isalnum()
    browser = Browser(srv, "api-nurse")
    assert browser.login("api-nurse", password).status == 303
    # the password is in no later answer
    assert password.encode() not in api(srv, "/api/v1/operators/api-nurse", token=tokens["admin"]).body
    assert password.encode() not in api(srv, "/api/v1/audit?limit=500", token=tokens["admin"]).body
    again = send(srv, "POST", "/api/v1/operators", {"name": "api-nurse", "role": "auditor"}, tokens["admin"])
    assert again.status == 409, again
    given = send(srv, "POST", "/api/v1/operators", {"name": "api-given", "role": "auditor", "password": "short"},
                 tokens["admin"])
    assert given.status == 400 and "too short" in json.loads(given.body)["message"]


def test_role_and_disabling_hold_from_the_next_request(srv, tokens):
    admin = tokens["admin"]
    run([IOMTCA, "operator", "add", "api-tech", "--role", "engineer", "--password-stdin", "--dir", srv.ca.home],
        input=(PASSWORD + "\n").encode())
    made = json.loads(send(srv, "POST", "/api/v1/operators/api-tech/tokens", {"label": "cmms", "expires": "30d"},
                           admin).body)
    tech = made["token"]
    assert json.loads(api(srv, "/api/v1/me", token=tech).body)["role"] == "engineer"
    reply = send(srv, "PATCH", "/api/v1/operators/api-tech", {"role": "auditor"}, admin)
    assert reply.status == 200 and json.loads(reply.body)["operator"]["role"] == "auditor"
    assert json.loads(api(srv, "/api/v1/me", token=tech).body)["role"] == "auditor"
    refused = post_json(srv, "/api/v1/devices", {"device_id": "api-tech-pump", "model": "m", "owner": "o"}, token=tech)
    assert refused.status == 403, refused

    assert send(srv, "PATCH", "/api/v1/operators/api-tech", {"disabled": True}, admin).status == 200
    assert api(srv, "/api/v1/me", token=tech).status == 401     # its tokens ended with it
    assert send(srv, "PATCH", "/api/v1/operators/api-tech", {"disabled": False}, admin).status == 200
    assert api(srv, "/api/v1/me", token=tech).status == 401     # and stay ended when it is enabled
    assert Browser(srv, "api-tech").login("api-tech", PASSWORD).status == 303
    actions = audit_actions(srv, admin)
    assert {"operator_role_changed", "operator_disabled", "operator_enabled"} <= set(actions)


def test_the_last_enabled_admin_keeps_its_role_and_stays_enabled(srv, tokens):
    admin = tokens["admin"]
    others = [n for n, a in accounts(srv, admin).items() if a["role"] == "admin" and not a["disabled"]
              and n != "op-admin"]
    for name in others:   # make op-admin the only one
        assert send(srv, "PATCH", f"/api/v1/operators/{name}", {"disabled": True}, admin).status == 200
    for body in ({"role": "security"}, {"disabled": True}):
        reply = send(srv, "PATCH", "/api/v1/operators/op-admin", body, admin)
        assert reply.status == 409 and "last enabled admin" in json.loads(reply.body)["message"], reply
    assert accounts(srv, admin)["op-admin"] == {**accounts(srv, admin)["op-admin"], "role": "admin", "disabled": False}
    # with a second admin, op-admin may step down (and then may no longer manage accounts)
    second = json.loads(send(srv, "POST", "/api/v1/operators", {"name": "api-admin2", "role": "admin"}, admin).body)
    token2 = json.loads(run([IOMTCA, "operator", "token", "api-admin2", "--json", "--dir", srv.ca.home]).stdout)["token"]
    assert second["operator"]["role"] == "admin"
    assert send(srv, "PATCH", "/api/v1/operators/op-admin", {"role": "security"}, admin).status == 200
    assert api(srv, "/api/v1/operators", token=admin).status == 403
    assert send(srv, "PATCH", "/api/v1/operators/op-admin", {"role": "admin"}, token2).status == 200
    assert api(srv, "/api/v1/operators", token=admin).status == 200


def test_an_api_token_is_answered_once_listed_by_id_and_label_and_ends_when_revoked(srv, tokens):
    admin = tokens["admin"]
    run([IOMTCA, "operator", "add", "api-sync", "--role", "auditor", "--password-stdin", "--dir", srv.ca.home],
        input=(PASSWORD + "\n").encode())
    made = json.loads(send(srv, "POST", "/api/v1/operators/api-sync/tokens", {"label": "CMMS nightly"}, admin).body)
    other = json.loads(send(srv, "POST", "/api/v1/operators/api-sync/tokens", {}, admin).body)
    assert made["label"] == "CMMS nightly" and other["label"] is None and made["id"] != other["id"]
    listed = json.loads(api(srv, "/api/v1/operators/api-sync", token=admin).body)["tokens"]
    assert [(t["id"], t["label"], t["expired"]) for t in listed] == [(made["id"], "CMMS nightly", False),
                                                                    (other["id"], None, False)]
    assert made["token"] not in json.dumps(listed)
    assert api(srv, "/api/v1/me", token=made["token"]).status == 200
    reply = send(srv, "DELETE", f"/api/v1/operators/api-sync/tokens/{made['id']}", None, admin)
    assert reply.status == 200 and json.loads(reply.body) == {"revoked": made["id"]}
    assert api(srv, "/api/v1/me", token=made["token"]).status == 401
    assert api(srv, "/api/v1/me", token=other["token"]).status == 200   # only that one ended
    assert send(srv, "DELETE", f"/api/v1/operators/api-sync/tokens/{made['id']}", None, admin).status == 404
    # another account's token id is not this account's
    assert send(srv, "DELETE", f"/api/v1/operators/op-admin/tokens/{other['id']}", None, admin).status == 404
    for bad in ("x", "0", "³", "99999999999999999999"):
        assert send(srv, "DELETE", f"/api/v1/operators/api-sync/tokens/{bad}", None, admin).status == 400, bad
    long_life = send(srv, "POST", "/api/v1/operators/api-sync/tokens", {"expires": "400d"}, admin)
    assert long_life.status == 400 and "365" in json.loads(long_life.body)["message"]


def test_an_operator_changes_its_own_password_only_with_the_current_one(srv, tokens):
    run([IOMTCA, "operator", "add", "api-self", "--role", "auditor", "--password-stdin", "--dir", srv.ca.home],
        input=(PASSWORD + "\n").encode())
    token = json.loads(run([IOMTCA, "operator", "token", "api-self", "--json", "--dir", srv.ca.home]).stdout)["token"]
    browser = Browser(srv, "api-self")
    assert browser.login("api-self", PASSWORD).status == 303
    wrong = post_json(srv, "/api/v1/me/password", {"current": "not the password", "new": NEW_PASSWORD}, token=token)
    assert 400 <= wrong.status < 500 and wrong.status != 403, wrong
    assert browser.get("/api/v1/me").status == 200             # nothing changed: the session lives
    weak = post_json(srv, "/api/v1/me/password", {"current": PASSWORD, "new": "short"}, token=token)
    assert weak.status == 400 and "too short" in json.loads(weak.body)["message"]
    ok = post_json(srv, "/api/v1/me/password", {"current": PASSWORD, "new": NEW_PASSWORD}, token=token)
    assert ok.status == 200 and json.loads(ok.body) == {"sessions_ended": True}
    assert browser.get("/api/v1/me").status == 401             # the session ended
    assert api(srv, "/api/v1/me", token=token).status == 200    # API tokens stay
    assert Browser(srv, "api-self-old").login("api-self", PASSWORD).status != 303
    assert Browser(srv, "api-self-new").login("api-self", NEW_PASSWORD).status == 303

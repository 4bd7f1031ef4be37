"""The admin API and the console's login against a real `iomtca serve` (its console listener),
with operators made by the real CLI and curl as the client: roles enforced on the server,
sessions in Secure/HttpOnly/SameSite=Strict cookies, CSRF on every cookie-authenticated POST,
the security headers on every answer, and the OpenAPI document in step with the routes."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.enroll.conftest import IOMTCA, run

PASSWORD = "correct horse battery staple"
ROLES = ("auditor", "engineer", "security", "admin")
OPENAPI = Path(__file__).parents[2] / "console" / "openapi.json"


@pytest.fixture(scope="module")
def srv(start_server):
    return start_server("console")


@pytest.fixture(scope="module")
def ca(srv):
    return srv.ca


@pytest.fixture(scope="module")
def tokens(srv):
    """An operator of every role (password PASSWORD) and an API token of each."""
    out = {}
    for role in ROLES:
        name = f"op-{role}"
        run([IOMTCA, "operator", "add", name, "--role", role, "--password-stdin", "--dir", srv.ca.home],
            input=(PASSWORD + "\n").encode())
        info = json.loads(run([IOMTCA, "operator", "token", name, "--json", "--dir", srv.ca.home]).stdout)
        out[role] = info["token"]
    return out


def api(srv, path: str, *args, token: str | None = None, **kw):
    auth = ["-H", f"Authorization: Bearer {token}"] if token else []
    return srv.curl(srv.console + path, "--cacert", srv.ca.root, *auth, *args, **kw)


def post_json(srv, path: str, body: dict, **kw):
    return api(srv, path, "-X", "POST", "-H", "Content-Type: application/json", "--data-binary",
               json.dumps(body), **kw)


def enrolled(srv, ca, stem: str):
    """A device enrolled over EST: (device id, certificate serial as the API shows it, the issued DeviceCert)."""
    device = ca.unique(stem)
    token = ca.add_device(device)
    issued = srv.enroll(device, token)
    return device, issued.serial_hex, issued


def ocsp_status(srv, ca, tools, issued) -> str:
    """`openssl ocsp` against the responder listener, the response verified with the responder's certificate."""
    out = tools.run(["openssl", "ocsp", "-issuer", ca.issuing, "-cert", issued.cert_path, "-url", f"{srv.http}/ocsp",
                     "-VAfile", ca.ocsp_cert, "-CAfile", ca.chain])
    assert "Response verify OK" in out.stdout + out.stderr, out
    return out.stdout


def set_cookies(reply) -> list[str]:
    return [line.split(":", 1)[1].strip() for line in reply.raw_headers.splitlines()
            if line.lower().startswith("set-cookie:")]


# -- authentication and roles ----------------------------------------------------------------------

def test_nobody_gets_401_from_the_api_and_the_login_form_from_a_page(srv):
    reply = api(srv, "/api/v1/devices")
    assert reply.status == 401 and (reply.header("www-authenticate") or "").startswith("Bearer"), reply
    assert json.loads(reply.body)["code"] == "unauthorized"
    page = srv.curl(srv.console + "/devices", "--cacert", srv.ca.root)
    assert page.status == 303 and page.header("location") == "/login", page
    wrong = api(srv, "/api/v1/devices", token="iomtop_not-a-token")
    assert wrong.status == 401, wrong


def test_every_role_reads_and_sees_what_it_may(srv, tokens):
    for role, token in tokens.items():
        me = json.loads(api(srv, "/api/v1/me", token=token).body)
        assert me["name"] == f"op-{role}" and me["role"] == role
        assert ("cert.revoke" in me["may"]) == (role in ("security", "admin")), me
        assert api(srv, "/api/v1/devices", token=token).status == 200


def test_an_auditor_may_not_revoke_and_security_may_and_the_audit_names_both(srv, ca, tokens, tools):
    device, serial, issued = enrolled(srv, ca, "pump")
    denied = post_json(srv, f"/api/v1/certificates/{serial}/revoke", {"reason": "keyCompromise"},
                       token=tokens["auditor"])
    assert denied.status == 403 and json.loads(denied.body)["code"] == "forbidden", denied
    assert post_json(srv, f"/api/v1/certificates/{serial}/revoke", {"reason": "keyCompromise"},
                     token=tokens["engineer"]).status == 403
    listed = json.loads(api(srv, f"/api/v1/devices/{device}", token=tokens["auditor"]).body)
    assert [c["status"] for c in listed["certificates"]] == ["good"]
    assert ": good" in ocsp_status(srv, ca, tools, issued)

    done = post_json(srv, f"/api/v1/certificates/{serial}/revoke", {"reason": "keyCompromise"},
                     token=tokens["security"])
    assert done.status == 200, done
    assert json.loads(done.body)["certificate"]["status"] == "revoked"
    [entry] = ca.audit("certificate_revoked", device)
    assert entry["actor"] == "operator:op-security:security", entry
    # revoked is terminal, through the API too
    again = api(srv, f"/api/v1/certificates/{serial}/release", "-X", "POST", token=tokens["security"])
    assert again.status in (400, 403) and json.loads(again.body)["code"] != "internal", again
    assert ": revoked" in ocsp_status(srv, ca, tools, issued)   # the responder listener says so at once
    audit = json.loads(api(srv, f"/api/v1/audit?device={device}", token=tokens["auditor"]).body)
    assert audit["chain"]["intact"] is True
    assert [e["action"] for e in audit["entries"]][:1] == ["certificate_revoked"]


def test_bad_input_gets_a_4xx_with_a_reason(srv, tokens):
    token = tokens["security"]
    for reply in (post_json(srv, "/api/v1/certificates/zz/revoke", {}, token=token),
                  post_json(srv, "/api/v1/certificates/01/revoke", {"reason": "because"}, token=token),
                  api(srv, "/api/v1/certificates/01/revoke", "-X", "POST", "--data-binary", "x", token=token),
                  api(srv, "/api/v1/devices?limit=lots", token=token),
                  api(srv, "/api/v1/changes?limit=%C2%B3", token=token),   # "³".isdigit() (fuzz/wire.py found it)
                  api(srv, "/api/v1/devices/no%0Apump", token=token)):
        assert 400 <= reply.status < 500, reply
        body = json.loads(reply.body)
        assert body["code"] != "internal" and body["message"], body
    missing = post_json(srv, "/api/v1/certificates/0123456789abcdef/revoke", {}, token=token)
    assert missing.status == 404, missing


# -- the console's session and CSRF ---------------------------------------------------------------

class Browser:
    """curl with a cookie jar: what a browser keeps between requests."""

    def __init__(self, srv, name: str) -> None:
        self.srv = srv
        self.jar = srv.ca.work / f"jar-{name}"

    def get(self, path: str, *args):
        return self.srv.curl(self.srv.console + path, "--cacert", self.srv.ca.root, "-b", self.jar, "-c", self.jar,
                             *args)

    def post(self, path: str, *args):
        return self.get(path, "-X", "POST", *args)

    def login(self, name: str, password: str):
        form = self.get("/login")
        nonce = re.search(r'name="nonce" value="([^"]+)"', form.text).group(1)
        return self.post("/login", "--data-urlencode", f"nonce={nonce}", "--data-urlencode", f"name={name}",
                         "--data-urlencode", f"password={password}")

    def csrf(self) -> str:
        return re.search(r'name="csrf" value="([^"]+)"', self.get("/").text).group(1)


def test_login_sets_a_strict_session_cookie_and_a_wrong_password_says_no_more(srv, tokens):
    b = Browser(srv, "login")
    wrong = b.login("op-auditor", "not the password at all")
    assert wrong.status == 401 and "operator name or password not accepted" in wrong.text, wrong
    unknown = b.login("op-nobody", "not the password at all")
    assert unknown.status == 401 and "operator name or password not accepted" in unknown.text
    ok = b.login("op-auditor", PASSWORD)
    assert ok.status == 303 and ok.header("location") == "/", ok
    [session] = [c for c in set_cookies(ok) if c.startswith("__Host-iomt_session=")]
    flags = {f.strip().lower() for f in session.split(";")[1:]}
    assert {"secure", "httponly", "samesite=strict", "path=/"} <= flags, session
    assert not any(f.startswith("domain") for f in flags)
    overview = b.get("/")
    assert overview.status == 200 and "op-auditor (auditor)" in overview.text
    assert overview.text.count('<svg xmlns="http://www.w3.org/2000/svg" role="img"') == 2   # the two charts
    assert "Certificate expiries per day" in overview.text and "Enrollments and renewals per hour" in overview.text


def test_a_cookie_post_needs_the_csrf_token_and_the_same_origin(srv, ca, tokens):
    device, serial, _ = enrolled(srv, ca, "monitor")
    b = Browser(srv, "csrf")
    assert b.login("op-security", PASSWORD).status == 303
    body = ("-H", "Content-Type: application/json", "--data-binary", '{"reason": "superseded"}')
    path = f"/api/v1/certificates/{serial}/revoke"
    no_token = b.post(path, *body)
    assert no_token.status == 400 and "CSRF" in json.loads(no_token.body)["message"], no_token
    csrf = b.csrf()
    foreign = b.post(path, *body, "-H", f"X-CSRF-Token: {csrf}", "-H", "Origin: https://evil.example")
    assert foreign.status == 400 and "cross-origin" in json.loads(foreign.body)["message"], foreign
    assert json.loads(api(srv, f"/api/v1/devices/{device}", token=tokens["auditor"]).body)[
        "certificates"][0]["status"] == "good"
    done = b.post(path, *body, "-H", f"X-CSRF-Token: {csrf}")
    assert done.status == 200, done


def test_logout_ends_the_session_on_the_server(srv, tokens):
    b = Browser(srv, "logout")
    assert b.login("op-engineer", PASSWORD).status == 303
    cookie = [c for c in b.jar.read_text().splitlines() if "__Host-iomt_session" in c][0].split("\t")[-1]
    csrf = b.csrf()
    assert b.post("/logout", "--data-urlencode", f"csrf={csrf}").status == 303
    # the old cookie, replayed by hand, no longer opens anything
    replay = srv.curl(srv.console + "/api/v1/me", "--cacert", srv.ca.root, "-b", f"__Host-iomt_session={cookie}")
    assert replay.status == 401, replay


def test_every_answer_carries_the_security_headers(srv, tokens):
    for reply in (api(srv, "/api/v1/me", token=tokens["auditor"]), api(srv, "/api/v1/devices"),
                  srv.curl(srv.console + "/login", "--cacert", srv.ca.root),
                  srv.curl(srv.console + "/nowhere", "--cacert", srv.ca.root)):
        csp = reply.header("content-security-policy") or ""
        assert "default-src 'none'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
        assert reply.header("x-content-type-options") == "nosniff" and reply.header("cache-control") == "no-store"


def test_the_console_listener_asks_for_no_client_certificate(srv, tools):
    host_port = srv.console.removeprefix("https://")
    out = tools.run(["openssl", "s_client", "-connect", host_port, "-CAfile", str(srv.ca.root), "-brief"],
                    input=b"", check=False)
    text = out.stdout + out.stderr
    assert "Verification: OK" in text, text
    assert "Requested CA names" not in text and "Acceptable client certificate CA names" not in text, text


# -- the OpenAPI document --------------------------------------------------------------------------

def test_the_openapi_document_is_served_and_names_every_api_route(srv):
    served = api(srv, "/api/v1/openapi.json")
    assert served.status == 200 and json.loads(served.body) == json.loads(OPENAPI.read_text())
    from aiohttp import web

    from console import api as console_api, evidence_routes, operators_api, sync
    app = web.Application()
    for module in (console_api, operators_api, sync, evidence_routes):
        module.add_routes(app)
    routes = {(r.method.lower(), r.resource.canonical) for r in app.router.routes()
              if r.method != "HEAD" and r.resource.canonical.startswith("/api/")}
    documented = {(m, p) for p, ops in json.loads(OPENAPI.read_text())["paths"].items() for m in ops}
    assert routes == documented


def test_an_engineer_registers_edits_renews_the_token_and_decommissions_through_the_api(srv, ca, tokens):
    device = ca.unique("api-pump")
    made = post_json(srv, "/api/v1/devices", {"device_id": device, "model": "infusion-pump", "owner": "icu"},
                     token=tokens["engineer"])
    assert made.status == 201 and made.json()["token"], made
    assert post_json(srv, "/api/v1/devices", {"device_id": device, "model": "x", "owner": "y"},
                     token=tokens["engineer"]).status == 409
    assert post_json(srv, "/api/v1/devices", {"device_id": ca.unique("x"), "model": "m", "owner": "o"},
                     token=tokens["auditor"]).status == 403
    patched = api(srv, f"/api/v1/devices/{device}", "-X", "PATCH", "-H", "Content-Type: application/json",
                  "--data-binary", '{"location": "bed 4", "owner": "icu"}', token=tokens["engineer"])
    assert patched.status == 200 and patched.json()["device"]["location"] == "bed 4", patched
    [edit] = ca.audit("device_edited", device)
    assert edit["detail"] == {"location": {"from": "", "to": "bed 4"}}   # the unchanged owner is no change
    fresh = api(srv, f"/api/v1/devices/{device}/token", "-X", "POST", token=tokens["engineer"]).json()["token"]
    assert fresh != made.json()["token"]
    issued = srv.enroll(device, fresh)
    gone = api(srv, f"/api/v1/devices/{device}/decommission", "-X", "POST", token=tokens["engineer"])
    assert gone.status == 200 and gone.json()["revoked"] == [issued.serial_hex], gone
    assert ca.device(device)["status"] == "decommissioned"

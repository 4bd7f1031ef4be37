"""The console's operator pages against a real `iomtca serve`, driven with curl as a browser
without JavaScript would: only an admin sees and may use them (the server refuses every other
role on every GET and POST); a generated password is shown once and logs in; a role change holds
from the operator's next request; the last enabled admin cannot be disabled or demoted; an API
token is shown once, works as Bearer and stops at once when revoked; an operator changes its own
password only with the current one, and its sessions end; every form carries the CSRF token and
every field its label."""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest

from tests.console.test_console_api import PASSWORD, Browser, api, tokens  # noqa: F401
from tests.console.test_console_pages import form_post
from tests.enroll.conftest import IOMTCA, run

SHOWN = re.compile(r'<code class="token">([^<]+)</code>')


@pytest.fixture(scope="module")
def srv(start_server):
    return start_server("console-operators")


@pytest.fixture(scope="module")
def ca(srv):
    return srv.ca


@pytest.fixture(scope="module")
def logged_in(srv, tokens):
    """A logged-in browser per role (the operators `tokens` made with the CLI)."""
    out = {}
    for role in ("auditor", "engineer", "security", "admin"):
        b = Browser(srv, f"ops-{role}")
        assert b.login(f"op-{role}", PASSWORD).status == 303
        out[role] = b
    return out


@pytest.fixture
def admin(logged_in):
    return logged_in["admin"]


def new_operator(ca, role: str = "auditor") -> str:
    """An operator made with the CLI (password PASSWORD)."""
    name = ca.unique(f"acct-{role}").lower()
    run([IOMTCA, "operator", "add", name, "--role", role, "--password-stdin", "--dir", ca.home],
        input=(PASSWORD + "\n").encode())
    return name


def added(admin, name: str, role: str) -> str:
    """Add an operator through the form: the password shown once."""
    page = form_post(admin, "/operators", name=name, role=role)
    assert page.status == 200, page
    return SHOWN.search(page.text).group(1)


def session_cookie(browser) -> str:
    return [line for line in browser.jar.read_text().splitlines() if "__Host-iomt_session" in line][0].split("\t")[-1]


def replay(srv, cookie: str, path: str = "/api/v1/me"):
    return srv.curl(srv.console + path, "--cacert", srv.ca.root, "-b", f"__Host-iomt_session={cookie}")


def role_of(ca, name: str) -> str:
    accounts = json.loads(ca.iomtca("operator", "list", "--json").stdout)
    return next(a["role"] for a in accounts if a["name"] == name)


# -- who may -------------------------------------------------------------------------------------

@pytest.mark.parametrize("role", ["auditor", "engineer", "security"])
def test_every_role_below_admin_is_refused_every_operator_page_and_post(srv, ca, logged_in, tokens, role):
    b = logged_in[role]
    assert 'href="/operators"' not in b.get("/").text   # no menu entry
    token_id = 1   # the role is checked before the token is looked up
    for path in ("/operators", "/operators/op-admin", "/operators/op-admin/disable", "/operators/op-admin/password",
                 f"/operators/op-admin/tokens/{token_id}/revoke"):
        page = b.get(path)
        assert page.status == 403 and "admin" in page.text, (path, page)
    target = new_operator(ca, "engineer")
    before = len(ca.audit())
    for path, fields in (("/operators", {"name": ca.unique("intruder").lower(), "role": "admin"}),
                         (f"/operators/op-{role}/role", {"role": "admin"}),   # itself
                         (f"/operators/{target}/role", {"role": "admin"}),
                         (f"/operators/{target}/disable", {"confirm": "yes"}),
                         (f"/operators/{target}/enable", {}),
                         (f"/operators/{target}/password", {"confirm": "yes"}),
                         (f"/operators/{target}/tokens", {"label": "x", "lifetime": "30d"}),
                         (f"/operators/op-admin/tokens/{token_id}/revoke", {"confirm": "yes"})):
        page = form_post(b, path, **fields)
        assert page.status == 403 and "operator.manage needs the admin role" in page.text, (path, page)
    assert role_of(ca, f"op-{role}") == role and role_of(ca, target) == "engineer"
    assert [e["action"] for e in ca.audit()[before:] if e["action"].startswith("operator_")] == []
    assert api(srv, "/api/v1/me", token=tokens[role]).status == 200


def test_nobody_is_sent_to_the_login_form_and_an_admin_sees_the_menu_entry(srv, admin):
    for path in ("/operators", "/operators/op-admin", "/account"):
        page = srv.curl(srv.console + path, "--cacert", srv.ca.root)
        assert page.status == 303 and page.header("location") == "/login", (path, page)
    assert '<a href="/operators">Operators</a>' in admin.get("/").text
    assert '<a href="/account"' in admin.get("/").text


# -- accounts ------------------------------------------------------------------------------------

def test_an_admin_adds_an_operator_and_the_password_shown_once_logs_in(srv, ca, admin):
    name = ca.unique("nurse").lower()
    password = added(admin, name, "engineer")
    assert re.fullmatch(r"[A-Za-z0-9]{20}", password), password
    listed = admin.get("/operators")
    assert listed.status == 200 and f'<a href="/operators/{name}">{name}</a></td><td>engineer</td>' in listed.text
    assert password not in listed.text and password not in admin.get(f"/operators/{name}").text
    b = Browser(srv, f"new-{name}")
    assert b.login(name, password).status == 303
    assert f"{name} (engineer)" in b.get("/").text
    [entry] = [e for e in ca.audit("operator_added") if e["detail"]["operator"] == name]
    assert entry["actor"] == "operator:op-admin:admin" and entry["detail"]["role"] == "engineer"
    again = form_post(admin, "/operators", name=name, role="auditor")
    assert again.status == 409 and "already exists" in again.text and not SHOWN.search(again.text), again
    bad = form_post(admin, "/operators", name="Bad Name!", role="auditor")
    assert bad.status == 400 and "invalid operator name" in bad.text, bad
    bad_role = form_post(admin, "/operators", name=ca.unique("x").lower(), role="root")
    assert bad_role.status == 400 and "is not one of" in bad_role.text, bad_role


def test_a_role_change_holds_from_the_operators_next_request(srv, ca, admin):
    name = new_operator(ca, "auditor")
    b = Browser(srv, f"role-{name}")
    assert b.login(name, PASSWORD).status == 303
    assert b.get("/onboard").status == 403
    done = form_post(admin, f"/operators/{name}/role", role="engineer")
    assert done.status == 303 and done.header("location") == f"/operators/{name}", done
    assert b.get("/onboard").status == 200               # the same session, its next request
    assert f"{name} (engineer)" in b.get("/account").text
    assert form_post(admin, f"/operators/{name}/role", role="auditor").status == 303
    assert b.get("/onboard").status == 403
    [first, second] = [e for e in ca.audit("operator_role_changed") if e["detail"]["operator"] == name]
    assert (first["detail"]["from"], first["detail"]["to"]) == ("auditor", "engineer")
    assert (second["detail"]["from"], second["detail"]["to"]) == ("engineer", "auditor")


def test_disabling_goes_through_a_confirmation_and_the_last_enabled_admin_is_kept(srv, ca, admin):
    second = ca.unique("admin2").lower()
    password = added(admin, second, "admin")
    b = Browser(srv, f"dis-{second}")
    assert b.login(second, password).status == 303
    confirm = admin.get(f"/operators/{second}/disable")
    assert confirm.status == 200 and 'name="confirm"' in confirm.text
    assert f'action="/operators/{second}/disable"' in confirm.text
    unconfirmed = form_post(admin, f"/operators/{second}/disable")
    assert unconfirmed.status == 400 and "confirmation" in unconfirmed.text, unconfirmed
    assert b.get("/operators").status == 200
    done = form_post(admin, f"/operators/{second}/disable", confirm="yes")
    assert done.status == 303, done
    assert b.get("/operators").status == 303                  # its session ended
    assert Browser(srv, f"dis2-{second}").login(second, password).status == 401
    assert "disabled" in admin.get(f"/operators/{second}").text
    # op-admin is the last enabled admin now
    for path, fields in (("/operators/op-admin/disable", {"confirm": "yes"}),
                         ("/operators/op-admin/role", {"role": "security"})):
        refused = form_post(admin, path, **fields)
        assert refused.status == 409 and "last enabled admin" in refused.text, (path, refused)
        assert "<h1>Not done: 409</h1>" in refused.text
    assert role_of(ca, "op-admin") == "admin" and admin.get("/operators").status == 200
    assert form_post(admin, f"/operators/{second}/enable").status == 303
    assert Browser(srv, f"dis3-{second}").login(second, password).status == 303
    assert form_post(admin, f"/operators/{second}/disable", confirm="yes").status == 303   # op-admin is last again


def test_unknown_accounts_and_tokens_are_404_pages(srv, admin):
    for page in (admin.get("/operators/nobody-here"), admin.get("/operators/Not%20A%20Name"),
                 admin.get("/operators/op-admin/tokens/999999/revoke"),
                 admin.get("/operators/op-admin/tokens/x1/revoke"),
                 form_post(admin, "/operators/nobody-here/role", role="auditor"),
                 form_post(admin, "/operators/op-admin/tokens/999999/revoke", confirm="yes")):
        assert page.status == 404 and "<h1>Not done: 404</h1>" in page.text, page


def test_an_admin_sets_a_new_password_shown_once_and_the_accounts_sessions_end(srv, ca, admin):
    name = new_operator(ca, "security")
    b = Browser(srv, f"pw-{name}")
    assert b.login(name, PASSWORD).status == 303
    cookie = session_cookie(b)
    confirm = admin.get(f"/operators/{name}/password")
    assert confirm.status == 200 and 'name="confirm"' in confirm.text
    assert form_post(admin, f"/operators/{name}/password").status == 400
    page = form_post(admin, f"/operators/{name}/password", confirm="yes")
    assert page.status == 200, page
    password = SHOWN.search(page.text).group(1)
    assert replay(srv, cookie).status == 401
    assert Browser(srv, f"pw2-{name}").login(name, PASSWORD).status == 401
    assert Browser(srv, f"pw3-{name}").login(name, password).status == 303


# -- API tokens ----------------------------------------------------------------------------------

def test_a_new_api_token_is_shown_once_works_as_bearer_and_stops_when_revoked(srv, ca, admin):
    name = new_operator(ca, "engineer")
    page = form_post(admin, f"/operators/{name}/tokens", label="ci pipeline", lifetime="30d")
    assert page.status == 200 and "expires" in page.text, page
    secret = SHOWN.search(page.text).group(1)
    assert secret.startswith("iomtop_")
    me = api(srv, "/api/v1/me", token=secret)
    assert me.status == 200 and me.json()["name"] == name and me.json()["role"] == "engineer", me
    detail = admin.get(f"/operators/{name}")
    assert "ci pipeline" in detail.text and "operator:op-admin:admin" in detail.text and secret not in detail.text
    token_id = re.search(rf'/operators/{name}/tokens/(\d+)/revoke', detail.text).group(1)
    confirm = admin.get(f"/operators/{name}/tokens/{token_id}/revoke")
    assert confirm.status == 200 and "ci pipeline" in confirm.text and 'name="confirm"' in confirm.text
    assert form_post(admin, f"/operators/{name}/tokens/{token_id}/revoke").status == 400
    assert api(srv, "/api/v1/me", token=secret).status == 200
    done = form_post(admin, f"/operators/{name}/tokens/{token_id}/revoke", confirm="yes")
    assert done.status == 303 and done.header("location") == f"/operators/{name}", done
    assert api(srv, "/api/v1/me", token=secret).status == 401
    assert f"/tokens/{token_id}/revoke" not in admin.get(f"/operators/{name}").text
    assert form_post(admin, f"/operators/{name}/tokens", lifetime="10y").status == 400
    assert form_post(admin, f"/operators/{name}/tokens", label="x" * 65, lifetime="30d").status == 400


# -- one's own account ---------------------------------------------------------------------------

def test_an_operator_changes_its_own_password_only_with_the_current_one(srv, ca, tokens):
    name = new_operator(ca, "auditor")
    b, other = Browser(srv, f"own-{name}"), Browser(srv, f"own2-{name}")
    assert b.login(name, PASSWORD).status == 303 and other.login(name, PASSWORD).status == 303
    page = b.get("/account")
    assert page.status == 200 and f"<dd>{name}</dd>" in page.text and "<dd>auditor</dd>" in page.text
    new = "a much longer new passphrase"
    wrong = form_post(b, "/account", current="not the password", new=new, again=new)
    assert wrong.status == 400 and "current password is not right" in wrong.text, wrong
    differ = form_post(b, "/account", current=PASSWORD, new=new, again=new + "!")
    assert differ.status == 400 and "differ" in differ.text, differ
    short = form_post(b, "/account", current=PASSWORD, new="short", again="short")
    assert short.status == 400 and "too short" in short.text, short
    assert b.get("/account").status == 200 and other.get("/account").status == 200   # nothing changed
    cookie = session_cookie(b)
    done = form_post(b, "/account", current=PASSWORD, new=new, again=new)
    assert done.status == 200 and "Log in again" in done.text and 'name="csrf"' not in done.text, done
    assert replay(srv, cookie).status == 401                  # this session ended on the server
    assert other.get("/account").status == 303                 # and the other one
    assert b.get("/account").status == 303
    assert Browser(srv, f"own3-{name}").login(name, PASSWORD).status == 401
    assert Browser(srv, f"own4-{name}").login(name, new).status == 303
    assert [e["actor"] for e in ca.audit("operator_password_changed") if e["detail"]["operator"] == name] == [
        f"operator:{name}:auditor"]


# -- forms ---------------------------------------------------------------------------------------

def test_every_post_without_the_csrf_token_is_refused(srv, ca, admin):
    name = new_operator(ca, "auditor")
    fresh = ca.unique("nocsrf").lower()
    for path, fields in (("/operators", {"name": fresh, "role": "auditor"}),
                         (f"/operators/{name}/role", {"role": "admin"}),
                         (f"/operators/{name}/disable", {"confirm": "yes"}),
                         (f"/operators/{name}/enable", {}),
                         (f"/operators/{name}/password", {"confirm": "yes"}),
                         (f"/operators/{name}/tokens", {"label": "x", "lifetime": "30d"}),
                         (f"/operators/{name}/tokens/1/revoke", {"confirm": "yes"}),
                         ("/account", {"current": PASSWORD, "new": "x" * 20, "again": "x" * 20})):
        args = [a for k, v in fields.items() for a in ("--data-urlencode", f"{k}={v}")] or ["-d", ""]
        page = admin.post(path, *args)
        assert page.status == 400 and "CSRF" in page.text, (path, page)
    assert role_of(ca, name) == "auditor" and fresh not in admin.get("/operators").text


class Fields(HTMLParser):
    """The ids of visible fields and the `for` of labels; scripts and inline styles seen."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: list[str | None] = []
        self.labels: set[str] = set()
        self.inline: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("input", "select", "textarea") and a.get("type") != "hidden":
            self.fields.append(a.get("id"))
        if tag == "label" and a.get("for"):
            self.labels.add(a["for"])
        if tag == "script" or "style" in a or any(k.startswith("on") for k in a):
            self.inline.append(tag)


def test_every_field_on_these_pages_has_a_label_and_no_inline_script(srv, ca, admin, logged_in):
    name = new_operator(ca, "engineer")
    form_post(admin, f"/operators/{name}/tokens", label="labelled", lifetime="90d")
    token_id = re.search(rf'/operators/{name}/tokens/(\d+)/revoke', admin.get(f"/operators/{name}").text).group(1)
    pages = [admin.get(p) for p in ("/operators", f"/operators/{name}", f"/operators/{name}/disable",
                                    f"/operators/{name}/password", f"/operators/{name}/tokens/{token_id}/revoke",
                                    "/account")]
    pages += [logged_in["auditor"].get("/account"), form_post(admin, "/operators", name="Bad!", role="auditor")]
    for page in pages:
        assert page.status in (200, 400), page
        parsed = Fields()
        parsed.feed(page.text)
        assert parsed.fields and all(f and f in parsed.labels for f in parsed.fields), (parsed.fields, parsed.labels)
        assert parsed.inline == [], parsed.inline
        assert page.text.count('name="csrf"') == page.text.count("<form method=\"post\"")

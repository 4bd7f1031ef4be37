"""CMMS sync through the admin API against a real server: a bulk upsert (JSON and CSV) with one
result per row, the registry changed exactly as the rows say, and a changes feed whose cursor
walks the audit log without missing or repeating an entry."""
from __future__ import annotations

import json

import pytest

from tests.console.test_console_api import api, post_json, tokens  # noqa: F401


@pytest.fixture(scope="module")
def srv(start_server):
    return start_server("console-sync")


@pytest.fixture(scope="module")
def ca(srv):
    return srv.ca


def test_bulk_upsert_creates_updates_and_reports_each_row(srv, ca, tokens):
    new, old = ca.unique("pump"), ca.unique("pump")
    ca.add_device(old)
    reply = post_json(srv, "/api/v1/bulk/devices", {"devices": [
        {"device_id": new, "model": "infusion-pump", "owner": "icu", "location": "bed 1"},
        {"device_id": old, "model": "infusion-pump", "owner": "icu", "location": "bed 2"},
        {"device_id": old, "model": "infusion-pump", "owner": "icu"},
        {"device_id": "bad id", "model": "x", "owner": "y"},
        {"device_id": ca.unique("pump"), "model": "x", "owner": "y", "colour": "red"},
        {"device_id": ca.unique("pump"), "location": "no model, no owner"},
    ]}, token=tokens["engineer"])
    assert reply.status == 200, reply
    results = reply.json()["results"]
    assert [r["status"] for r in results] == ["created", "updated"] + ["error"] * 4, results
    assert results[0]["token"] and results[1]["changed"] == ["location"]
    assert "twice" in results[2]["message"] and "colour" in results[4]["message"]
    assert "needs model and owner" in results[5]["message"]
    assert reply.json()["counts"] == {"created": 1, "updated": 1, "unchanged": 0, "error": 4}
    # a request of the wrong shape is refused whole: nothing of it applied
    late = ca.unique("pump")
    malformed = post_json(srv, "/api/v1/bulk/devices", {"devices": [
        {"device_id": late, "model": "m", "owner": "o"}, "not an object"]}, token=tokens["engineer"])
    assert malformed.status == 400 and "devices[1]" in malformed.json()["message"], malformed
    assert api(srv, f"/api/v1/devices/{late}", token=tokens["auditor"]).status == 404
    assert ca.device(old)["location"] == "bed 2" and ca.device(new)["location"] == "bed 1"
    # the token of the created row enrolls the device
    issued = srv.enroll(new, results[0]["token"])
    ca.openssl_verify(issued.cert_path)
    again = post_json(srv, "/api/v1/bulk/devices", {"devices": [
        {"device_id": old, "model": "infusion-pump", "owner": "icu", "location": "bed 2"}]}, token=tokens["engineer"])
    assert again.json()["results"][0]["status"] == "unchanged"


def test_bulk_upsert_from_csv_names_lines_and_needs_the_engineer_role(srv, ca, tokens):
    ids = [ca.unique("mon") for _ in range(2)]
    body = f"device_id,model,owner,criticality\n{ids[0]},monitor,ward-3,high\n{ids[1]},monitor,ward-3,extreme\n"
    args = ("-X", "POST", "-H", "Content-Type: text/csv", "--data-binary", body)
    assert api(srv, "/api/v1/bulk/devices", *args, token=tokens["auditor"]).status == 403
    reply = api(srv, "/api/v1/bulk/devices", *args, token=tokens["engineer"])
    assert reply.status == 200, reply
    results = reply.json()["results"]
    assert [(r["line"], r["status"]) for r in results] == [(2, "created"), (3, "error")], results
    assert "criticality" in results[1]["message"]
    assert ca.device(ids[0])["criticality"] == "high"


def test_the_changes_feed_walks_the_audit_log_with_its_cursor(srv, ca, tokens):
    start = api(srv, "/api/v1/changes?limit=500", token=tokens["auditor"]).json()
    cursor = start["next"]
    while start["more"]:
        start = api(srv, f"/api/v1/changes?after={cursor}&limit=500", token=tokens["auditor"]).json()
        cursor = start["next"]
    device = ca.unique("ct")
    token = ca.add_device(device)
    srv.enroll(device, token)
    ca.iomtca("device", "edit", device, "--location", "radiology")
    seen, more = [], True
    while more:   # two at a time: the cursor must neither skip nor repeat
        page = api(srv, f"/api/v1/changes?after={cursor}&limit=2", token=tokens["auditor"]).json()
        seen += page["changes"]
        cursor, more = page["next"], page["more"]
    mine = [(c["action"], c["device_id"]) for c in seen if c["device_id"] == device]
    assert mine == [("device_registered", device), ("token_created", device), ("certificate_issued", device),
                    ("device_edited", device)], mine
    ids = [c["id"] for c in seen]
    assert ids == sorted(set(ids)), ids
    assert api(srv, "/api/v1/changes?after=x", token=tokens["auditor"]).status == 400

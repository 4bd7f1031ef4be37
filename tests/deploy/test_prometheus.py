"""deploy/prometheus/ and deploy/grafana/: the alerting rules, their unit tests, the example
Prometheus configuration, the blackbox module for /readyz and the Grafana dashboard.

Judges: promtool (Debian package prometheus) checks the rules, runs their unit tests
(iomtca-alerts.test.yml: every alert made to fire and not to fire, labels and annotations exact)
and checks the example configuration; prometheus-blackbox-exporter --config.check checks the
probe module when it is installed. promtool cannot know which metrics `iomtca serve` exposes, so
every expression of the rules and of the dashboard is read here with a small PromQL reader and
its metric names are compared with the ones the code defines: the families prometheus-client's
registry holds once ca.metrics and enroll.metrics are imported, plus the gauges of state that
enroll.metrics.state_families builds at scrape time (read from its source: building them needs a
live store). Label names, and the values the alerts depend on (error codes, certificate names,
routes, job names), are checked the same way. What none of this shows: the rules against a
real Prometheus scraping a real server.
"""
from __future__ import annotations

import inspect
import json
import re
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROM = REPO / "deploy" / "prometheus"
ALERTS = PROM / "iomtca-alerts.yml"
ALERT_TESTS = PROM / "iomtca-alerts.test.yml"
EXAMPLE = PROM / "prometheus.example.yml"
BLACKBOX = PROM / "blackbox.example.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "iomtca-dashboard.json"
OPERATIONS = REPO / "docs" / "OPERATIONS.md"
SOURCES = [REPO / d for d in ("ca", "enroll", "common")]

# Series the alerts read that do not come from `iomtca serve`: the scrape's own `up`, and the
# blackbox exporter's probe of /readyz.
SCRAPE_SERIES = {"up", "probe_success"}
TARGET_LABELS = {"job", "instance"}
# a string literal, of PromQL or of Python: "...", '...' or `...`
_STRING = r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`'


def _yaml():
    return pytest.importorskip("yaml", reason="PyYAML is needed to read the rule files (installed with "
                                              "schemathesis, the [test] extra)")


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian package prometheus; the Makefile's deps target installs it)")
    return path


def _run(argv, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=120)


# -- what the code defines -----------------------------------------------------------------------
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
            "gauge": ("",), "summary": ("", "_count", "_sum", "_created")}


def state_gauges() -> dict[str, set[str]]:
    """{name: label names} of the GaugeMetricFamily objects enroll.metrics.state_families builds."""
    source = (REPO / "enroll" / "metrics.py").read_text()
    found = {}
    for m in re.finditer(r'GaugeMetricFamily\(\s*"(\w+)"((?:' + _STRING + r'|[^()"\'`])*)\)', source):
        labels = re.search(r"labels=\[([^\]]*)\]", m.group(2))
        found[m.group(1)] = set(re.findall(r'"(\w+)"', labels.group(1))) if labels else set()
    return found


def code_metrics() -> dict[str, set[str]]:
    """{series name as it appears in PromQL: label names} of everything `iomtca serve` exposes
    under iomtca_ (its own process metrics aside)."""
    import prometheus_client

    import ca.metrics  # noqa: F401 (registers the counters and histograms)
    import enroll.metrics  # noqa: F401 (registers iomtca_request_seconds)

    collectors = [obj for module in (ca.metrics, enroll.metrics) for obj in vars(module).values()
                  if isinstance(obj, prometheus_client.metrics.MetricWrapperBase)]
    labels = {c._name: set(c._labelnames) for c in collectors}
    names: dict[str, set[str]] = {}
    for family in prometheus_client.REGISTRY.collect():
        if family.name.startswith("iomtca_"):
            for suffix in SUFFIXES[family.type]:
                names[family.name + suffix] = labels.get(family.name, set()) | ({"le"} if suffix == "_bucket" else set())
    for name, label_names in state_gauges().items():
        names[name] = label_names
    return names


def test_the_metric_names_are_read_from_the_code():
    """Guards the checks below against passing on an empty list: the metrics docs/METRICS.md
    lists are all found, with their labels, and only under the names PromQL sees."""
    names = code_metrics()
    assert state_gauges().keys() == {"iomtca_devices", "iomtca_certificates", "iomtca_certificates_expiring",
                                     "iomtca_devices_absent", "iomtca_certificate_expiry_seconds"}
    for name, label_names in {
        "iomtca_certificates_issued_total": {"edge", "kind"},
        "iomtca_refusals_total": {"edge", "operation", "code"},
        "iomtca_status_changes_total": {"change", "reason"},
        "iomtca_crls_signed_total": set(), "iomtca_ocsp_signed_total": {"status"},
        "iomtca_ocsp_answers_total": {"path"}, "iomtca_ocsp_cache_entries": set(),
        "iomtca_request_seconds_bucket": {"listener", "route", "le"},
        "iomtca_group_commit_size_bucket": {"le"}, "iomtca_group_commit_seconds_count": set(),
        "iomtca_certificates_expiring": {"within"}, "iomtca_certificate_expiry_seconds": {"certificate"},
    }.items():
        assert names.get(name) == label_names, (name, names.get(name))
    assert "iomtca_certificates_issued" not in names and "iomtca_request_seconds" not in names


# -- a PromQL reader, as far as these expressions need it --------------------------------------
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
            "offset", "inf", "nan"}
_GROUPING = r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)"


def _unquote(literal: str) -> str:
    body = literal[1:-1]
    return body if literal[0] == "`" else re.sub(r"\\(.)", r"\1", body)


def read_promql(expr: str) -> tuple[set[str], list[tuple[str, str, str]], set[str]]:
    """(metric names, label matchers as (label, op, value), label names of by/on/... clauses)."""
    matchers = []
    for selector in re.findall(r"\{((?:" + _STRING + r"|[^{}\"'`])*)\}", expr):
        for label, op, value in re.findall(r"([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*(" + _STRING + ")", selector):
            matchers.append((label, op, _unquote(value)))
    rest = re.sub(_STRING, '""', expr)
    rest = re.sub(r"\{[^{}]*\}", " ", rest)          # label matchers (their strings are blank now)
    rest = re.sub(r"\[[^\[\]]*\]", " ", rest)        # ranges and subqueries: [5m], [$__rate_interval]
    grouping = {label.strip() for _, labels in re.findall(_GROUPING, rest) for label in labels.split(",")
                if label.strip()}
    rest = re.sub(_GROUPING, " ", rest)
    rest = re.sub(r"\$\{?\w+\}?", " ", rest)         # Grafana variables
    names = set()
    for m in re.finditer(r"(?P<num>\d[\w.]*)|(?P<id>[A-Za-z_:][\w:]*)", rest):
        word = m.group("id")
        if word is None or word.lower() in KEYWORDS or re.match(r"\s*\(", rest[m.end():]):
            continue   # a number, a keyword, or a function or aggregation called
        names.add(word)
    return names, matchers, grouping


def test_the_promql_reader():
    names, matchers, grouping = read_promql(
        'sum by (job, instance) (rate(foo_total{a="x{y}", b=~"p|q"}[5m] offset 1d)) / on(job) group_left(z) '
        'bar:ratio > 3 * 86400 and histogram_quantile(0.99, sum without(le) (rate(baz_bucket{c!="1"}[$__rate_interval]))) '
        'or absent(up{job="iomtca"}) unless vector(1e3)')
    assert names == {"foo_total", "bar:ratio", "baz_bucket", "up"}
    assert matchers == [("a", "=", "x{y}"), ("b", "=~", "p|q"), ("c", "!=", "1"), ("job", "=", "iomtca")]
    assert grouping == {"job", "instance", "z", "le"}


# -- the rules -----------------------------------------------------------------------------------
def alert_rules() -> list[dict]:
    rules = [rule for group in _yaml().safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]
    assert rules and all("alert" in rule for rule in rules), "only alerting rules here (no recording rules)"
    return rules


def example_jobs() -> set[str]:
    return {job["job_name"] for job in _yaml().safe_load(EXAMPLE.read_text())["scrape_configs"]}


def test_promtool_checks_the_rules():
    proc = _run([_promtool(), "check", "rules", ALERTS], PROM)
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, proc.stdout + proc.stderr


def test_promtool_runs_the_rule_unit_tests():
    proc = _run([_promtool(), "test", "rules", ALERT_TESTS.name], PROM)
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, proc.stdout + proc.stderr


def test_promtool_unit_tests_can_fail(tmp_path):
    """The judge is not blind: the same tests against rules with one threshold changed fail."""
    promtool = _promtool()
    text = ALERTS.read_text()
    changed = text.replace('iomtca_devices_absent{criticality="high"} > 0', 'iomtca_devices_absent{criticality="high"} > 5')
    assert changed != text
    (tmp_path / ALERTS.name).write_text(changed)
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    proc = _run([promtool, "test", "rules", ALERT_TESTS.name], tmp_path)
    assert proc.returncode != 0 and "alertname: IomtcaHighCriticalityDevicesAbsent" in proc.stdout + proc.stderr, \
        proc.stdout + proc.stderr


def test_every_alert_is_tested_firing_and_not_firing():
    tests = _yaml().safe_load(ALERT_TESTS.read_text())
    assert tests["rule_files"] == [ALERTS.name]
    fired, quiet = set(), set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
            for alert in check.get("exp_alerts") or []:
                assert alert.get("exp_annotations"), f"{check['alertname']}: annotations not checked"
    names = {rule["alert"] for rule in alert_rules()}
    assert names - fired == set(), "never made to fire"
    assert names - quiet == set(), "never shown quiet"


def test_every_alert_says_how_bad_for_how_long_and_what_to_do():
    for rule in alert_rules():
        name = rule["alert"]
        assert re.fullmatch(r"Iomtca[A-Z]\w+", name), name
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{name}: no for: duration"
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        annotations = rule["annotations"]
        assert annotations["summary"].strip() and len(annotations["description"]) > 80, name
        assert annotations["runbook_url"] == f"docs/OPERATIONS.md#{name.lower()}", name


def test_alert_expressions_use_only_metrics_the_server_exposes():
    known = code_metrics()
    label_names = set().union(*known.values()) | TARGET_LABELS
    codes = _error_codes()
    jobs = example_jobs()
    literals = _source_literals()
    for rule in alert_rules():
        names, matchers, grouping = read_promql(rule["expr"])
        assert names, f"{rule['alert']}: no metric found in {rule['expr']!r}"
        assert names - set(known) - SCRAPE_SERIES == set(), f"{rule['alert']}: unknown metrics"
        assert grouping - label_names == set(), f"{rule['alert']}: unknown labels"
        for label, op, value in matchers:
            assert label in label_names, f"{rule['alert']}: unknown label {label}"
            _check_value(rule["alert"], label, op, value, codes, jobs, literals)


def _error_codes() -> set[str]:
    import common.errors as errors
    return {cls.code for _, cls in inspect.getmembers(errors, inspect.isclass) if issubclass(cls, errors.CAError)}


def _source_literals() -> set[str]:
    """Every string literal of the server's Python sources (ca/, enroll/, common/)."""
    literals = set()
    for root in SOURCES:
        for path in root.rglob("*.py"):
            literals.update(_unquote(m) for m in re.findall(r'"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\\\n]|\\.)*\'',
                                                             path.read_text()))
    return literals


def _certificate_names() -> set[str]:
    from ca.config import CAConfig, CAPaths
    from ca.service_certs import directory_status
    # with no CA directory every certificate is "missing", but each is still listed by its name
    return {s.name for s in directory_status(CAPaths(Path("/nonexistent")), CAConfig(), datetime.now(timezone.utc))}


def _check_value(alert: str, label: str, op: str, value: str, codes, jobs, literals) -> None:
    """A value an alert compares a label with is one the code can produce: for a regex, each of
    its plain alternatives (`.*simplereenroll` and the like are not checked)."""
    values = value.split("|") if op in ("=~", "!~") else [value]
    known = {"code": codes, "job": jobs, "certificate": _certificate_names()}.get(label)
    for v in values:
        if not re.fullmatch(r"[\w /.{}-]+", v):
            continue
        if known is not None:
            assert v in known, f"{alert}: {label}={v!r} is not one of {sorted(known)}"
        else:
            assert v in literals, f"{alert}: {label}={v!r} appears nowhere in the server's code"


def test_the_refusal_code_of_a_wrong_token_is_unauthorized():
    """What IomtcaLoginFailuresBurst counts on: a failed token login (NotAcceptedError) carries
    code unauthorized; there is no not_accepted code."""
    from common.errors import NotAcceptedError
    assert NotAcceptedError("test").code == "unauthorized"
    assert "not_accepted" not in _error_codes()


def test_the_long_poll_excluded_from_the_latency_alert_is_a_route():
    latency = next(r for r in alert_rules() if r["alert"] == "IomtcaRequestLatencyHigh")
    routes = {v for label, _, v in read_promql(latency["expr"])[1] if label == "route"}
    assert routes == {"/ra/v1/status-changes"}
    assert re.search(r'add_get\("/ra/v1/status-changes"', (REPO / "enroll" / "ra.py").read_text())


# -- the example configuration and the blackbox module --------------------------------------------
def test_promtool_checks_the_example_configuration():
    proc = _run([_promtool(), "check", "config", EXAMPLE.name], PROM)
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, proc.stdout + proc.stderr
    assert f"{len(alert_rules())} rules found" in proc.stdout, proc.stdout   # it loaded the rule file


def test_the_example_scrapes_the_default_http_listener():
    from enroll.config import EnrollConfig
    listen = EnrollConfig().http_listen
    config = _yaml().safe_load(EXAMPLE.read_text())
    assert config["rule_files"] == [ALERTS.name]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    server = jobs["iomtca"]
    assert server.get("metrics_path", "/metrics") == "/metrics"
    assert server["static_configs"] == [{"targets": [listen]}]
    readyz = jobs["iomtca-readyz"]
    assert readyz["metrics_path"] == "/probe"
    assert readyz["static_configs"] == [{"targets": [f"http://{listen}/readyz"]}]
    modules = _yaml().safe_load(BLACKBOX.read_text())["modules"]
    assert readyz["params"]["module"] == ["iomtca_readyz"] and "iomtca_readyz" in modules
    assert modules["iomtca_readyz"]["http"]["valid_status_codes"] == [200]   # /readyz: 503 when not ready


def test_blackbox_exporter_accepts_the_module():
    exporter = shutil.which("prometheus-blackbox-exporter") or shutil.which("blackbox_exporter")
    if exporter is None:
        pytest.skip("prometheus-blackbox-exporter not installed (Debian package prometheus-blackbox-exporter)")
    proc = _run([exporter, f"--config.file={BLACKBOX}", "--config.check"], PROM)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "deprecated" not in proc.stderr, proc.stderr


# -- the dashboard -------------------------------------------------------------------------------
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict) -> list[dict]:
    out = []
    for panel in board["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))   # panels of a collapsed row
    return out


def dashboard_exprs(board: dict) -> list[tuple[str, str]]:
    exprs = [(p["title"], t["expr"]) for p in panels(board) for t in p.get("targets", [])]
    for var in board.get("templating", {}).get("list", []):
        query = var.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        if var.get("type") == "query" and query:
            m = re.fullmatch(r"\s*label_values\((?:(.+),\s*)?(\w+)\)\s*", query)
            assert m, f"variable {var['name']}: unexpected query {query!r}"
            if m.group(1):
                exprs.append((f"variable {var['name']}", m.group(1)))
    return exprs


def test_the_dashboard_is_importable():
    board = dashboard()
    assert 36 <= board["schemaVersion"] <= 41
    assert [i["name"] for i in board["__inputs"]] == ["DS_PROMETHEUS"]
    assert board["__inputs"][0]["pluginId"] == "prometheus"
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    boxes = []
    for panel in panels(board):
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
        for other, o in boxes:
            overlap = g["x"] < o["x"] + o["w"] and o["x"] < g["x"] + g["w"] and \
                g["y"] < o["y"] + o["h"] and o["y"] < g["y"] + g["h"]
            assert not overlap, f"{panel['title']!r} overlaps {other!r}"
        boxes.append((panel["title"], g))
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}" and target["refId"], panel["title"]


def test_dashboard_expressions_use_only_metrics_the_server_exposes():
    known = code_metrics()
    label_names = set().union(*known.values()) | TARGET_LABELS
    literals, codes, jobs = _source_literals(), _error_codes(), example_jobs()
    used = set()
    for title, expr in dashboard_exprs(dashboard()):
        names, matchers, grouping = read_promql(expr)
        assert names, f"{title}: no metric found in {expr!r}"
        assert names - set(known) == set(), f"{title}: unknown metrics in {expr!r}"
        assert grouping - label_names == set(), f"{title}: unknown labels in {expr!r}"
        for label, op, value in matchers:
            assert label in label_names, f"{title}: unknown label {label}"
            if label != "instance":
                _check_value(title, label, op, value, codes, jobs, literals)
        used |= names
    # every metric the server exposes is on the dashboard somewhere
    families = {re.sub(r"_(total|bucket|count|sum|created)$", "", n) for n in known}
    shown = {re.sub(r"_(total|bucket|count|sum|created)$", "", n) for n in used}
    assert families - shown == set(), "metrics the dashboard does not show"


def test_the_dashboard_has_the_panels_operations_asked_for():
    titles = " | ".join(p["title"].lower() for p in panels(dashboard()))
    for words in ("devices by status", "certificates by status", "expiring", "issuance rate by kind and edge",
                  "refusals by code", "revocations by reason", "ocsp answers by path", "cache hit ratio",
                  "p50 and p99 by route", "group commit size", "group commit time", "certificate expiry (days)",
                  "absent devices by criticality"):
        assert words in titles, words


# -- the runbook anchors ---------------------------------------------------------------------
def github_anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_links_a_section_of_operations_md():
    text = OPERATIONS.read_text()
    m = re.search(r"^## Alerts[ \t]*\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if m is None:
        pytest.skip("docs/OPERATIONS.md has no '## Alerts' section yet (its '### AlertName' subsections are "
                    "the runbook_url anchors of deploy/prometheus/iomtca-alerts.yml)")
    anchors = {github_anchor(h) for h in re.findall(r"^### (.+)$", m.group(1), re.M)}
    for rule in alert_rules():
        anchor = rule["annotations"]["runbook_url"].partition("#")[2]
        assert anchor in anchors, f"{rule['alert']}: no '### {rule['alert']}' under '## Alerts' in docs/OPERATIONS.md"

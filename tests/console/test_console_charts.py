"""The overview's charts are numbers, not decoration: the bars and the words of each SVG say what
was put in, buckets fall where their times do, and the page carries both charts."""
from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

from console import charts

NOW = datetime(2026, 12, 1, 13, 30, tzinfo=timezone.utc)


def bar_titles(svg: str) -> list[str]:
    return re.findall(r"<rect [^>]*><title>([^<]+)</title></rect>", svg)


def test_expiries_fall_on_their_day_and_the_description_says_so():
    times = [NOW + timedelta(hours=1), NOW + timedelta(hours=2), NOW + timedelta(days=3), NOW + timedelta(days=20),
             NOW - timedelta(days=1)]   # past and beyond 14 days: not drawn
    svg = str(charts.expiry_chart(times, NOW))
    assert bar_titles(svg) == ["expiring: 2", "expiring: 1"]
    assert "12-01: 2, 12-04: 1" in svg and "expiring (3)" in svg
    assert svg.startswith("<svg") and 'role="img"' in svg and "<script" not in svg and "style=" not in svg


def test_activity_stacks_enrollments_and_renewals_per_hour():
    enrolled = [NOW - timedelta(minutes=5), NOW - timedelta(minutes=10), NOW - timedelta(days=8)]
    renewed = [NOW - timedelta(minutes=20), NOW - timedelta(hours=30)]
    svg = str(charts.activity_chart(enrolled, renewed, NOW))
    assert sorted(bar_titles(svg)) == ["enrolled: 2", "renewed: 1", "renewed: 1"]
    assert "2 first enrollments and 1 renewals" not in svg   # the 8-day-old one is outside
    assert "2 first enrollments and 2 renewals" in svg and "busiest hour 3 certificates" in svg


def test_per_bucket_counts_only_inside_the_window():
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert charts.per_bucket([start, start + timedelta(seconds=59), start + timedelta(minutes=1),
                              start - timedelta(seconds=1), start + timedelta(minutes=3)],
                             start, timedelta(minutes=1), 3) == [2, 1, 0]


def test_labels_are_escaped():
    svg = str(charts.bars("a<b", "x&y", [charts.Series("<s>", [1])], [(0, "<l>")], "t"))
    assert "<b" not in svg.replace("<svg", "").split("</title>")[0] and "a&lt;b" in svg and "&lt;l&gt;" in svg


def test_the_certificate_timeline_draws_each_certificate_in_its_status_colour():
    certs = [{"serial": "aa" * 20, "status": "revoked", "not_before": "2026-11-20T00:00:00Z", "not_after": "2026-11-23T00:00:00Z"},
             {"serial": "bb" * 20, "status": "good", "not_before": "2026-11-30T00:00:00Z", "not_after": "2026-12-03T00:00:00Z"}]
    svg = str(charts.certificate_timeline(certs, NOW))
    bars = re.findall(r'<rect x="([\d.]+)" y="\d+" width="([\d.]+)" height="\d+" fill="(#\w+)"', svg)
    assert [b[2] for b in bars] == [charts.STATUS_COLORS["revoked"], charts.STATUS_COLORS["good"]]
    assert float(bars[0][0]) < float(bars[1][0])   # older first, further left
    now_x = float(re.search(r'<line x1="([\d.]+)"', svg).group(1))
    assert float(bars[1][0]) < now_x < float(bars[1][0]) + float(bars[1][1])   # now falls inside the good one
    assert str(charts.certificate_timeline([], NOW)) == ""

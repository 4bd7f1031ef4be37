"""The overview's two charts, drawn on the server as inline SVG (no script, nothing fetched: the
CSP allows neither): certificate expiries per day over the next 14 days, and enrollments and
renewals per hour over the last 7 days. Each chart has a <title> and a <desc> that says its
numbers in words, for screen readers and for anyone who prints the page."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from html import escape

from markupsafe import Markup

WIDTH, HEIGHT, PAD = 720, 180, 28
COLORS = {"expiring": "#0b6e99", "enrolled": "#0a6b2e", "renewed": "#c77700"}


@dataclass(frozen=True)
class Series:
    name: str
    counts: list[int]


def per_bucket(times: Iterable[datetime] | Mapping[datetime, int], start: datetime, step: timedelta,
               buckets: int) -> list[int]:
    """Counts per bucket of moments, or of {moment: how many} (counted by the store already)."""
    counts = [0] * buckets
    weighted = times.items() if isinstance(times, Mapping) else ((t, 1) for t in times)
    for t, n in weighted:
        index = (t - start) // step   # floor: a moment before `start` is bucket -1, not 0
        if 0 <= index < buckets:
            counts[index] += n
    return counts


def bars(title: str, desc: str, series: list[Series], labels: list[tuple[int, str]], chart_id: str) -> Markup:
    """Stacked bars, one per bucket; `labels`: (bucket index, text) under the axis."""
    buckets = len(series[0].counts)
    totals = [sum(s.counts[i] for s in series) for i in range(buckets)]
    top = max(totals + [1])
    plot_w, plot_h = WIDTH - 2 * PAD, HEIGHT - 2 * PAD
    bar_w = plot_w / buckets
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" '
             f'width="{WIDTH}" height="{HEIGHT}" aria-labelledby="{chart_id}-t {chart_id}-d" class="chart">',
             f'<title id="{chart_id}-t">{escape(title)}</title><desc id="{chart_id}-d">{escape(desc)}</desc>',
             f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}" stroke="#555"/>',
             f'<text x="{PAD - 4}" y="{PAD + 4}" text-anchor="end" font-size="10">{top}</text>',
             f'<text x="{PAD - 4}" y="{HEIGHT - PAD}" text-anchor="end" font-size="10">0</text>']
    for i in range(buckets):
        y = HEIGHT - PAD
        for s in series:
            n = s.counts[i]
            if not n:
                continue
            h = plot_h * n / top
            y -= h
            parts.append(f'<rect x="{PAD + i * bar_w:.2f}" y="{y:.2f}" width="{max(bar_w - 1, 0.5):.2f}" '
                         f'height="{h:.2f}" fill="{COLORS.get(s.name, "#666")}"><title>{escape(s.name)}: {n}</title></rect>')
    for i, text in labels:
        parts.append(f'<text x="{PAD + (i + 0.5) * bar_w:.2f}" y="{HEIGHT - PAD + 14}" text-anchor="middle" '
                     f'font-size="10">{escape(text)}</text>')
    for k, s in enumerate(series):
        x = WIDTH - PAD - 110 * (len(series) - k)
        parts.append(f'<rect x="{x}" y="6" width="10" height="10" fill="{COLORS.get(s.name, "#666")}"/>'
                     f'<text x="{x + 14}" y="15" font-size="11">{escape(s.name)} ({sum(s.counts)})</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def expiry_chart(not_afters: Iterable[datetime], now: datetime, days: int = 14) -> Markup:
    start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    counts = per_bucket(not_afters, start, timedelta(days=1), days)
    words = ", ".join(f"{(start + timedelta(days=i)):%m-%d}: {n}" for i, n in enumerate(counts) if n) or "none"
    labels = [(i, f"{start + timedelta(days=i):%m-%d}") for i in range(0, days, 2)]
    return bars(f"Certificate expiries per day, next {days} days", f"Current device certificates expiring: {words}.",
                [Series("expiring", counts)], labels, "expiries")


def activity_chart(enrolled: Iterable[datetime], renewed: Iterable[datetime], now: datetime,
                   hours: int = 7 * 24) -> Markup:
    end = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    start = end - timedelta(hours=hours)
    first = per_bucket(enrolled, start, timedelta(hours=1), hours)
    again = per_bucket(renewed, start, timedelta(hours=1), hours)
    labels = [(i, f"{start + timedelta(hours=i):%m-%d}") for i in range(0, hours, 24)]
    desc = (f"Over the last {hours // 24} days: {sum(first)} first enrollments and {sum(again)} renewals; "
            f"busiest hour {max((a + b for a, b in zip(first, again)), default=0)} certificates.")
    return bars("Enrollments and renewals per hour, last 7 days", desc,
                [Series("enrolled", first), Series("renewed", again)], labels, "activity")


STATUS_COLORS = {"good": "#0a6b2e", "hold": "#c77700", "revoked": "#a40000"}


def certificate_timeline(certs: list[dict], now: datetime) -> Markup:
    """A device's certificates as bars from notBefore to notAfter on one time axis, coloured by
    status, with a line at now (`certs`: ca/views.py cert_json dicts)."""
    from ca.timefmt import from_rfc3339

    spans = [(c, from_rfc3339(c["not_before"]), from_rfc3339(c["not_after"])) for c in certs]
    if not spans:
        return Markup("")
    start, end = min(s for _, s, _ in spans + [(None, now, now)]), max(e for _, _, e in spans + [(None, now, now)])
    total = max((end - start).total_seconds(), 1.0)
    row_h, width = 18, WIDTH - 2 * PAD
    height = PAD + row_h * len(spans) + 20

    def x(t: datetime) -> float:
        return PAD + width * (t - start).total_seconds() / total

    desc = "; ".join(f"{c['serial'][:12]} {c['status']} {c['not_before']} to {c['not_after']}" for c, _, _ in spans)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" role="img" viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" '
             f'height="{height}" aria-labelledby="timeline-t timeline-d" class="chart">',
             '<title id="timeline-t">Certificate timeline</title>', f'<desc id="timeline-d">{escape(desc)}</desc>']
    for i, (c, s, e) in enumerate(spans):
        y = PAD + i * row_h
        parts.append(f'<rect x="{x(s):.2f}" y="{y}" width="{max(x(e) - x(s), 1):.2f}" height="{row_h - 4}" '
                     f'fill="{STATUS_COLORS.get(c["status"], "#666")}"><title>{escape(c["serial"])}: '
                     f'{escape(c["status"])}</title></rect>')
    parts.append(f'<line x1="{x(now):.2f}" y1="{PAD - 6}" x2="{x(now):.2f}" y2="{height - 16}" stroke="#000" '
                 'stroke-dasharray="3 2"/>')
    parts.append(f'<text x="{x(now):.2f}" y="{PAD - 10}" text-anchor="middle" font-size="10">now</text>')
    parts.append(f'<text x="{PAD}" y="{height - 4}" font-size="10">{start:%Y-%m-%d}</text>'
                 f'<text x="{WIDTH - PAD}" y="{height - 4}" text-anchor="end" font-size="10">{end:%Y-%m-%d}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))

"""The response-time report as one self-contained HTML page with SVG charts."""

from __future__ import annotations

import html
from datetime import datetime

from relay.archive.report import BUCKETS, SellerResponse, all_sellers, format_duration, format_share, readable

# Colours: answered in time, answered late, waiting (not yet / over 24 h).
_GREEN, _RED, _GREY, _DARK_GREY = "#2e7d32", "#c62828", "#bdbdbd", "#616161"


def svg_chart(seller: SellerResponse) -> str:
    """A bar chart of the seller's response times by bucket (green within
    24 hours, red later), then the messages still waiting (light grey: for
    less than 24 hours, dark grey: overdue), with a dashed line at 24 hours
    and a legend. Static SVG: no script, no external reference, every text
    escaped."""
    overdue = seller.overdue
    bars = [(label, count, _GREEN if index < 4 else _RED)
            for index, (label, count) in enumerate(seller.histogram())]
    bars += [("waiting", len(seller.waiting) - overdue, _GREY), ("overdue", overdue, _DARK_GREY)]
    width, height = 640, 290
    left, right, top, bottom = 48, 16, 50, 66
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max([count for _, count, _ in bars] + [1])
    step = _nice_step(peak)
    scale_max = step * (peak // step + 1)  # headroom for the count above the tallest bar
    slot = plot_w / len(bars)
    bar_w = slot * 0.7
    base = top + plot_h
    title = (f"{seller.seller}: {format_share(seller.share_within)} answered within 24 h "
             f"({seller.answered_within} of {seller.due})")
    e = html.escape
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{e(title)}" '
           'font-family="sans-serif" font-size="12">',
           f"<title>{e(title)}</title>",
           f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
           f'<text x="{left}" y="20" font-size="14" font-weight="bold">{e(title)}</text>']
    tick = 0
    while tick <= scale_max:
        y = base - plot_h * tick / scale_max
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" stroke="#eeeeee"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#555555">{tick}</text>')
        tick += step
    for index, (label, count, colour) in enumerate(bars):
        x = left + slot * index + (slot - bar_w) / 2
        bar_h = plot_h * count / scale_max
        out.append(f'<rect x="{x:.1f}" y="{base - bar_h:.1f}" width="{bar_w:.1f}" height="{bar_h:.1f}" '
                   f'fill="{colour}"><title>{e(label)}: {count}</title></rect>')
        if count:
            out.append(f'<text x="{x + bar_w / 2:.1f}" y="{base - bar_h - 4:.1f}" text-anchor="middle">{count}</text>')
        out.append(f'<text x="{x + bar_w / 2:.1f}" y="{base + 16:.1f}" text-anchor="middle" '
                   f'fill="#333333">{e(label)}</text>')
    out.append(f'<line x1="{left}" y1="{base}" x2="{width - right}" y2="{base}" stroke="#333333"/>')
    # The 24-hour line: between the last bucket within 24 h and the first
    # later one; and between the answered and the waiting.
    for boundary, text in ((4, "24 h"), (7, "")):
        line_x = left + slot * boundary
        out.append(f'<line x1="{line_x:.1f}" y1="{top - 12}" x2="{line_x:.1f}" y2="{base}" '
                   f'stroke="{"#000000" if text else "#9e9e9e"}" stroke-dasharray="4 3"/>')
        if text:
            out.append(f'<text x="{line_x:.1f}" y="{top - 16}" text-anchor="middle">{text}</text>')
    x = left
    legend_y = height - 14
    for colour, text in ((_GREEN, "answered within 24 h"), (_RED, "answered later"),
                         (_GREY, "waiting"), (_DARK_GREY, "waiting over 24 h")):
        out.append(f'<rect x="{x}" y="{legend_y - 10}" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{x + 14}" y="{legend_y}" fill="#333333">{text}</text>')
        x += 14 + 7 * len(text) + 18
    out.append(f'<text x="{left + plot_w / 2:.1f}" y="{base + 34:.1f}" text-anchor="middle" fill="#555555">'
               "time from the buyer's message to the seller's answer</text>")
    out.append("</svg>")
    return "\n".join(out)


def _share_bar(seller: SellerResponse) -> str:
    """A seller's due messages as one small stacked bar (CSS, no image):
    green within 24 h, red later, dark grey still waiting past 24 h."""
    if not seller.due:
        return '<span class="bar" role="img" aria-label="nothing due"></span>'
    spans = "".join(f'<span style="width:{100 * count / seller.due:.1f}%;background:{colour}"></span>'
                    for count, colour in ((seller.answered_within, _GREEN), (seller.answered_late, _RED),
                                          (seller.overdue, _DARK_GREY)) if count)
    return (f'<span class="bar" role="img" aria-label="{format_share(seller.share_within)} within 24 h">'
            f"{spans}</span>")


def _nice_step(peak: int) -> int:
    for step in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000):
        if peak / step <= 6:
            return step
    return 10 ** len(str(peak))


def render_html(sellers: list[SellerResponse], now: datetime, since: str | None) -> str:
    """One self-contained page: a summary, one chart of every seller's
    answers together, a table with a row and a small bar per seller, and
    the waiting messages. Its size grows by one table row per seller, not
    by a chart each (5,000 sellers stay a page a browser opens). No
    JavaScript (and a Content-Security-Policy that forbids it), no external
    resources, so it opens from a file or an attachment."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
        "img-src data:\">",
        "<title>Seller response times</title>",
        "<style>body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse}"
        "td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}td:first-child,th:first-child"
        "{text-align:left}section{margin:2em 0}.late{color:#c62828}.muted{color:#777}"
        ".bar{display:inline-flex;width:120px;height:10px;background:#f5f5f5;vertical-align:middle}"
        ".bar span{display:block;height:10px}</style>",
        "</head><body>",
        "<h1>Seller response times</h1>",
        f'<p class="muted">As of {e(readable(now))}' + (f"; buyer messages since {e(since)}" if since else "")
        + ". A buyer message is answered by the seller's next message in the same conversation; "
          "auto-replies neither count nor answer, and a message that bounced (it never reached the "
          "seller) does not wait. Within 24 h means at most 24 hours.</p>",
    ]
    if not sellers:
        parts.append("<p>No buyer messages.</p>")
    else:
        total = all_sellers(sellers)
        parts.append(f"<section><h2>All {len(sellers)} seller(s)</h2>")
        parts.append(f"<p>{total.answered_within} of {total.due} buyer messages answered within 24 h "
                     f"({e(format_share(total.share_within))}); median {e(format_duration(total.median_seconds))}, "
                     f"90th percentile {e(format_duration(total.p90_seconds))}; {len(total.waiting)} waiting, "
                     f"{total.overdue} of them over 24 h; {total.bounced} bounced.</p>")
        parts.append(svg_chart(total))
        parts.append("</section>")
        parts.append("<table><tr><th>seller</th><th>answered within 24 h</th><th></th><th>median</th>"
                     "<th>90th percentile</th><th>waiting</th><th>overdue</th><th>bounced</th></tr>")
        for s in sellers:
            label = s.seller + (f" ({s.name})" if s.name else "")
            parts.append(f"<tr><td>{e(label)}</td><td>{s.answered_within} of {s.due} "
                         f"({e(format_share(s.share_within))})</td><td>{_share_bar(s)}</td>"
                         f"<td>{e(format_duration(s.median_seconds))}</td>"
                         f"<td>{e(format_duration(s.p90_seconds))}</td><td>{len(s.waiting)}</td>"
                         f"<td>{s.overdue}</td><td>{s.bounced}</td></tr>")
        parts.append("</table>")
    waiting = sorted(((s, w) for s in sellers for w in s.waiting), key=lambda sw: (sw[1].received_at, sw[1].archive_id))
    if waiting:
        parts.append("<section><h2>Waiting for an answer, oldest first</h2>")
        parts.append("<table><tr><th>seller</th><th>archive id</th><th>relationship</th><th>received</th>"
                     "<th>waiting for</th></tr>")
        for s, w in waiting:
            row_class = ' class="late"' if w.overdue else ""
            parts.append(f"<tr{row_class}><td>{e(s.seller)}</td><td>{w.archive_id}</td>"
                         f"<td>{w.relationship_id}</td><td>{e(readable(w.received_at))}</td>"
                         f"<td>{e(format_duration(w.waiting_seconds))}</td></tr>")
        parts.append("</table></section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"

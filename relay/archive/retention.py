"""Retention: which rows are past it, and the one line a purge run is told in."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from relay.archive.times import iso

if TYPE_CHECKING:  # the store's result type; the store imports this package, not back
    from relay.store import PurgeCounts


def retention_cutoff(now: datetime, retention_days: int) -> str:
    """Rows received before the returned moment are past retention."""
    return iso(now - timedelta(days=retention_days))


def purge_summary(counts: PurgeCounts) -> str:
    """One line for the CLI and the server's log."""
    verb = "would purge" if counts.dry_run else "purged"
    bounces = f", {counts.bounces} delivery reports" if counts.bounces else ""
    line = (f"{verb} {counts.rows} archive row(s) received before {counts.before}"
            f" ({format_bytes(counts.bytes)} of message bodies, {counts.message_ids} Message-ID map entries"
            f"{bounces})")
    if counts.held:
        line += f"; {counts.held} row(s) kept on hold"
    if counts.damaged:
        line += f"; {counts.damaged} row(s) kept because they fail their hashes (run `relay archive verify`)"
    return line


def format_bytes(count: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"  # pragma: no cover

"""The response-time report: how long each seller takes to answer buyers,
from the archive's delivered messages, as JSON or text (chart.py draws it)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Iterable

from relay.archive.times import iso

ANSWER_WITHIN = timedelta(hours=24)
# Histogram buckets (upper bound inclusive, seconds); None is "longer".
BUCKETS = (
    ("≤ 1 h", 3600), ("1–4 h", 4 * 3600), ("4–12 h", 12 * 3600), ("12–24 h", 24 * 3600),
    ("24–48 h", 48 * 3600), ("2–7 d", 7 * 86400), ("> 7 d", None),
)


@dataclass(frozen=True)
class MessageFact:
    """What the report needs of one delivered archive row."""

    archive_id: int
    relationship_id: int
    seller: str
    direction: str
    received_at: datetime
    auto_reply: bool = False
    bounced: bool = False  # a delivery report said it failed: it never reached the other side


@dataclass(frozen=True)
class Waiting:
    archive_id: int
    relationship_id: int
    received_at: datetime
    waiting_seconds: float
    overdue: bool  # waiting longer than 24 hours


@dataclass
class SellerResponse:
    seller: str
    name: str = ""
    buyer_messages: int = 0
    answered_within: int = 0  # within 24 hours
    answered_late: int = 0
    response_seconds: list[float] = field(default_factory=list)
    waiting: list[Waiting] = field(default_factory=list)
    bounced: int = 0  # buyer messages that bounced: never in the seller's inbox, so never waiting

    @property
    def overdue(self) -> int:
        return sum(1 for w in self.waiting if w.overdue)

    @property
    def due(self) -> int:
        """Buyer messages that have had their 24 hours: the share's denominator."""
        return self.answered_within + self.answered_late + self.overdue

    @property
    def share_within(self) -> float | None:
        return self.answered_within / self.due if self.due else None

    @property
    def median_seconds(self) -> float | None:
        return percentile(self.response_seconds, 0.5)

    @property
    def p90_seconds(self) -> float | None:
        return percentile(self.response_seconds, 0.9)

    def histogram(self) -> list[tuple[str, int]]:
        counts = [0] * len(BUCKETS)
        for seconds in self.response_seconds:
            counts[bucket_index(seconds)] += 1
        return [(label, count) for (label, _), count in zip(BUCKETS, counts)]

    def to_json(self) -> dict:
        return {
            "seller": self.seller,
            "seller_name": self.name,
            "buyer_messages": self.buyer_messages,
            "answered_within_24h": self.answered_within,
            "answered_later": self.answered_late,
            "overdue": self.overdue,
            "waiting": len(self.waiting),
            "due": self.due,
            "bounced": self.bounced,
            "share_within_24h": None if self.share_within is None else round(self.share_within, 4),
            "median_seconds": _round(self.median_seconds),
            "p90_seconds": _round(self.p90_seconds),
            "histogram": [{"bucket": label, "count": count} for label, count in self.histogram()],
            "waiting_messages": [
                {"archive_id": w.archive_id, "relationship": w.relationship_id, "received_at": iso(w.received_at),
                 "waiting_seconds": _round(w.waiting_seconds), "overdue": w.overdue}
                for w in self.waiting
            ],
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def bucket_index(seconds: float) -> int:
    for index, (_, bound) in enumerate(BUCKETS):
        if bound is None or seconds <= bound:
            return index
    return len(BUCKETS) - 1  # pragma: no cover


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default): the
    median of [1, 2, 3, 4] is 2.5; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def response_times(facts: Iterable[MessageFact], now: datetime, since: datetime | None = None,
                   names: dict[str, str] | None = None, sellers: Iterable[str] = ()) -> list[SellerResponse]:
    """Per seller: which buyer messages were answered, how fast, and which wait.

    A buyer message (not an auto-reply, received at or after `since`) is
    answered by the first later seller message in the same relationship
    that is not an auto-reply; every buyer message waiting at that moment
    is answered by it. Within 24 hours means at most 24 hours. Facts after
    `now` are ignored. `sellers` are reported even with no messages.
    """
    names = names or {}
    report: dict[str, SellerResponse] = {s: SellerResponse(s, names.get(s, "")) for s in sellers}
    by_relationship: dict[int, list[MessageFact]] = {}
    for fact in facts:
        if fact.received_at <= now:
            by_relationship.setdefault(fact.relationship_id, []).append(fact)
    for relationship_id, items in by_relationship.items():
        items.sort(key=lambda f: (f.received_at, f.archive_id))
        pending: list[MessageFact] = []
        for fact in items:
            if fact.auto_reply:
                continue
            if fact.direction == "buyer_to_seller":
                if since is not None and fact.received_at < since:
                    continue
                if fact.bounced:
                    # The seller's mailbox refused it: nothing to answer, and
                    # the buyer was told by the bounce notice.
                    _seller(report, fact.seller, names).bounced += 1
                else:
                    pending.append(fact)
            elif fact.direction == "seller_to_buyer" and pending:
                seller = _seller(report, fact.seller, names)
                for asked in pending:
                    elapsed = (fact.received_at - asked.received_at).total_seconds()
                    seller.buyer_messages += 1
                    seller.response_seconds.append(elapsed)
                    if elapsed <= ANSWER_WITHIN.total_seconds():
                        seller.answered_within += 1
                    else:
                        seller.answered_late += 1
                pending = []
        for asked in pending:
            seller = _seller(report, asked.seller, names)
            waited = (now - asked.received_at).total_seconds()
            seller.buyer_messages += 1
            seller.waiting.append(Waiting(asked.archive_id, relationship_id, asked.received_at, waited,
                                          waited > ANSWER_WITHIN.total_seconds()))
    for seller in report.values():
        seller.waiting.sort(key=lambda w: (w.received_at, w.archive_id))
    return sorted(report.values(), key=lambda s: natural_key(s.seller))


def natural_key(text: str) -> list:
    """Sorts `seller2` before `seller10`: digit runs compare as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part.lower())
            for part in re.split(r"(\d+)", text) if part]


def readable(moment: datetime) -> str:
    """A time for a person: `2026-03-02 09:00 UTC` (the JSON keeps ISO 8601)."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def all_sellers(sellers: list[SellerResponse]) -> SellerResponse:
    """Every seller's answers and waiting messages as one, for the chart."""
    total = SellerResponse("all sellers")
    for s in sellers:
        total.buyer_messages += s.buyer_messages
        total.answered_within += s.answered_within
        total.answered_late += s.answered_late
        total.bounced += s.bounced
        total.response_seconds += s.response_seconds
        total.waiting += s.waiting
    return total


def _seller(report: dict[str, SellerResponse], address: str, names: dict[str, str]) -> SellerResponse:
    if address not in report:
        report[address] = SellerResponse(address, names.get(address, ""))
    return report[address]


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def format_share(share: float | None) -> str:
    return "–" if share is None else f"{share * 100:.1f}%"


def report_json(sellers: list[SellerResponse], now: datetime, since: str | None) -> dict:
    return {"as_of": iso(now), "since": since, "answer_within_hours": 24,
            "sellers": [seller.to_json() for seller in sellers]}


def render_text(sellers: list[SellerResponse], now: datetime, since: str | None) -> str:
    lines = [f"Response times as of {readable(now)}" + (f", buyer messages since {since}" if since else "")
             + ": share of buyer messages answered within 24 h"]
    if not sellers:
        lines.append("no buyer messages")
        return "\n".join(lines) + "\n"
    width = max(len("seller"), *(len(s.seller) for s in sellers))
    lines.append(f"{'seller':<{width}}  {'within 24 h':>17}  {'median':>12}  {'90th pct':>12}  {'waiting':>7}"
                 "  overdue  bounced")
    for s in sellers:
        within = f"{s.answered_within}/{s.due} {format_share(s.share_within):>6}"
        lines.append(f"{s.seller:<{width}}  {within:>17}  {format_duration(s.median_seconds):>12}"
                     f"  {format_duration(s.p90_seconds):>12}  {len(s.waiting):>7}  {s.overdue:>7}  {s.bounced}")
    for s in sellers:
        for w in s.waiting:
            lines.append(f"  waiting: {s.seller} archive {w.archive_id} (relationship {w.relationship_id}),"
                         f" received {readable(w.received_at)}, for {format_duration(w.waiting_seconds)}"
                         + (" OVERDUE" if w.overdue else ""))
    return "\n".join(lines) + "\n"

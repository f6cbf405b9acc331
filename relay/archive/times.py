"""The store's one timestamp format (UTC text with microseconds and 'Z',
so that comparing strings compares times) and an operator's dates read into it."""

from __future__ import annotations

import re
from datetime import date, datetime, time, timedelta, timezone


def iso(moment: datetime) -> str:
    """The one timestamp format of the store: UTC, microseconds, 'Z'. Stored
    as text, so that comparing strings compares times."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def utc_now() -> str:
    return iso(datetime.now(timezone.utc))


def parse_when(value: str, end_of_day: bool = False) -> str:
    """An operator's date or date-time as the store's timestamp text.

    Without a zone it is UTC. A bare date means its start, or with
    `end_of_day` the start of the next day (so `--until 2026-11-27` takes in
    all of the 27th). Raises ValueError with a text fit for the operator.
    """
    text = value.strip()
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        day = date.fromisoformat(text)
        moment = datetime.combine(day, time(), tzinfo=timezone.utc)
        if end_of_day:
            moment += timedelta(days=1)
        return iso(moment)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"not an ISO 8601 date or time: {value!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return iso(moment)


def parse_iso(stamp: str) -> datetime:
    """The store's timestamp text as an aware datetime."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))

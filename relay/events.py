"""The marketplace's events: what each says, its body, its signature, when
to try again. Pure functions; the store writes events (relay/store/) and
relay/webhooks.py sends them.

An event is one fact the relay committed: a message delivered
(``message.delivered``), a message refused for good (``message.refused``:
the relay's policy said 5xx, or the upstream did), a delivery report that
came back for a delivered message (``message.bounced``). A deferred
message (4xx) is no event: its client tries again, and that try is.

The body is JSON::

    {"id": 17, "type": "message.delivered", "created_at": "2026-12-07T…Z",
     "data": {"archive_id": 42, "relationship": 7, …}}

and the POST carries ``Relay-Timestamp`` (Unix seconds) and
``Relay-Signature: v1=<hex>``, the HMAC-SHA256 under the shared secret of
``<timestamp>.<body>``. The timestamp is signed with the body so a
receiver can refuse an old body replayed (`verify`'s tolerance). Events
are sent at least once: a receiver that answered 2xx after the relay gave
up waiting gets the same `id` again, and must treat it as seen.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import datetime, timedelta

from relay.config import WEBHOOK_EVENTS

DELIVERED, REFUSED, BOUNCED = WEBHOOK_EVENTS

SIGNATURE_VERSION = "v1"
# A receiver's default: refuse a body signed more than this long ago (or ahead).
TOLERANCE_SECONDS = 300


def for_verdict(verdict: str) -> str | None:
    """The event an archived message of `verdict` makes, or None (deferred:
    the client tries again)."""
    if verdict == "delivered":
        return DELIVERED
    if verdict in ("rejected", "failed"):
        return REFUSED
    return None


def message_data(archive_id: int, metadata: dict) -> dict:
    """A message event's `data`, in the names of `relay archive show --json`
    (docs/cli.md), from the archive row's metadata. Aliases and ids only:
    the parties' addresses are the marketplace's own records already."""
    return {
        "archive_id": archive_id,
        "received_at": metadata["received_at"],
        "relationship": metadata["relationship_id"],
        "direction": metadata["direction"],
        "verdict": metadata["verdict"],
        "reply": metadata["reply"],
        "changes": list(metadata["changes"]),
    }


def bounce_data(bounce_id: int, archive_id: int | None, relationship_id: int | None, received_at: str,
                action: str, status: str, detector: str, notified: bool) -> dict:
    """A ``message.bounced`` event's `data`, in the names of `relay archive
    show --json`'s `bounces[]`, with the message it is about."""
    return {
        "bounce_id": bounce_id,
        "archive_id": archive_id,
        "relationship": relationship_id,
        "received_at": received_at,
        "action": action,
        "status": status,
        "detector": detector,
        "notified": notified,
    }


def body(event_id: int, event: str, created_at: str, data: str) -> bytes:
    """The bytes POSTed for a stored event (`data` as stored: JSON text).
    The same every time for the same row."""
    document = {"id": event_id, "type": event, "created_at": created_at, "data": json.loads(data)}
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def signature(secret: bytes, timestamp: int, payload: bytes) -> str:
    """The ``Relay-Signature`` value of `payload` sent at `timestamp`."""
    mac = hmac.new(secret, str(timestamp).encode("ascii") + b"." + payload, hashlib.sha256)
    return f"{SIGNATURE_VERSION}={mac.hexdigest()}"


def verify(secret: bytes, payload: bytes, timestamp: str, signature_header: str, now: float,
           tolerance: float = TOLERANCE_SECONDS) -> bool:
    """What a receiver checks (docs/webhooks.md has it for other languages):
    the signature is the body's under `secret` and the timestamp is recent.
    Compared in constant time."""
    try:
        sent = int(timestamp)
    except ValueError:
        return False
    if abs(now - sent) > tolerance:
        return False
    expected = signature(secret, sent, payload)
    offered = [part.strip() for part in signature_header.split(",")]
    return any(hmac.compare_digest(expected, part) for part in offered)


def retry_delay(attempts: int, first: float, most: float) -> float:
    """Seconds to wait after the `attempts`-th failed POST: first, 2×first,
    4×first, … at most `most` (exponential, like postfix's queue)."""
    return min(first * 2 ** max(attempts - 1, 0), most)


def next_attempt(now: datetime, created_at: datetime, attempts: int, first: float, most: float,
                 max_age: timedelta) -> datetime | None:
    """When to POST again after `attempts` failures, or None: the event is
    past `max_age` by then, and is given up."""
    at = now + timedelta(seconds=retry_delay(attempts, first, most))
    return None if at - created_at > max_age else at

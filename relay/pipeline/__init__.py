"""The message pipeline: pure stages between parsing and delivery.

Each stage is a plain function ``stage(message, context, changes)`` that
either changes the parsed message in place (and says what it changed in
`changes`) or refuses it by raising `SmtpError` with the reply the sender
will see. Stages do no I/O and need no event loop: whatever they need from
the store (the Message-ID map) is looked up by the handler between the two
steps and handed in through `Context`. The handler runs both steps in a
worker process (relay/workers.py) with a time and memory limit, so a
hostile message cannot stall the server: `begin(raw)` parses and keeps the
message in the worker and says which Message-IDs it refers to; `finish(context)`
runs the stages over it and returns the bytes to deliver or the refusal.

Order (DESIGN §2): loop check → structure check → sender check → sending
rules (opt-out, contact window) → header rewrite → address scrubbing → attachment check → text size check → HTML
sanitizing (with the link policy inside HTML) → link stripping in other
text → re-encoding of parts with lines over 998 octets → the X-Relay-Policy summary, Authentication-Results and trace header →
DKIM signing of the final bytes.

This package's own module holds only what crosses between the event loop's
process and a worker: `Context` going in, `Begun` and `Processed` coming
back. The stages and the steps that run them are in `runner.py`; the
names `begin`, `finish`, `process` and `STAGES` here import it on first
use. The relay's event-loop process never uses them (it sends the workers
the names of `runner.begin` and `runner.finish`), so it does not load
bleach, html5lib, tinycss2 or linkify-it: about 10 MB of its memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from relay.config import PolicyConfig
from relay.pipeline.changes import ChangeLog
from relay.pipeline.message import parse, referenced_ids
from relay.replies import Reply
from relay.store import MessageIdRow, Party

if TYPE_CHECKING:
    from relay.dkim import DkimKey

__all__ = ["Begun", "Context", "Processed", "Result", "STAGES", "begin", "finish", "parse", "process",
           "referenced_ids"]

# What a worker is sent by name (relay/workers.py resolves "module:function").
BEGIN = "relay.pipeline.runner:begin"
FINISH = "relay.pipeline.runner:finish"


@dataclass(frozen=True)
class Context:
    """Everything a stage may know about one message besides its content."""

    domain: str
    hostname: str
    direction: str  # "buyer_to_seller" or "seller_to_buyer"
    sender: Party
    recipient: Party
    sender_alias: str
    recipient_alias: str
    relay_message_id: str  # minted by the handler, so stages stay deterministic
    received_at: datetime
    transaction_id: str
    thread_rows: tuple[MessageIdRow, ...] = ()
    max_hops: int = 50
    max_relay_hops: int = 3
    protocol: str = "ESMTP"
    policy: PolicyConfig = PolicyConfig()
    # The sender logged in on the submission listener: its identity is the
    # account, so the header From: is not compared (it is replaced anyway).
    authenticated: bool = False
    latest_order_at: datetime | None = None  # of the relationship; seller messages only
    dkim_key: DkimKey | None = None  # sign the delivered bytes (last of all)
    auth_results: str | None = None  # Authentication-Results value from the inbound checks


@dataclass
class Result:
    delivered: bytes
    original_message_id: str | None
    changes: list[str] = field(default_factory=list)
    policy_summary: str = "clean"


@dataclass
class Begun:
    referenced_ids: list[str]
    refusal: Reply | None = None


@dataclass
class Processed:
    result: Result | None
    refusal: Reply | None
    changes: ChangeLog
    # The archive's form of the raw and the delivered message
    # (store.common.PreparedBodies), made in the worker; None when refused.
    bodies: object | None = None


def __getattr__(name: str):
    # The stages' libraries are loaded by whoever runs the stages, not by
    # whoever only names the types (PEP 562).
    if name in ("begin", "finish", "process", "STAGES"):
        from relay.pipeline import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

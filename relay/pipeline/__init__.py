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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage

from relay import dkim, replies
from relay.config import PolicyConfig
from relay.dkim import DkimKey
from relay.pipeline import attachments, checks, lines, links, rewrite, sanitize, scrub
from relay.pipeline.changes import ChangeLog
from relay.pipeline.message import parse, raised_by_email_package, referenced_ids, serialize
from relay.pipeline.rewrite import trace_header
from relay.replies import Reply, SmtpError
from relay.store import MessageIdRow, Party

__all__ = ["Begun", "Context", "Processed", "Result", "STAGES", "begin", "finish", "parse", "process",
           "referenced_ids"]


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


STAGES = (
    checks.loop_check,
    checks.structure_check,
    checks.sender_check,
    checks.sending_rules,
    rewrite.rewrite_headers,
    scrub.scrub_addresses,
    # Content rules (DESIGN §4). Attachments and sizes first: both are cheap
    # and refuse outright, before any work is spent sanitizing.
    attachments.check_attachments,
    sanitize.check_text_sizes,
    sanitize.sanitize_html,
    links.strip_links,
    # Last of the content stages, so that it sees the sanitizer's and the
    # link stripper's output too: no delivered line over 998 octets.
    lines.limit_line_lengths,
)


def process(message: EmailMessage, context: Context, changes: list[str]) -> Result:
    """Run every stage over `message`; return the bytes to deliver.

    `changes` is filled as stages go, so that a refusal half-way still
    leaves a record of what was looked at for the archive.
    """
    log = changes if isinstance(changes, ChangeLog) else ChangeLog()
    original_id = rewrite.original_message_id(message)
    try:
        for stage in STAGES:
            stage(message, context, log)
        summary = log.policy_summary()
        message["X-Relay-Policy"] = summary
        trace = [trace_header(context)]
        if context.auth_results:
            trace.insert(0, f"Authentication-Results: {context.auth_results}")
        delivered = serialize(message, prepend=trace)
        if context.dkim_key is not None:
            delivered = dkim.sign(delivered, context.dkim_key)
    except RecursionError:
        # The email package walks MIME trees recursively; thousands of nested
        # parts exhaust the stack. No real mail nests like that.
        log.append("refused: MIME structure nested too deeply")
        raise SmtpError(replies.TOO_DEEPLY_NESTED) from None
    except SmtpError:
        raise
    except Exception as error:
        if not raised_by_email_package(error):
            raise
        log.append(f"refused: the email package cannot read a header ({type(error).__name__}: {error})")
        raise SmtpError(replies.UNPARSEABLE) from error
    finally:
        if log is not changes:
            changes.extend(log)
    return Result(delivered=delivered, original_message_id=original_id, changes=changes,
                  policy_summary=summary)


# --- the two steps a worker process runs (relay/workers.py) -----------------

# The message between begin() and finish(): a worker is leased to one
# message for both calls, so it is never another message's.
_held: EmailMessage | None = None


@dataclass
class Begun:
    referenced_ids: list[str]
    refusal: Reply | None = None


@dataclass
class Processed:
    result: Result | None
    refusal: Reply | None
    changes: ChangeLog


def begin(raw: bytes) -> Begun:
    """Parse `raw` and keep it for `finish`; the ids the handler looks up."""
    global _held
    _held = None
    try:
        message = parse(raw)
        ids = referenced_ids(message)
    except SmtpError as exc:
        return Begun([], exc.reply)
    except Exception as error:
        if not raised_by_email_package(error):
            raise
        return Begun([], replies.UNPARSEABLE)
    _held = message
    return Begun(ids)


def finish(context: Context) -> Processed:
    """Run the stages over the message `begin` kept."""
    global _held
    message, _held = _held, None
    if message is None:
        raise RuntimeError("finish() without begin() in this worker")
    changes = ChangeLog()
    try:
        return Processed(process(message, context, changes), None, changes)
    except SmtpError as exc:
        return Processed(None, exc.reply, changes)

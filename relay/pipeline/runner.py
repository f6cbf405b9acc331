"""The stages in their order, and the two steps a worker runs over them.

`process(message, context, changes)` runs every stage of `STAGES` over a
parsed message and returns the bytes to deliver (see the package's
docstring for the order and the rules). A worker process runs it in two
steps, `begin(raw)` and `finish(context)`, with the store lookups of the
handler between them (relay/handler.py, relay/workers.py).
"""

from __future__ import annotations

from email.message import EmailMessage

from relay import dkim, replies
from relay.pipeline import Begun, Context, Processed, Result, attachments, checks, lines, links, rewrite, \
    sanitize, scrub
from relay.pipeline.changes import ChangeLog
from relay.pipeline.message import parse, raised_by_email_package, referenced_ids, serialize
from relay.pipeline.rewrite import trace_header
from relay.replies import SmtpError
from relay.store.common import prepare_bodies

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

# The message between begin() and finish(), parsed and as received: a
# worker is leased to one message for both calls, so it is never another
# message's.
_held: EmailMessage | None = None
_held_raw: bytes | None = None


def begin(raw: bytes) -> Begun:
    """Parse `raw` and keep it for `finish`; the ids the handler looks up."""
    global _held, _held_raw
    _held = _held_raw = None
    try:
        message = parse(raw, lift=True)
        ids = referenced_ids(message)
    except SmtpError as exc:
        return Begun([], exc.reply)
    except Exception as error:
        if not raised_by_email_package(error):
            raise
        return Begun([], replies.UNPARSEABLE)
    _held, _held_raw = message, raw
    return Begun(ids)


def finish(context: Context) -> Processed:
    """Run the stages over the message `begin` kept; with the bytes to
    deliver, their archive form (hashed, compressed), made here once the
    parsed message is gone, where the memory the parse took is free again."""
    global _held, _held_raw
    message, raw, _held, _held_raw = _held, _held_raw, None, None
    if message is None:
        raise RuntimeError("finish() without begin() in this worker")
    changes = ChangeLog()
    # The attachments delivered as received: the archive splices them
    # rather than compressing them twice (relay/store/__init__.py).
    reused = tuple((body.start, body.start + len(body.source)) for body in getattr(message, "lifted_bodies", ()))
    try:
        result = process(message, context, changes)
    except SmtpError as exc:
        return Processed(None, exc.reply, changes)
    del message
    try:
        bodies = prepare_bodies(raw, result.delivered, reused)
    except Exception:  # noqa: BLE001 - MemoryError too: a saving, never a reason to fail the message
        bodies = None  # the archive makes them itself (store record())
    return Processed(result, None, changes, bodies)

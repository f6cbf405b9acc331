"""Deciding stages: checks that refuse a message and change nothing."""

from __future__ import annotations

from datetime import timedelta
from email.message import EmailMessage

from relay import addresses, replies
from relay.pipeline.message import content_type, maintype, message_ids_in, raw_values
from relay.replies import SmtpError


def loop_check(message: EmailMessage, context, changes: list[str]) -> None:
    """Refuse a message that has passed through too many hops (RFC 5321
    §6.3): a loop between the relay and a forwarding mailbox ends here."""
    received = raw_values(message, "Received")
    if len(received) > context.max_hops:
        changes.append(f"refused: {len(received)} Received headers (limit {context.max_hops})")
        raise SmtpError(replies.TOO_MANY_HOPS)
    # The relay's own trace lines: a message that went through this relay
    # more than a few times is circling (an alias forwarding to an alias).
    own = f"by {context.hostname} (relay)"
    mine = sum(1 for value in received if value.strip().startswith(own))
    if mine > context.max_relay_hops:
        changes.append(f"refused: passed this relay {mine} times (limit {context.max_relay_hops})")
        raise SmtpError(replies.TOO_MANY_HOPS)


# No real mail comes near these; past them a message is an attack on the
# parser (each level and part costs work in every later stage).
MAX_MIME_DEPTH = 50
MAX_MIME_PARTS = 1000


def structure_check(message: EmailMessage, context, changes: list[str]) -> None:
    """Refuse MIME trees that are too deep or too wide, and message/* parts
    with a transfer encoding (RFC 2046 §5.2.1 forbids it): the parser leaves
    such an embedded message as opaque base64 that no later stage could
    read, so a party's address would pass hidden inside it."""
    stack, parts = [(message, 0)], 0
    while stack:  # iterative: walk() recurses, and depth is what we check
        part, depth = stack.pop()
        parts += 1
        if depth > MAX_MIME_DEPTH or parts > MAX_MIME_PARTS:
            changes.append(f"refused: MIME structure over {MAX_MIME_DEPTH} levels or {MAX_MIME_PARTS} parts")
            raise SmtpError(replies.TOO_DEEPLY_NESTED)
        if maintype(part) == "message":
            cte = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
            if cte not in ("", "7bit", "8bit", "binary"):
                changes.append(f"refused: {content_type(part)} part with {cte} transfer encoding")
                raise SmtpError(replies.ENCODED_MESSAGE_PART)
        if part.is_multipart():
            stack.extend((child, depth + 1) for child in part.get_payload())


def sender_check(message: EmailMessage, context, changes: list[str]) -> None:
    """The header From: must be exactly one mailbox, the sender's registered
    address: the envelope was checked at RCPT, and a message must not claim
    another author in its header."""
    if context.authenticated:
        return
    values = message.get_all("From", [])
    if len(values) != 1:
        changes.append(f"refused: {len(values)} From headers")
        raise SmtpError(replies.FROM_HEADER_MISSING)
    try:
        mailboxes = values[0].addresses
        # `addresses` flattens groups, so "From: Team: buyer@x;" would pass
        # as one mailbox; RFC 5322 From is a mailbox-list and allows no group.
        in_group = any(group.display_name is not None for group in values[0].groups)
    except (AttributeError, ValueError, IndexError, TypeError):
        mailboxes, in_group = (), False
    if len(mailboxes) != 1 or in_group or not mailboxes[0].addr_spec:
        changes.append("refused: From header is not a single mailbox")
        raise SmtpError(replies.FROM_HEADER_MISSING)
    if addresses.normalize(mailboxes[0].addr_spec) != context.sender.address:
        changes.append("refused: From header names another address than the envelope sender")
        raise SmtpError(replies.FROM_HEADER_MISMATCH)


def _replies_to_buyer(message: EmailMessage, context) -> bool:
    """True if In-Reply-To/References name a message the buyer sent in this
    relationship (under either id: the buyer's own, or the relay's that the
    seller received). The message's own Message-ID does not count: a seller
    could set it to anything."""
    named = set()
    for name in ("In-Reply-To", "References"):
        for value in raw_values(message, name):
            named.update(message_ids_in(value))
    return any(row.sender_id == context.recipient.id and (row.relay_id in named or row.original_id in named)
               for row in context.thread_rows)


def sending_rules(message: EmailMessage, context, changes: list[str]) -> None:
    """DESIGN §4 for seller messages: an opted-out buyer receives only replies
    in a thread the buyer wrote in, and a seller starts a conversation only
    within `proactive_window_days` of the relationship's latest order."""
    if context.direction != "seller_to_buyer" or _replies_to_buyer(message, context):
        return
    if context.recipient.opted_out:
        changes.append("refused: the buyer opted out of unsolicited messages and this is no reply")
        raise SmtpError(replies.OPTED_OUT)
    days = context.policy.proactive_window_days
    if days and (context.latest_order_at is None
                 or context.received_at - context.latest_order_at > timedelta(days=days)):
        changes.append(f"refused: no order in the last {days} days and this is no reply to the buyer")
        raise SmtpError(replies.OUTSIDE_PROACTIVE_WINDOW.with_text(
            f"Outside the contact window: a seller may start a conversation only within {days} days "
            "of the latest order; reply to the buyer's message instead"))

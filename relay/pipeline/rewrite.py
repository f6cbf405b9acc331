"""Header rewriting: the allowlist, From/To, and threading ids (DESIGN §3).

After this stage the top-level header holds only what the recipient may
see: the allowlisted headers as received, `From:` the sender's alias with
the sender's registered display name, `To:` the recipient's real address, a
fresh Message-ID in the relay's domain, and In-Reply-To/References
translated into ids the recipient's own client knows. Ids the relay cannot
translate are dropped: they are the sender's client's and can name its host.

Every id the relay writes is printable ASCII (RFC 5322), whatever bytes the
clients used: where the recipient's own id for a message holds 8-bit bytes
(raw UTF-8, latin-1, garbage) or control characters, the relay id of that
message stands in for it. The recipient's client then threads the reply
under an id it has not seen (a placeholder parent, as for any unknown
reference) rather than receiving a header only SMTPUTF8 may carry.
"""

from __future__ import annotations

from collections import Counter
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime

from relay.pipeline.message import MAX_REFERENCES, is_seven_bit_id, message_ids_in, raw_values, set_id_list
from relay.store import MessageIdRow

# Lower-case names; plus every Content-* header. Everything else goes.
KEPT_HEADERS = frozenset(
    {"subject", "date", "mime-version", "in-reply-to", "references", "message-id", "auto-submitted"}
)


def is_kept(name: str) -> bool:
    name = name.lower()
    return name in KEPT_HEADERS or name.startswith("content-")


def original_message_id(message: EmailMessage) -> str | None:
    for value in raw_values(message, "Message-ID"):
        ids = message_ids_in(value)
        if ids:
            return ids[0]
    return None


def translate_ids(
    ids: list[str], rows: tuple[MessageIdRow, ...], sender_id: int, recipient_id: int
) -> list[str]:
    """Map ids the sender's client used to ids the recipient's client knows.

    - the relay id of a message the recipient wrote → the recipient's original id;
    - the original id of a message the sender wrote → the relay id the
      recipient received it under;
    - an id the recipient itself minted or received stays;
    - anything else is dropped.
    An id that is not printable ASCII is never written: the relay id of
    its message stands in for it.
    """
    by_relay = {row.relay_id: row for row in rows}
    by_original = {row.original_id: row for row in rows if row.original_id}
    out = []
    for msgid in ids:
        row = by_relay.get(msgid)
        if row is not None:
            if row.sender_id == recipient_id:
                translated = row.original_id or row.relay_id
            else:
                translated = row.relay_id
        else:
            row = by_original.get(msgid)
            if row is None:
                continue
            translated = row.relay_id if row.sender_id == sender_id else msgid
        if not is_seven_bit_id(translated):
            translated = row.relay_id
        if translated not in out:
            out.append(translated)
    return out[-MAX_REFERENCES:]


def rewrite_headers(message: EmailMessage, context, changes: list[str]) -> None:
    in_reply_to = [i for v in raw_values(message, "In-Reply-To") for i in message_ids_in(v)]
    references = [i for v in raw_values(message, "References") for i in message_ids_in(v)]

    # One pass over the header list: deleting name by name rescans every
    # header each time, which a message with 20,000 headers turns into minutes.
    dropped = Counter(name for name, _ in message._headers if not is_kept(name))
    message._headers = [(name, value) for name, value in message._headers if is_kept(name)]
    for name, count in dropped.items():
        changes.append(f"dropped header {name}" + (f" ({count}x)" if count > 1 else ""))

    message["From"] = Address(display_name=context.sender.display_name, addr_spec=context.sender_alias)
    message["To"] = Address(display_name=context.recipient.display_name, addr_spec=context.recipient.address)
    changes.append("set From to the sender's alias and To to the recipient's address")

    had_id = "Message-ID" in message
    del message["Message-ID"]
    message["Message-ID"] = context.relay_message_id
    changes.append("replaced Message-ID" if had_id else "added Message-ID")

    for name, ids in (("In-Reply-To", in_reply_to), ("References", references)):
        if name not in message:
            continue
        translated = translate_ids(ids, context.thread_rows, context.sender.id, context.recipient.id)
        del message[name]
        if translated:
            set_id_list(message, name, translated)
            changes.append(f"translated {name} ({len(translated)} of {len(ids)} ids)")
        else:
            changes.append(f"dropped {name} (no known ids)")

    if "Date" not in message:
        message["Date"] = format_datetime(context.received_at)
        changes.append("added Date")
    if "MIME-Version" not in message and message.is_multipart():
        message["MIME-Version"] = "1.0"


def trace_header(context) -> str:
    """The relay's Received: line. It names no client: the sender's host and
    IP address are what the recipient must not learn."""
    date = format_datetime(context.received_at)
    return f"Received: by {context.hostname} (relay) with {context.protocol} id {context.transaction_id}; {date}"

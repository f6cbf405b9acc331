"""What both store backends share besides the interface in relay/store/__init__.py
and the queries in queries.py: how a driver's failure is raised (each
engine's `classify` decides what it is), the relationship query and its row, the spelling
of message ids and other message-borne text in the database, and the pure
work on archive rows (hashing and compressing before a write; decoding and
checking after a read), which runs on a worker thread, never in SQL.

Message-borne text arrives as the email package gives it: a header's bytes
decoded as ASCII with ``surrogateescape``, so each 8-bit byte is a lone
surrogate (U+DC80..U+DCFF). Neither engine stores lone surrogates (nor
PostgreSQL a NUL), and the same bytes would fail on every retry, so
everything such text reaches the database through `stored_id` (ids: exact,
reversible, one spelling per byte string) or `storable_text` (the archive's
metadata: readable, escaped).
"""

from __future__ import annotations

from typing import NamedTuple

import contextlib
import json
from dataclasses import replace

from relay import archive as archive_logic
from relay.store import (
    ArchiveEntry,
    BodyDecodeError,
    StoreDataError,
    StoreUnavailable,
    MessageIdRow,
    Party,
    Relationship,
    decode_bodies,
    encode_bodies,
    sha256_hex,
)

from relay.store import schema
from relay.store.schema import ENGINES  # noqa: F401


def migrations(engine: str) -> list[tuple[int, str]]:
    """The numbered migrations of `engine` (relay/store/schema.py)."""
    return schema.migrations(engine)


@contextlib.contextmanager
def store_errors(classify):
    """Raise what a driver's failure is, as `classify(exc)` says (an
    engine's own function): StoreUnavailable or StoreDataError with the
    driver's text, or, for None, the exception as it is."""
    try:
        yield
    except Exception as exc:
        kind = classify(exc)
        if kind is None:
            raise
        if kind is StoreDataError:
            raise StoreDataError(f"database refused a value: {type(exc).__name__}: {exc}") from exc
        raise StoreUnavailable(f"database error: {type(exc).__name__}: {exc}") from exc


RELATIONSHIP_SELECT = """
    SELECT r.id, r.seller_alias, r.buyer_alias, r.created_at,
           s.id, s.address, s.display_name, s.opted_out, s.daily_orders,
           b.id, b.address, b.display_name, b.opted_out, b.daily_orders
      FROM relationships r
      JOIN parties s ON s.id = r.seller_id
      JOIN parties b ON b.id = r.buyer_id
"""


def relationship_from_row(row) -> Relationship:
    return Relationship(
        id=row[0],
        seller_alias=row[1],
        buyer_alias=row[2],
        created_at=row[3],
        seller=Party(row[4], "seller", row[5], row[6], bool(row[7]), row[8]),
        buyer=Party(row[9], "buyer", row[10], row[11], bool(row[12]), row[13]),
    )


# --- message ids and other message-borne text -----------------------------------
#
# How the Message-ID map spells an id (`message_ids.original_id`, and the
# ids looked up there), by the id's bytes:
#   printable ASCII only   as it is: every id of a well-behaved client, and
#                          every row written before 8-bit ids were handled;
#   valid UTF-8, printable the UTF-8 text (RFC 6532's form of such an id),
#   and not ASCII          which holds a non-ASCII character;
#   anything else          "bytes " and the id with each byte outside
#                          printable ASCII, and the backslash, as \xHH /
#                          \\ (latin-1, invalid UTF-8, control characters).
# The three forms cannot meet: the first is printable ASCII without a
# space, the second holds a non-ASCII character, the third is ASCII and
# starts with "bytes " (a space). So two ids have one spelling only if they
# are the same bytes, and `parsed_id` gives the parser's string back exactly.

_ESCAPED_PREFIX = "bytes "


def _printable_ascii(data: bytes) -> bool:
    return all(0x21 <= byte <= 0x7E for byte in data)


def stored_id(msgid: str) -> str:
    """The Message-ID map's spelling of `msgid` (as the email package
    gives it: 8-bit bytes as surrogates). Text both engines accept."""
    data = msgid.encode("utf-8", errors="surrogateescape")
    if _printable_ascii(data):
        return msgid
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and not text.isascii() and text.isprintable():
        return text
    escaped = "".join(
        chr(byte) if 0x21 <= byte <= 0x7E and byte != 0x5C else ("\\\\" if byte == 0x5C else f"\\x{byte:02x}")
        for byte in data)
    return _ESCAPED_PREFIX + escaped


def parsed_id(stored: str | None) -> str | None:
    """`stored_id` undone: the id as the email package spells it."""
    if stored is None:
        return None
    if stored.isascii() and stored.startswith(_ESCAPED_PREFIX):
        out, text, i = bytearray(), stored[len(_ESCAPED_PREFIX):], 0
        while i < len(text):
            if text[i] == "\\" and text[i + 1:i + 2] == "x":
                out.append(int(text[i + 2:i + 4], 16))
                i += 4
            elif text[i] == "\\":
                out.append(0x5C)
                i += 2
            else:
                out.append(ord(text[i]))
                i += 1
        data = bytes(out)
    else:
        data = stored.encode("utf-8")
    return data.decode("ascii", errors="surrogateescape")


def message_id_row(sender_id: int, original_id: str | None, relay_id: str) -> MessageIdRow:
    """A map row read from the database, with its ids as the pipeline spells them."""
    return MessageIdRow(sender_id, parsed_id(original_id), parsed_id(relay_id))


def storable_text(text: str) -> str:
    """`text` as both engines store it: 8-bit bytes the email package left
    as surrogates become \\xHH, a NUL \\x00 (readable; unlike `stored_id`
    not meant to be undone)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="backslashreplace")
    return text.replace("\x00", "\\x00")


def storable_entry(entry: ArchiveEntry) -> ArchiveEntry:
    """`entry` with every text column in a form both engines store. Applied
    before the row is hashed, so the chain covers what is stored."""
    return replace(
        entry,
        client_address=storable_text(entry.client_address),
        mail_from=storable_text(entry.mail_from),
        rcpt_to=tuple(storable_text(r) for r in entry.rcpt_to),
        reply=storable_text(entry.reply),
        changes=tuple(storable_text(c) for c in entry.changes),
        original_message_id=None if entry.original_message_id is None else stored_id(entry.original_message_id),
        relay_message_id=None if entry.relay_message_id is None else stored_id(entry.relay_message_id),
    )


class PreparedBodies(NamedTuple):
    """A row's bodies as the archive stores them, with what the row says of
    them. Made by a worker for a delivered message (relay/pipeline/runner.py),
    where the 10 MB case's compression no longer weighs on the event loop's
    process (about 45 MB for the delivered body's dictionary), or by
    `record()` itself."""

    raw_sha256: str
    delivered_sha256: str | None
    raw_blob: bytes
    delivered_blob: bytes | None
    auto_reply: bool
    raw_size: int
    delivered_size: int | None

    def are_of(self, raw_size: int, delivered: bytes | None) -> bool:
        """Made from bodies of these sizes (a cheap check that they were
        made for this entry)."""
        return self.raw_size == raw_size and self.delivered_size == (None if delivered is None else len(delivered))


def prepare_bodies(raw: bytes, delivered: bytes | None, reused: tuple[tuple[int, int], ...] = ()) -> PreparedBodies:
    """Hash and compress a row's bodies (CPU work: off the event loop);
    `reused` as for encode_bodies."""
    raw_blob, delivered_blob = encode_bodies(raw, delivered, reused)
    return PreparedBodies(sha256_hex(raw), sha256_hex(delivered), raw_blob, delivered_blob,
                          archive_logic.is_auto_reply(raw), len(raw), None if delivered is None else len(delivered))


def decoded(row: dict) -> dict:
    """A row from a store's `_archive_rows()` with its bodies uncompressed."""
    row = dict(row)
    body_raw, body_delivered = row.pop("body_raw"), row.pop("body_delivered")
    inline_raw_size = row.pop("inline_raw_size")
    row["rcpt_to"] = json.loads(row["rcpt_to"])
    row["changes"] = json.loads(row["changes"])
    row["decode_error"] = None
    if row["purged_at"]:
        row["raw"] = row["delivered"] = None
        return row
    try:
        if row["body_encoding"] == "identity":
            row["raw"], row["delivered"] = decode_bodies("identity", row["raw"], row["delivered"])
        else:
            if inline_raw_size or row["delivered"] is not None:
                raise BodyDecodeError("the archive table's own raw/delivered columns were written to")
            row["raw"], row["delivered"] = decode_bodies(row["body_encoding"], body_raw, body_delivered)
    except BodyDecodeError as exc:
        row["raw"] = row["delivered"] = None
        row["decode_error"] = str(exc)
    return row


def checked(rows: list[dict]) -> list[dict]:
    """Decoded rows, each with its own `content_problem` (None for a
    tombstone, whose content is gone)."""
    result = []
    for encoded in rows:
        row = decoded(encoded)
        row["content_problem"] = None if row["purged_at"] else archive_logic.content_problem(row)
        result.append(row)
    return result


def purge_check(rows: list[dict]) -> list[tuple[int, bool, int, str | None]]:
    """For each row about to be purged: (id, auto-reply, body bytes, problem).
    A row that fails its own hashes is not purged: that would launder an edit."""
    result = []
    for encoded in rows:
        row = decoded(encoded)
        problem = archive_logic.content_problem(row)
        auto = row["auto_reply"]
        size = 0
        if problem is None:
            if auto is None:
                auto = archive_logic.is_auto_reply(row["raw"])
            size = len(row["raw"]) + len(row["delivered"] or b"")
        result.append((row["id"], bool(auto), size, problem))
    return result

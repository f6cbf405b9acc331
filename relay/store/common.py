"""What both store backends share besides the interface in relay/store/__init__.py:
the numbered migrations, the relationship query and its row, and the pure
work on archive rows (hashing and compressing before a write; decoding and
checking after a read), which runs on a worker thread, never in SQL.
"""

from __future__ import annotations

import json
from importlib import resources

from relay import archive as archive_logic
from relay.store import BodyDecodeError, Party, Relationship, decode_bodies, encode_bodies, sha256_hex

ENGINES = ("sqlite", "postgresql")


def migrations(engine: str) -> list[tuple[int, str]]:
    """The numbered migrations of `engine`, from relay/store/migrations/<engine>/.
    Both engines have the same numbers, each meaning the same schema change."""
    assert engine in ENGINES
    found = []
    for entry in resources.files("relay.store").joinpath("migrations", engine).iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), entry.read_text(encoding="utf-8")))
    return sorted(found)


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


def prepare_bodies(raw: bytes, delivered: bytes | None):
    """(raw sha256, delivered sha256, raw blob, delivered blob, auto-reply)."""
    raw_blob, delivered_blob = encode_bodies(raw, delivered)
    return (sha256_hex(raw), sha256_hex(delivered), raw_blob, delivered_blob,
            archive_logic.is_auto_reply(raw))


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

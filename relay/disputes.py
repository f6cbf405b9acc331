"""The dispute tools' answers over a store, one function per question, as
the JSON the CLI's `--json` prints and the HTTP API returns (the field
names of docs/cli.md): an archive search, one message, what the relay
changed in it, its attachments, a relationship's thread, the chain's
verification and the response-time report.

The CLI (relay/cli.py) and the API (relay/api.py) both call these, so an
arbiter gets the same fields from either. The logic itself (hashing,
header comparison, the report) is relay/archive's; this module only reads
the store and shapes the answer.
"""

from __future__ import annotations

import email
import email.policy
from datetime import datetime
from typing import Callable

from relay import addresses, archive


async def search(store, *, relationship_id: int | None = None, seller: str | None = None,
                 buyer: str | None = None, since: str | None = None, until: str | None = None,
                 verdict: str | None = None, limit: int = 50, offset: int = 0) -> list[dict]:
    """Archive rows newest first, without bodies (`relay archive list --json`)."""
    rows = await store.archive_list(relationship_id=relationship_id, seller=seller, buyer=buyer, since=since,
                                    until=until, verdict=verdict, limit=limit, offset=offset)
    return [{("archive_id" if key == "id" else key): value for key, value in row.items()} for row in rows]


def summary(row: dict, relationship, reports: list[dict] = ()) -> dict:
    """One archive row as `relay archive show --json` prints it."""
    purged = bool(row["purged_at"])
    return {
        "archive_id": row["id"],
        "received_at": row["received_at"],
        "relationship": row["relationship_id"],
        "seller": relationship.seller.address if relationship else None,
        "buyer": relationship.buyer.address if relationship else None,
        "direction": row["direction"],
        "client_address": row["client_address"],
        "mail_from": row["mail_from"],
        "rcpt_to": row["rcpt_to"],
        "verdict": row["verdict"],
        "reply": row["reply"],
        "changes": row["changes"],
        "bytes": None if purged else (len(row["raw"]) if row["raw"] is not None else row["raw_size"]),
        "delivered_bytes": None if purged or row["delivered"] is None else len(row["delivered"]),
        "raw_sha256": row["raw_sha256"],
        "delivered_sha256": row["delivered_sha256"],
        "prev_sha256": row["prev_sha256"],
        "row_sha256": row["row_sha256"],
        "auto_reply": None if row["auto_reply"] is None else bool(row["auto_reply"]),
        "purged_at": row["purged_at"],
        "decode_error": row["decode_error"],
        # The delivery reports that came back for this message: what failed,
        # which reader understood the report, and whether the sender was told.
        "bounces": [{"bounce_id": r["id"], "received_at": r["received_at"], "action": r["action"],
                     "status": r["status"] or None, "detector": r["detector"] or None,
                     "notified": bool(r["notified"])} for r in reports],
    }


async def message(store, archive_id: int) -> tuple[dict, dict, object] | None:
    """(the row, its summary, its relationship) or None if there is no such row."""
    row = await store.archive_row(archive_id)
    if row is None:
        return None
    relationship = None
    if row["relationship_id"] is not None:
        relationship = await store.relationship_by_id(row["relationship_id"])
    return row, summary(row, relationship, await store.bounces_for(archive_id)), relationship


def changes(row: dict) -> dict:
    """What the relay did to the message (`relay archive show --changes --json`)."""
    removed, added = [], []
    if row["raw"] is not None and row["delivered"] is not None:
        removed, added = archive.header_changes(row["raw"], row["delivered"])
    return {"archive_id": row["id"], "verdict": row["verdict"], "reply": row["reply"],
            "changes": row["changes"], "headers_removed": removed, "headers_added": added}


def attachments(row: dict) -> list[dict]:
    """The attachments of a row's raw message: file name, type and decoded
    size, in order ([] once purged or unreadable). The archive's bytes were
    accepted once, but a hostile message is still read defensively: a part
    that cannot be decoded is listed with a null size."""
    data = None if row["purged_at"] or row["decode_error"] else row["raw"]
    if not data:
        return []
    found = []
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    for part in parsed.walk():
        if part.is_multipart() or part.get_content_disposition() not in ("attachment", "inline"):
            continue
        filename = part.get_filename()
        if part.get_content_disposition() == "inline" and filename is None:
            continue
        try:
            size = len(part.get_payload(decode=True) or b"")
        except Exception:  # a malformed part: list it, size unknown
            size = None
        found.append({"filename": filename, "content_type": part.get_content_type(), "bytes": size})
    return found


def body_bytes(row: dict, which: str) -> bytes:
    """The raw or delivered bytes of a row, checked against their hash;
    raises LookupError (gone or never delivered) or ValueError (edited)."""
    if row["purged_at"]:
        raise LookupError(f"archive row {row['id']} was purged at {row['purged_at']} (past retention); "
                          "its bytes are gone")
    if row["decode_error"]:
        raise ValueError(f"archive row {row['id']}: {row['decode_error']}; run `relay archive verify`")
    data = row[which]
    if data is None:
        raise LookupError(f"archive row {row['id']} has no delivered bytes (verdict {row['verdict']})")
    if archive.sha256_hex(data) != row[f"{which}_sha256"]:
        raise ValueError(f"archive row {row['id']}: its {which} bytes do not match {which}_sha256 (edited); "
                         "run `relay archive verify`")
    return data


async def find_relationship(store, text: str):
    """The relationship a person typed: either alias, a relationship id, or
    an order id (an order id may look like either, so it is tried last)."""
    found = None
    if "@" in text:
        found = await store.relationship_by_alias(text)
    elif text.isdigit() and len(text) < 18:
        found = await store.relationship_by_id(int(text))
    return found or await store.relationship_by_order(text)


def export_header(relationship, now: datetime) -> dict:
    """The manifest's head of `relay archive export` (CLI and API alike)."""
    return {"relationship": relationship.id, "seller": relationship.seller.address,
            "buyer": relationship.buyer.address, "seller_alias": relationship.seller_alias,
            "buyer_alias": relationship.buyer_alias, "exported_at": archive.iso(now)}


async def thread(store, relationship) -> dict:
    """A relationship's messages in order, both directions, each with what
    the relay did: the dispute team's timeline."""
    entries = []
    async for row in store.conversation(relationship.id):
        entries.append(summary(row, relationship))
    return {"relationship": relationship.id, "seller": relationship.seller.address,
            "buyer": relationship.buyer.address, "seller_alias": relationship.seller_alias,
            "buyer_alias": relationship.buyer_alias, "messages": entries}


async def verify(store, head: str | None = None, *, progress: Callable[[], None] | None = None):
    """`relay archive verify`'s checks: (verifier, breaks in id order, the
    archive id holding `head` or None)."""
    verifier = archive.ChainVerifier(purge_runs=await store.purge_runs())
    async for row in store.archive_chain():
        verifier.feed(row)
        if progress is not None:
            progress()
    for table, archive_id in await store.archive_dangling_references():
        verifier.missing_referenced(table, archive_id)
    breaks = sorted(verifier.breaks, key=lambda b: b.archive_id)
    if breaks and breaks[0].kind == "link":
        predecessor = await store.archive_id_by_row_hash(breaks[0].stored_prev)
        breaks[0] = archive.explain_link_break(breaks[0], predecessor)
    head_found = None
    if head:
        head_found = await store.archive_id_by_row_hash(head.strip().lower())
        if head_found is None:
            breaks.append(archive.ChainBreak(0, "head", f"the head {head} is no longer in the chain: "
                                                         "rows after it were rewritten or deleted"))
    return verifier, breaks, head_found


def verify_json(verifier, breaks) -> dict:
    return {"ok": not breaks, "rows": verifier.rows, "purged": verifier.purged, "head": verifier.head,
            "breaks": [{"archive_id": b.archive_id, "kind": b.kind, "detail": b.detail} for b in breaks]}


async def response_report(store, now: datetime, *, since: str | None = None, until: str | None = None,
                          seller: str | None = None) -> list:
    """The response-time report's sellers (render with archive.report_json,
    render_text or render_html); LookupError for an unknown seller."""
    if seller and await store.get_party("seller", seller) is None:
        raise LookupError(f"no seller {addresses.normalize(seller)}")
    facts, names = await store.response_facts(since=since, until=until, seller=seller)
    return archive.response_times(facts, now, since=archive.parse_iso(since) if since else None, names=names,
                                  sellers=[addresses.normalize(seller)] if seller else ())

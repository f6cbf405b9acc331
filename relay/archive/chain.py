"""The archive chain: how a row is hashed and linked to its predecessor, and
how the chain is judged. Both the store (which hashes each row as it
appends it) and the dispute tools (which re-hash every row to verify) use
this module; it imports neither. The chain is judged only by recomputing
hashes from stored bytes, never by trusting a stored flag."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

GENESIS_HASH = "0" * 64


def sha256_hex(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def chain_hash(metadata: dict, raw_sha256: str, delivered_sha256: str | None, prev_sha256: str) -> str:
    """The row hash of the archive chain: metadata, body hashes, previous row."""
    canonical = json.dumps(
        {"meta": metadata, "raw": raw_sha256, "delivered": delivered_sha256, "prev": prev_sha256},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def row_metadata(row: dict) -> dict:
    """The metadata a stored row was hashed with (ArchiveEntry.metadata())."""
    return {
        "received_at": row["received_at"],
        "relationship_id": row["relationship_id"],
        "direction": row["direction"],
        "client_address": row["client_address"],
        "mail_from": row["mail_from"],
        "rcpt_to": list(row["rcpt_to"]),
        "verdict": row["verdict"],
        "reply": row["reply"],
        "changes": list(row["changes"]),
    }


def content_problem(row: dict) -> str | None:
    """What is wrong with a live row on its own (bytes against their hashes,
    the row hash against metadata, hashes and its own prev), or None."""
    if row.get("decode_error"):
        return f"its stored bodies cannot be decoded ({row['decode_error']}): edited bytes"
    if sha256_hex(row["raw"]) != row["raw_sha256"]:
        return "its raw bytes do not match raw_sha256: edited bytes"
    if sha256_hex(row["delivered"]) != row["delivered_sha256"]:
        return "its delivered bytes do not match delivered_sha256: edited bytes"
    expected = chain_hash(row_metadata(row), row["raw_sha256"], row["delivered_sha256"], row["prev_sha256"])
    if expected != row["row_sha256"]:
        return "row_sha256 does not match the row's metadata and hashes: edited metadata"
    return None


@dataclass(frozen=True)
class ChainBreak:
    archive_id: int
    kind: str  # link | bytes | metadata | tombstone | reference
    detail: str
    previous_id: int | None = None  # link breaks: the row before it in id order
    stored_prev: str | None = None  # link breaks: what the row says its predecessor hashed to

    def line(self) -> str:
        return f"archive chain broken at row {self.archive_id}: {self.detail}"


@dataclass
class ChainVerifier:
    """Walks the archive in id order; `feed()` each row (as the store's
    `archive_chain()` yields them), then read `breaks`.

    A live row must hash to its own row_sha256 and link to the previous
    row's. A tombstone has lost the metadata its hash was made of, so it is
    checked by linkage alone: its prev must be the previous row's hash, and
    the next row's prev must be its hash; and it must belong to a recorded
    purge run whose cutoff it is older than. After a break the walk carries
    on from the broken row, so one edit is reported once.
    """

    purge_runs: dict[int, str] = field(default_factory=dict)  # run id -> cutoff
    rows: int = 0
    purged: int = 0
    head: str = GENESIS_HASH
    previous_id: int | None = None
    breaks: list[ChainBreak] = field(default_factory=list)

    def feed(self, row: dict) -> None:
        archive_id = row["id"]
        self.rows += 1
        if row["prev_sha256"] != self.head:
            self.breaks.append(ChainBreak(
                archive_id, "link", _link_detail(archive_id, self.previous_id, None),
                previous_id=self.previous_id, stored_prev=row["prev_sha256"]))
        if row.get("purged_at"):
            self.purged += 1
            cutoff = self.purge_runs.get(row.get("purge_id"))
            if cutoff is None:
                self.breaks.append(ChainBreak(archive_id, "tombstone",
                                              "it is emptied but no purge run recorded it: edited bytes"))
            elif not row["received_at"] < cutoff:
                self.breaks.append(ChainBreak(
                    archive_id, "tombstone",
                    f"it is emptied but was received after its purge run's cutoff ({cutoff})"))
        else:
            problem = row["content_problem"] if "content_problem" in row else content_problem(row)
            if problem:
                kind = "metadata" if "metadata" in problem else "bytes"
                self.breaks.append(ChainBreak(archive_id, kind, problem))
        self.head = row["row_sha256"]
        self.previous_id = archive_id

    def missing_referenced(self, table: str, archive_id: int) -> None:
        """A row that another table still refers to is gone (it was deleted;
        the only way to notice a deleted newest row). Once per row."""
        if any(b.kind == "reference" and b.archive_id == archive_id for b in self.breaks):
            return
        self.breaks.append(ChainBreak(archive_id, "reference",
                                      f"{table} refers to it but it is missing: a deleted row"))

    @property
    def ok(self) -> bool:
        return not self.breaks

    def summary(self) -> str:
        purged = f" ({self.purged} purged)" if self.purged else ""
        return f"archive chain verified: {self.rows} row(s){purged}, head {self.head}"


def _link_detail(archive_id: int, previous_id: int | None, predecessor_id: int | None) -> str:
    if previous_id is None:
        if predecessor_id is not None:
            return (f"it is the first row but follows row {predecessor_id} in the chain: "
                    "rows reordered or their ids changed")
        return "it is the first row but does not start at the genesis hash: earlier rows were deleted"
    if predecessor_id is not None and predecessor_id != previous_id:
        return (f"it follows row {predecessor_id} in the chain, not row {previous_id}: "
                "rows reordered or their ids changed")
    if archive_id != previous_id + 1:
        missing = (f"row {previous_id + 1}" if archive_id == previous_id + 2
                   else f"rows {previous_id + 1}–{archive_id - 1}")
        return f"its prev_sha256 does not match row {previous_id}: {missing} deleted"
    return (f"its prev_sha256 does not match row {previous_id}: the row it followed was deleted, "
            f"or row {previous_id}'s row_sha256 was edited")


def explain_link_break(brk: ChainBreak, predecessor_id: int | None) -> ChainBreak:
    """The break with its text refined once the store has looked up which
    row (if any) carries the hash the broken row says it follows."""
    if brk.kind != "link":
        return brk
    return ChainBreak(brk.archive_id, brk.kind, _link_detail(brk.archive_id, brk.previous_id, predecessor_id),
                      brk.previous_id, brk.stored_prev)

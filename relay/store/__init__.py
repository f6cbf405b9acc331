"""The store: parties, orders, relationships, the Message-ID map, the archive.

This package is the only code that speaks SQL. `open_store()` picks the
backend from the config's `database`: a file path is SQLite through
aiosqlite (sqlite.py, the embedded default, one node), a ``postgresql://``
URL is PostgreSQL through asyncpg (postgresql.py, for several relay nodes
on one database). Every query is written once, in queries.py, for both;
the two engine modules hold only what is their own (connections, locks,
error codes, migrate-to). Both run the same numbered migrations, written
once in schema.py. Every method is a coroutine.

What a failure is, is decided here once for both engines, by whether the
same call would fail again:
* the database is unreachable, locked, full, timed out, shut down (it will
  pass) → `StoreUnavailable`, which the handler answers with a 4xx;
* a value the database cannot hold (text that is no Unicode, a NUL in
  PostgreSQL text, a string too long) fails the same way on every retry →
  `StoreDataError`. The store spells message-borne text so that this does
  not happen (common.py); when it still does, it is a bug of the relay with
  this message, never reported as an outage;
* anything else the driver raises (bad SQL, a wrong parameter) is a bug of
  the relay and goes up as it is.
"""

from __future__ import annotations

import json
import struct
import threading
from dataclasses import asdict, dataclass

import zstandard

# The chain's hashing and the timestamp text live with the dispute tools
# (relay/archive/), which import nothing of the store; named here too for
# the store's callers.
from relay.archive.chain import GENESIS_HASH, chain_hash, sha256_hex  # noqa: F401
from relay.archive.times import iso, utc_now  # noqa: F401


class StoreError(Exception):
    """A request the store refuses (the text is fit for an operator)."""


class Conflict(StoreError):
    """The thing exists already; nothing was changed."""


class NotFound(StoreError):
    """A party, order or relationship named in the request does not exist."""


class StoreUnavailable(Exception):
    """The database failed (locked, full, gone): a transient condition."""


class StoreDataError(StoreError):
    """The database refused a value it cannot hold: the same value fails
    the same way every time, so this is no outage (and no 4xx)."""


@dataclass(frozen=True)
class Party:
    id: int
    role: str  # "seller" or "buyer"
    address: str
    display_name: str
    opted_out: bool = False  # buyers: refuses seller-initiated messages
    daily_orders: int | None = None  # sellers: overrides the order count of the daily cap


@dataclass(frozen=True)
class Relationship:
    id: int
    seller: Party
    buyer: Party
    seller_alias: str  # the buyer writes here; mail is delivered to the seller
    buyer_alias: str  # the seller writes here; mail is delivered to the buyer
    created_at: str

    def to_json(self) -> dict:
        return {
            "relationship": self.id,
            "seller": self.seller.address,
            "buyer": self.buyer.address,
            "seller_alias": self.seller_alias,
            "buyer_alias": self.buyer_alias,
            "created_at": self.created_at,
        }


@dataclass(frozen=True)
class MessageIdRow:
    """One entry of the Message-ID map."""

    sender_id: int
    original_id: str | None
    relay_id: str


@dataclass(frozen=True)
class ArchiveEntry:
    """What one received message leaves in the archive."""

    received_at: str
    relationship_id: int | None
    direction: str | None
    client_address: str
    mail_from: str
    rcpt_to: tuple[str, ...]
    verdict: str  # delivered | rejected | deferred | failed
    reply: str
    changes: tuple[str, ...]
    # None when `bodies` (the worker's) covers it: a big message's bytes may
    # then be in a temporary file only (relay/spool.py); `raw_size` says
    # how long it is.
    raw: bytes | None
    delivered: bytes | None
    # The Message-ID map entry to record with a delivered message.
    sender_id: int | None = None
    original_message_id: str | None = None
    relay_message_id: str | None = None
    # The daily-cap place taken for this message by `store.reserve_send()`:
    # record() turns it into the message's seller_sends row when the message
    # was delivered, and gives it back otherwise (same transaction).
    send_reservation: int | None = None
    # `raw` and `delivered` already hashed and compressed (common.PreparedBodies),
    # by the worker that made `delivered`; None: record() does it.
    bodies: object | None = None
    # The marketplace event to write with the row (relay/events.py), when
    # [webhooks] asks for it; None: none.
    webhook_event: str | None = None
    raw_size: int | None = None  # len(raw), for an entry whose raw is None

    def metadata(self) -> dict:
        return {
            "received_at": self.received_at,
            "relationship_id": self.relationship_id,
            "direction": self.direction,
            "client_address": self.client_address,
            "mail_from": self.mail_from,
            "rcpt_to": list(self.rcpt_to),
            "verdict": self.verdict,
            "reply": self.reply,
            "changes": list(self.changes),
        }


@dataclass(frozen=True)
class RelationshipStats:
    orders: int
    buyer_to_seller: int
    seller_to_buyer: int
    last_message_at: str | None = None


# --- archive bodies on disk ----------------------------------------------------
#
# How an archive row keeps its two bodies (`archive.body_encoding`):
#   identity  rows written before migration 3: raw and delivered as received,
#             in the archive table's own `raw`/`delivered` columns;
#   zstd      in `archive_bodies`: raw as a zstd frame, delivered as a zstd
#             frame that uses raw as its dictionary (delivered is mostly raw
#             again, so it costs a few hundred bytes). The archive table row
#             then holds only metadata and stays small to scan.
#             A delivered copy that holds big attachments of raw byte for
#             byte (the pipeline delivers them as received: pipeline/lifted.py)
#             may instead be a *splice*: a zstd skippable frame saying where
#             each of those raw ranges stands in delivered, then a zstd frame
#             of the rest of delivered with the rest of raw as its dictionary.
#             Same size stored, without a dictionary (and a context of 29 MB
#             for a 10 MB attachment) the size of the whole message.
# The hashes are always over the uncompressed bytes. docs/archive.md has the
# measurements behind the choice.

BODY_ENCODING = "zstd"
ZSTD_LEVEL = 3
ZSTD_DELIVERED_LEVEL = 1
_ZSTD_MAX_WINDOW_LOG = 27  # 128 MiB: what a default decompressor accepts


# zstd contexts are costly to make (a third of the time for a small
# message) and not safe to share between threads: one of each per thread.
_contexts = threading.local()


def _raw_compressor() -> zstandard.ZstdCompressor:
    if not hasattr(_contexts, "compressor"):
        _contexts.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return _contexts.compressor


def _raw_decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_contexts, "decompressor"):
        _contexts.decompressor = zstandard.ZstdDecompressor()
    return _contexts.decompressor


def _delivered_parameters(raw_size: int, delivered_size: int) -> zstandard.ZstdCompressionParameters:
    # The window must reach back over the whole dictionary (raw) or the long
    # matches into a big attachment are lost; the default hash table is too
    # small to find them in a multi-megabyte dictionary, so it grows with
    # raw (bounded: 2^22 entries). Level 1 (one hash table, not level 3's
    # two): delivered is raw again in long runs, which level 1 finds as
    # well, in a third of the time and two thirds of the memory
    # (docs/archive.md).
    window_log = min(max((raw_size + delivered_size).bit_length(), 17), _ZSTD_MAX_WINDOW_LOG)
    hash_log = min(max(raw_size.bit_length() - 3, 15), 22)
    return zstandard.ZstdCompressionParameters.from_level(ZSTD_DELIVERED_LEVEL, window_log=window_log,
                                                          hash_log=hash_log)


def encode_bodies(raw: bytes, delivered: bytes | None,
                  reused: tuple[tuple[int, int], ...] = ()) -> tuple[bytes, bytes | None]:
    """Compress a row's bodies for `BODY_ENCODING` (CPU work: call off the
    loop). `reused`: (start, end) ranges of raw that delivered may hold as
    they are (the lifted attachments); those found are spliced, not
    compressed again."""
    raw_blob = _raw_compressor().compress(raw)
    if delivered is None:
        return raw_blob, None
    if reused:
        spliced = _splice(raw, delivered, reused)
        if spliced is not None:
            return raw_blob, spliced
    return raw_blob, _compress_against(raw, delivered)


def _compress_against(dictionary_bytes, data) -> bytes:
    dictionary = zstandard.ZstdCompressionDict(dictionary_bytes, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    compressor = zstandard.ZstdCompressor(
        dict_data=dictionary, compression_params=_delivered_parameters(len(dictionary_bytes), len(data)))
    return compressor.compress(data)


# One of zstd's sixteen skippable-frame magic numbers (RFC 8878 §3.1.2):
# a zstd decoder passes over the frame; this module reads its JSON.
_SPLICE_MAGIC = 0x184D2A5E
_SKIPPABLE_HEADER = struct.Struct("<II")
_SPLICE_PREFIX = struct.pack("<I", _SPLICE_MAGIC)


def _splice(raw: bytes, delivered: bytes, reused) -> bytes | None:
    """delivered as a splice of raw (see the format above), or None when
    delivered holds none of the `reused` ranges."""
    view, found, position = memoryview(raw), [], 0
    for start, end in sorted(reused):
        at = delivered.find(view[start:end], position)
        if at != -1:
            found.append((at, start, end - start))
            position = at + end - start
    if not found:
        return None
    rest, skeleton, taken, cut = [], [], 0, 0
    out = memoryview(delivered)
    for at, start, length in found:
        rest.append(out[taken:at])
        skeleton.append(view[cut:start])
        taken, cut = at + length, start + length
    rest.append(out[taken:])
    skeleton.append(view[cut:])
    recipe = json.dumps({"splice": [list(piece) for piece in found]}, separators=(",", ":")).encode("ascii")
    return (_SKIPPABLE_HEADER.pack(_SPLICE_MAGIC, len(recipe)) + recipe
            + _compress_against(b"".join(skeleton), b"".join(rest)))


def _unsplice(raw: bytes, blob: bytes) -> bytes:
    """The delivered bytes of a splice (raises ValueError or ZstdError for a
    damaged one; the hashes catch one that decodes to other bytes)."""
    _, size = _SKIPPABLE_HEADER.unpack_from(blob)
    found = json.loads(blob[_SKIPPABLE_HEADER.size:_SKIPPABLE_HEADER.size + size])["splice"]
    view, skeleton, cut, previous = memoryview(raw), [], 0, 0
    for at, start, length in found:
        if not (isinstance(at, int) and isinstance(start, int) and isinstance(length, int)
                and start >= cut and at >= previous and length > 0 and start + length <= len(raw)):
            raise ValueError("a splice range out of order or out of raw")
        skeleton.append(view[cut:start])
        cut, previous = start + length, at + length
    skeleton.append(view[cut:])
    dictionary = zstandard.ZstdCompressionDict(b"".join(skeleton), dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    rest = zstandard.ZstdDecompressor(dict_data=dictionary).decompress(blob[_SKIPPABLE_HEADER.size + size:])
    pieces, taken, written = [], 0, 0
    for at, start, length in found:
        between = at - written
        if taken + between > len(rest):
            raise ValueError("a splice range beyond the delivered bytes")
        pieces += (rest[taken:taken + between], view[start:start + length])
        taken, written = taken + between, at + length
    pieces.append(rest[taken:])
    return b"".join(pieces)


class BodyDecodeError(Exception):
    """Stored bodies that cannot be decoded (damaged or edited blobs)."""


def decode_bodies(encoding: str, raw_blob: bytes | None,
                  delivered_blob: bytes | None) -> tuple[bytes, bytes | None]:
    """The uncompressed (raw, delivered) of a row stored with `encoding`."""
    if encoding == "identity":
        if raw_blob is None:
            raise BodyDecodeError("raw is missing")
        return bytes(raw_blob), None if delivered_blob is None else bytes(delivered_blob)
    if encoding != "zstd":
        raise BodyDecodeError(f"unknown body encoding {encoding!r}")
    if raw_blob is None:
        raise BodyDecodeError("the row's bodies are missing from archive_bodies")
    try:
        raw = _raw_decompressor().decompress(raw_blob)
        if delivered_blob is None:
            return raw, None
        if bytes(delivered_blob[:4]) == _SPLICE_PREFIX:
            return raw, _unsplice(raw, bytes(delivered_blob))
        dictionary = zstandard.ZstdCompressionDict(raw, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        return raw, zstandard.ZstdDecompressor(dict_data=dictionary).decompress(delivered_blob)
    except zstandard.ZstdError as exc:
        raise BodyDecodeError(f"zstd: {exc}") from None
    except (ValueError, KeyError, TypeError, struct.error) as exc:
        raise BodyDecodeError(f"splice: {exc}") from None


@dataclass(frozen=True)
class PurgeCounts:
    """What one purge did (or, with dry_run, would do)."""

    before: str  # rows received before this moment are past retention
    dry_run: bool = False
    rows: int = 0  # rows turned into tombstones
    bytes: int = 0  # uncompressed body bytes removed with them
    message_ids: int = 0  # Message-ID map entries removed with them
    bounces: int = 0  # delivery reports about them removed with them
    held: int = 0  # rows past retention kept: their relationship is on hold
    damaged: int = 0  # rows past retention kept: they fail their own hashes
    run_id: int | None = None  # the archive_purges row of this run

    def to_json(self) -> dict:
        return asdict(self)


async def open_store(database: str):
    """Open (not migrate) the store named by the config's `database`: a
    ``postgresql://`` (or ``postgres://``) URL opens a PostgresStore, a path
    a SqliteStore."""
    from relay.store.url import is_postgres

    if is_postgres(database):
        from relay.store.postgresql import PostgresStore

        return await PostgresStore.open(database)
    from relay.store.sqlite import SqliteStore

    return await SqliteStore.open(database)


def all_aliases(database: str) -> list[str]:
    """Every alias of every relationship, for tools that run beside the
    relay without an event loop of their own (the postfix recipient table).
    SQLite: the file opened read-only; PostgreSQL: one short connection."""
    from relay.store.url import is_postgres

    if is_postgres(database):
        import asyncio

        from relay.store.postgresql import all_aliases as postgres_aliases

        return asyncio.run(postgres_aliases(database))
    from relay.store.sqlite import all_aliases as sqlite_aliases

    return sqlite_aliases(database)

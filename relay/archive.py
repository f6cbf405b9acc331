"""The dispute tools' logic, apart from any database: verifying the archive
chain, the export formats, retention decisions, and the response-time report
with its SVG/HTML rendering.

Everything here works on plain values (rows as dicts, datetimes, bytes), so
the CLI, `relay serve` and the tests call it the same way; the store
(relay/store/) reads and writes the rows. The invariant this module keeps:
the chain is judged only by recomputing hashes from stored bytes, never by
trusting a stored flag.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from email.parser import BytesHeaderParser
from email import policy as email_policy
from pathlib import Path
from typing import Iterable

from relay.store import GENESIS_HASH, PurgeCounts, chain_hash, iso, sha256_hex

# --- times -----------------------------------------------------------------------


def parse_when(value: str, end_of_day: bool = False) -> str:
    """An operator's date or date-time as the store's timestamp text.

    Without a zone it is UTC. A bare date means its start, or with
    `end_of_day` the start of the next day (so `--until 2026-11-27` takes in
    all of the 27th). Raises ValueError with a text fit for the operator.
    """
    text = value.strip()
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        day = date.fromisoformat(text)
        moment = datetime.combine(day, time(), tzinfo=timezone.utc)
        if end_of_day:
            moment += timedelta(days=1)
        return iso(moment)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"not an ISO 8601 date or time: {value!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return iso(moment)


def parse_iso(stamp: str) -> datetime:
    """The store's timestamp text as an aware datetime."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


# --- headers -----------------------------------------------------------------------

_AUTO_PRECEDENCE = {"bulk", "junk", "list"}


def header_block(raw: bytes) -> bytes:
    """The header section of a message (up to the first empty line)."""
    for separator in (b"\r\n\r\n", b"\n\n"):
        end = raw.find(separator)
        if end != -1:
            return raw[: end + len(separator)]
    return raw


def is_auto_reply(raw: bytes) -> bool:
    """Whether the raw message says it was sent by a machine: an
    `Auto-Submitted` other than `no` (RFC 3834), or `Precedence: bulk`,
    `junk` or `list`. Such a message does not ask for an answer, and does not
    answer one."""
    headers = BytesHeaderParser(policy=email_policy.compat32).parsebytes(header_block(raw))
    for value in headers.get_all("Auto-Submitted", []):
        keyword = str(value).split(";", 1)[0].split("(", 1)[0].strip().lower()
        if keyword and keyword != "no":
            return True
    for value in headers.get_all("Precedence", []):
        if str(value).split("(", 1)[0].strip().lower() in _AUTO_PRECEDENCE:
            return True
    return False


def header_lines(raw: bytes) -> list[str]:
    """The header fields of a message, each unfolded to one line."""
    text = header_block(raw).decode("utf-8", errors="replace").replace("\r\n", "\n")
    fields: list[str] = []
    for line in text.split("\n"):
        if not line:
            continue
        if line[0] in " \t" and fields:
            fields[-1] += " " + line.strip()
        else:
            fields.append(line.rstrip())
    return fields


def header_changes(raw: bytes, delivered: bytes) -> tuple[list[str], list[str]]:
    """(header fields only in the raw message, fields only in the delivered
    one), each in its message's order: what the rewrite removed and added."""
    before, after = header_lines(raw), header_lines(delivered)
    remaining = list(after)
    removed = []
    for line in before:
        if line in remaining:
            remaining.remove(line)
        else:
            removed.append(line)
    kept = list(before)
    added = []
    for line in after:
        if line in kept:
            kept.remove(line)
        else:
            added.append(line)
    return removed, added


# --- the chain -----------------------------------------------------------------------


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


# --- retention -----------------------------------------------------------------------


def retention_cutoff(now: datetime, retention_days: int) -> str:
    """Rows received before the returned moment are past retention."""
    return iso(now - timedelta(days=retention_days))


def purge_summary(counts: PurgeCounts) -> str:
    """One line for the CLI and the server's log."""
    verb = "would purge" if counts.dry_run else "purged"
    bounces = f", {counts.bounces} delivery reports" if counts.bounces else ""
    line = (f"{verb} {counts.rows} archive row(s) received before {counts.before}"
            f" ({format_bytes(counts.bytes)} of message bodies, {counts.message_ids} Message-ID map entries"
            f"{bounces})")
    if counts.held:
        line += f"; {counts.held} row(s) kept on hold"
    if counts.damaged:
        line += f"; {counts.damaged} row(s) kept because they fail their hashes (run `relay archive verify`)"
    return line


def format_bytes(count: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"  # pragma: no cover


# --- export -----------------------------------------------------------------------

FORMATS = ("mbox", "eml-dir")
AS_CHOICES = ("raw", "delivered")
_FROM_LINE = re.compile(rb"^>*From ", re.MULTILINE)


class ExportError(Exception):
    """The export cannot be written; nothing was left at the destination."""


def mbox_entry(data: bytes, received_at: str) -> bytes:
    """One message in mboxrd form: a `From ` separator line with the time
    the relay received it, LF line ends, and every line that starts with
    `From ` (after any `>`) quoted with one more `>`, so readers can undo it."""
    stamp = parse_iso(received_at).strftime("%a %b %d %H:%M:%S %Y")
    body = data.replace(b"\r\n", b"\n")
    body = _FROM_LINE.sub(lambda match: b">" + match.group(0), body)
    if not body.endswith(b"\n"):
        body += b"\n"
    return b"From MAILER-DAEMON " + stamp.encode("ascii") + b"\n" + body + b"\n"


def mbox_unquote(data: bytes) -> bytes:
    """The inverse of mbox_entry()'s quoting on one message's lines."""
    return re.sub(rb"^>(>*From )", rb"\1", data, flags=re.MULTILINE)


@dataclass
class Exporter:
    """Writes one conversation to `out`, atomically: everything goes to a
    temporary name beside it and is renamed into place at the end, so an
    arbiter never gets half an export. `out` must not exist.

    eml-dir: `out/` holds `0001-archive-17.eml`… (the exact bytes) and
    `manifest.json`. mbox: `out` is the mbox file and `out.manifest.json`
    the manifest beside it (renamed first: the mbox appearing means done).
    """

    out: Path
    fmt: str
    as_: str
    header: dict
    messages: list[dict] = field(default_factory=list)
    omitted: list[dict] = field(default_factory=list)

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise ExportError(f"unknown format {self.fmt!r}; expected one of {', '.join(FORMATS)}")
        self.out = Path(self.out)
        self.manifest_path = (self.out / "manifest.json" if self.fmt == "eml-dir"
                              else self.out.with_name(self.out.name + ".manifest.json"))
        for path in (self.out, self.manifest_path):
            if path.exists() or path.is_symlink():
                raise ExportError(f"{path} exists; give a new name")
        if not self.out.parent.is_dir():
            raise ExportError(f"{self.out.parent} is not a directory")
        suffix = f".tmp-{os.getpid()}"
        self._tmp = self.out.with_name(f".{self.out.name}{suffix}")
        if self.fmt == "eml-dir":
            self._tmp.mkdir()
            self._mbox = None
        else:
            self._mbox = open(self._tmp, "wb")
        self._tmp_manifest = self.out.with_name(f".{self.out.name}.manifest.json{suffix}")

    def add(self, row: dict) -> None:
        """Add one archive row (decoded, in conversation order)."""
        archive_id = row["id"]
        base = {"archive_id": archive_id, "received_at": row["received_at"],
                "direction": row["direction"], "verdict": row["verdict"]}
        if row.get("purged_at"):
            self.omitted.append({**base, "reason": f"purged at {row['purged_at']} (past retention)"})
            return
        if row.get("decode_error"):
            raise ExportError(f"archive row {archive_id}: {row['decode_error']}; run `relay archive verify`")
        data = row["raw"] if self.as_ == "raw" else row["delivered"]
        if data is None:
            self.omitted.append({**base, "reason": f"no delivered bytes (verdict {row['verdict']})"})
            return
        digest = sha256_hex(data)
        if digest != row[f"{self.as_}_sha256"]:
            raise ExportError(f"archive row {archive_id} does not match its {self.as_}_sha256; "
                              "run `relay archive verify`")
        entry = {**base, "sha256": digest, "bytes": len(data),
                 "row_sha256": row["row_sha256"], "prev_sha256": row["prev_sha256"]}
        if self.fmt == "eml-dir":
            name = f"{len(self.messages) + 1:04d}-archive-{archive_id}.eml"
            _write_file(self._tmp / name, data)
            entry["file"] = name
        else:
            self._mbox.write(mbox_entry(data, row["received_at"]))
            entry["mbox_index"] = len(self.messages)
        self.messages.append(entry)

    def finish(self) -> dict:
        manifest = {
            **self.header,
            "format": self.fmt,
            "as": self.as_,
            "messages": self.messages,
            "omitted": self.omitted,
            "note": ("sha256 is over each message's bytes as archived. The .eml files are those bytes "
                     "exactly; in an mbox, lines end in LF and a line starting 'From ' has one more '>' "
                     "(mboxrd). The raw bytes are the sender's own, so its DKIM signature still verifies. "
                     "Check the chain with `relay archive verify`."),
        }
        text = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")
        if self.fmt == "eml-dir":
            _write_file(self._tmp / "manifest.json", text)
            _fsync_dir(self._tmp)
            os.rename(self._tmp, self.out)
        else:
            self._mbox.flush()
            os.fsync(self._mbox.fileno())
            self._mbox.close()
            _write_file(self._tmp_manifest, text)
            os.rename(self._tmp_manifest, self.manifest_path)
            os.rename(self._tmp, self.out)
        _fsync_dir(self.out.parent)
        return manifest

    def abort(self) -> None:
        if self._mbox is not None and not self._mbox.closed:
            self._mbox.close()
        if self._tmp.is_dir():
            shutil.rmtree(self._tmp, ignore_errors=True)
        else:
            self._tmp.unlink(missing_ok=True)
        self._tmp_manifest.unlink(missing_ok=True)


def write_atomically(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old one or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        _write_file(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


# --- response time -----------------------------------------------------------------------

ANSWER_WITHIN = timedelta(hours=24)
# Histogram buckets (upper bound inclusive, seconds); None is "longer".
BUCKETS = (
    ("≤ 1 h", 3600), ("1–4 h", 4 * 3600), ("4–12 h", 12 * 3600), ("12–24 h", 24 * 3600),
    ("24–48 h", 48 * 3600), ("2–7 d", 7 * 86400), ("> 7 d", None),
)


@dataclass(frozen=True)
class MessageFact:
    """What the report needs of one delivered archive row."""

    archive_id: int
    relationship_id: int
    seller: str
    direction: str
    received_at: datetime
    auto_reply: bool = False
    bounced: bool = False  # a delivery report said it failed: it never reached the other side


@dataclass(frozen=True)
class Waiting:
    archive_id: int
    relationship_id: int
    received_at: datetime
    waiting_seconds: float
    overdue: bool  # waiting longer than 24 hours


@dataclass
class SellerResponse:
    seller: str
    name: str = ""
    buyer_messages: int = 0
    answered_within: int = 0  # within 24 hours
    answered_late: int = 0
    response_seconds: list[float] = field(default_factory=list)
    waiting: list[Waiting] = field(default_factory=list)
    bounced: int = 0  # buyer messages that bounced: never in the seller's inbox, so never waiting

    @property
    def overdue(self) -> int:
        return sum(1 for w in self.waiting if w.overdue)

    @property
    def due(self) -> int:
        """Buyer messages that have had their 24 hours: the share's denominator."""
        return self.answered_within + self.answered_late + self.overdue

    @property
    def share_within(self) -> float | None:
        return self.answered_within / self.due if self.due else None

    @property
    def median_seconds(self) -> float | None:
        return percentile(self.response_seconds, 0.5)

    @property
    def p90_seconds(self) -> float | None:
        return percentile(self.response_seconds, 0.9)

    def histogram(self) -> list[tuple[str, int]]:
        counts = [0] * len(BUCKETS)
        for seconds in self.response_seconds:
            counts[bucket_index(seconds)] += 1
        return [(label, count) for (label, _), count in zip(BUCKETS, counts)]

    def to_json(self) -> dict:
        return {
            "seller": self.seller,
            "name": self.name,
            "buyer_messages": self.buyer_messages,
            "answered_within_24h": self.answered_within,
            "answered_later": self.answered_late,
            "overdue": self.overdue,
            "waiting": len(self.waiting),
            "due": self.due,
            "bounced": self.bounced,
            "share_within_24h": None if self.share_within is None else round(self.share_within, 4),
            "median_seconds": _round(self.median_seconds),
            "p90_seconds": _round(self.p90_seconds),
            "histogram": [{"bucket": label, "count": count} for label, count in self.histogram()],
            "waiting_messages": [
                {"archive_id": w.archive_id, "relationship": w.relationship_id, "received_at": iso(w.received_at),
                 "waiting_seconds": _round(w.waiting_seconds), "overdue": w.overdue}
                for w in self.waiting
            ],
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def bucket_index(seconds: float) -> int:
    for index, (_, bound) in enumerate(BUCKETS):
        if bound is None or seconds <= bound:
            return index
    return len(BUCKETS) - 1  # pragma: no cover


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default): the
    median of [1, 2, 3, 4] is 2.5; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def response_times(facts: Iterable[MessageFact], now: datetime, since: datetime | None = None,
                   names: dict[str, str] | None = None, sellers: Iterable[str] = ()) -> list[SellerResponse]:
    """Per seller: which buyer messages were answered, how fast, and which wait.

    A buyer message (not an auto-reply, received at or after `since`) is
    answered by the first later seller message in the same relationship
    that is not an auto-reply; every buyer message waiting at that moment
    is answered by it. Within 24 hours means at most 24 hours. Facts after
    `now` are ignored. `sellers` are reported even with no messages.
    """
    names = names or {}
    report: dict[str, SellerResponse] = {s: SellerResponse(s, names.get(s, "")) for s in sellers}
    by_relationship: dict[int, list[MessageFact]] = {}
    for fact in facts:
        if fact.received_at <= now:
            by_relationship.setdefault(fact.relationship_id, []).append(fact)
    for relationship_id, items in by_relationship.items():
        items.sort(key=lambda f: (f.received_at, f.archive_id))
        pending: list[MessageFact] = []
        for fact in items:
            if fact.auto_reply:
                continue
            if fact.direction == "buyer_to_seller":
                if since is not None and fact.received_at < since:
                    continue
                if fact.bounced:
                    # The seller's mailbox refused it: nothing to answer, and
                    # the buyer was told by the bounce notice.
                    _seller(report, fact.seller, names).bounced += 1
                else:
                    pending.append(fact)
            elif fact.direction == "seller_to_buyer" and pending:
                seller = _seller(report, fact.seller, names)
                for asked in pending:
                    elapsed = (fact.received_at - asked.received_at).total_seconds()
                    seller.buyer_messages += 1
                    seller.response_seconds.append(elapsed)
                    if elapsed <= ANSWER_WITHIN.total_seconds():
                        seller.answered_within += 1
                    else:
                        seller.answered_late += 1
                pending = []
        for asked in pending:
            seller = _seller(report, asked.seller, names)
            waited = (now - asked.received_at).total_seconds()
            seller.buyer_messages += 1
            seller.waiting.append(Waiting(asked.archive_id, relationship_id, asked.received_at, waited,
                                          waited > ANSWER_WITHIN.total_seconds()))
    for seller in report.values():
        seller.waiting.sort(key=lambda w: (w.received_at, w.archive_id))
    return sorted(report.values(), key=lambda s: natural_key(s.seller))


def natural_key(text: str) -> list:
    """Sorts `seller2` before `seller10`: digit runs compare as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part.lower())
            for part in re.split(r"(\d+)", text) if part]


def readable(moment: datetime) -> str:
    """A time for a person: `2026-03-02 09:00 UTC` (the JSON keeps ISO 8601)."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def all_sellers(sellers: list[SellerResponse]) -> SellerResponse:
    """Every seller's answers and waiting messages as one, for the chart."""
    total = SellerResponse("all sellers")
    for s in sellers:
        total.buyer_messages += s.buyer_messages
        total.answered_within += s.answered_within
        total.answered_late += s.answered_late
        total.bounced += s.bounced
        total.response_seconds += s.response_seconds
        total.waiting += s.waiting
    return total


def _seller(report: dict[str, SellerResponse], address: str, names: dict[str, str]) -> SellerResponse:
    if address not in report:
        report[address] = SellerResponse(address, names.get(address, ""))
    return report[address]


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def format_share(share: float | None) -> str:
    return "–" if share is None else f"{share * 100:.1f}%"


def report_json(sellers: list[SellerResponse], now: datetime, since: str | None) -> dict:
    return {"as_of": iso(now), "since": since, "answer_within_hours": 24,
            "sellers": [seller.to_json() for seller in sellers]}


def render_text(sellers: list[SellerResponse], now: datetime, since: str | None) -> str:
    lines = [f"Response times as of {readable(now)}" + (f", buyer messages since {since}" if since else "")
             + ": share of buyer messages answered within 24 h"]
    if not sellers:
        lines.append("no buyer messages")
        return "\n".join(lines) + "\n"
    width = max(len("seller"), *(len(s.seller) for s in sellers))
    lines.append(f"{'seller':<{width}}  {'within 24 h':>17}  {'median':>12}  {'90th pct':>12}  {'waiting':>7}"
                 "  overdue  bounced")
    for s in sellers:
        within = f"{s.answered_within}/{s.due} {format_share(s.share_within):>6}"
        lines.append(f"{s.seller:<{width}}  {within:>17}  {format_duration(s.median_seconds):>12}"
                     f"  {format_duration(s.p90_seconds):>12}  {len(s.waiting):>7}  {s.overdue:>7}  {s.bounced}")
    for s in sellers:
        for w in s.waiting:
            lines.append(f"  waiting: {s.seller} archive {w.archive_id} (relationship {w.relationship_id}),"
                         f" received {readable(w.received_at)}, for {format_duration(w.waiting_seconds)}"
                         + (" OVERDUE" if w.overdue else ""))
    return "\n".join(lines) + "\n"


# Colours: answered in time, answered late, waiting (not yet / over 24 h).
_GREEN, _RED, _GREY, _DARK_GREY = "#2e7d32", "#c62828", "#bdbdbd", "#616161"


def svg_chart(seller: SellerResponse) -> str:
    """A bar chart of the seller's response times by bucket (green within
    24 hours, red later), then the messages still waiting (light grey: for
    less than 24 hours, dark grey: overdue), with a dashed line at 24 hours
    and a legend. Static SVG: no script, no external reference, every text
    escaped."""
    overdue = seller.overdue
    bars = [(label, count, _GREEN if index < 4 else _RED)
            for index, (label, count) in enumerate(seller.histogram())]
    bars += [("waiting", len(seller.waiting) - overdue, _GREY), ("overdue", overdue, _DARK_GREY)]
    width, height = 640, 290
    left, right, top, bottom = 48, 16, 50, 66
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max([count for _, count, _ in bars] + [1])
    step = _nice_step(peak)
    scale_max = step * (peak // step + 1)  # headroom for the count above the tallest bar
    slot = plot_w / len(bars)
    bar_w = slot * 0.7
    base = top + plot_h
    title = (f"{seller.seller}: {format_share(seller.share_within)} answered within 24 h "
             f"({seller.answered_within} of {seller.due})")
    e = html.escape
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{e(title)}" '
           'font-family="sans-serif" font-size="12">',
           f"<title>{e(title)}</title>",
           f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
           f'<text x="{left}" y="20" font-size="14" font-weight="bold">{e(title)}</text>']
    tick = 0
    while tick <= scale_max:
        y = base - plot_h * tick / scale_max
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" stroke="#eeeeee"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#555555">{tick}</text>')
        tick += step
    for index, (label, count, colour) in enumerate(bars):
        x = left + slot * index + (slot - bar_w) / 2
        bar_h = plot_h * count / scale_max
        out.append(f'<rect x="{x:.1f}" y="{base - bar_h:.1f}" width="{bar_w:.1f}" height="{bar_h:.1f}" '
                   f'fill="{colour}"><title>{e(label)}: {count}</title></rect>')
        if count:
            out.append(f'<text x="{x + bar_w / 2:.1f}" y="{base - bar_h - 4:.1f}" text-anchor="middle">{count}</text>')
        out.append(f'<text x="{x + bar_w / 2:.1f}" y="{base + 16:.1f}" text-anchor="middle" '
                   f'fill="#333333">{e(label)}</text>')
    out.append(f'<line x1="{left}" y1="{base}" x2="{width - right}" y2="{base}" stroke="#333333"/>')
    # The 24-hour line: between the last bucket within 24 h and the first
    # later one; and between the answered and the waiting.
    for boundary, text in ((4, "24 h"), (7, "")):
        line_x = left + slot * boundary
        out.append(f'<line x1="{line_x:.1f}" y1="{top - 12}" x2="{line_x:.1f}" y2="{base}" '
                   f'stroke="{"#000000" if text else "#9e9e9e"}" stroke-dasharray="4 3"/>')
        if text:
            out.append(f'<text x="{line_x:.1f}" y="{top - 16}" text-anchor="middle">{text}</text>')
    x = left
    legend_y = height - 14
    for colour, text in ((_GREEN, "answered within 24 h"), (_RED, "answered later"),
                         (_GREY, "waiting"), (_DARK_GREY, "waiting over 24 h")):
        out.append(f'<rect x="{x}" y="{legend_y - 10}" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{x + 14}" y="{legend_y}" fill="#333333">{text}</text>')
        x += 14 + 7 * len(text) + 18
    out.append(f'<text x="{left + plot_w / 2:.1f}" y="{base + 34:.1f}" text-anchor="middle" fill="#555555">'
               "time from the buyer's message to the seller's answer</text>")
    out.append("</svg>")
    return "\n".join(out)


def _share_bar(seller: SellerResponse) -> str:
    """A seller's due messages as one small stacked bar (CSS, no image):
    green within 24 h, red later, dark grey still waiting past 24 h."""
    if not seller.due:
        return '<span class="bar" role="img" aria-label="nothing due"></span>'
    spans = "".join(f'<span style="width:{100 * count / seller.due:.1f}%;background:{colour}"></span>'
                    for count, colour in ((seller.answered_within, _GREEN), (seller.answered_late, _RED),
                                          (seller.overdue, _DARK_GREY)) if count)
    return (f'<span class="bar" role="img" aria-label="{format_share(seller.share_within)} within 24 h">'
            f"{spans}</span>")


def _nice_step(peak: int) -> int:
    for step in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000):
        if peak / step <= 6:
            return step
    return 10 ** len(str(peak))


def render_html(sellers: list[SellerResponse], now: datetime, since: str | None) -> str:
    """One self-contained page: a summary, one chart of every seller's
    answers together, a table with a row and a small bar per seller, and
    the waiting messages. Its size grows by one table row per seller, not
    by a chart each (5,000 sellers stay a page a browser opens). No
    JavaScript (and a Content-Security-Policy that forbids it), no external
    resources, so it opens from a file or an attachment."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
        "img-src data:\">",
        "<title>Seller response times</title>",
        "<style>body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse}"
        "td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}td:first-child,th:first-child"
        "{text-align:left}section{margin:2em 0}.late{color:#c62828}.muted{color:#777}"
        ".bar{display:inline-flex;width:120px;height:10px;background:#f5f5f5;vertical-align:middle}"
        ".bar span{display:block;height:10px}</style>",
        "</head><body>",
        "<h1>Seller response times</h1>",
        f'<p class="muted">As of {e(readable(now))}' + (f"; buyer messages since {e(since)}" if since else "")
        + ". A buyer message is answered by the seller's next message in the same conversation; "
          "auto-replies neither count nor answer, and a message that bounced (it never reached the "
          "seller) does not wait. Within 24 h means at most 24 hours.</p>",
    ]
    if not sellers:
        parts.append("<p>No buyer messages.</p>")
    else:
        total = all_sellers(sellers)
        parts.append(f"<section><h2>All {len(sellers)} seller(s)</h2>")
        parts.append(f"<p>{total.answered_within} of {total.due} buyer messages answered within 24 h "
                     f"({e(format_share(total.share_within))}); median {e(format_duration(total.median_seconds))}, "
                     f"90th percentile {e(format_duration(total.p90_seconds))}; {len(total.waiting)} waiting, "
                     f"{total.overdue} of them over 24 h; {total.bounced} bounced.</p>")
        parts.append(svg_chart(total))
        parts.append("</section>")
        parts.append("<table><tr><th>seller</th><th>answered within 24 h</th><th></th><th>median</th>"
                     "<th>90th percentile</th><th>waiting</th><th>overdue</th><th>bounced</th></tr>")
        for s in sellers:
            label = s.seller + (f" ({s.name})" if s.name else "")
            parts.append(f"<tr><td>{e(label)}</td><td>{s.answered_within} of {s.due} "
                         f"({e(format_share(s.share_within))})</td><td>{_share_bar(s)}</td>"
                         f"<td>{e(format_duration(s.median_seconds))}</td>"
                         f"<td>{e(format_duration(s.p90_seconds))}</td><td>{len(s.waiting)}</td>"
                         f"<td>{s.overdue}</td><td>{s.bounced}</td></tr>")
        parts.append("</table>")
    waiting = sorted(((s, w) for s in sellers for w in s.waiting), key=lambda sw: (sw[1].received_at, sw[1].archive_id))
    if waiting:
        parts.append("<section><h2>Waiting for an answer, oldest first</h2>")
        parts.append("<table><tr><th>seller</th><th>archive id</th><th>relationship</th><th>received</th>"
                     "<th>waiting for</th></tr>")
        for s, w in waiting:
            row_class = ' class="late"' if w.overdue else ""
            parts.append(f"<tr{row_class}><td>{e(s.seller)}</td><td>{w.archive_id}</td>"
                         f"<td>{w.relationship_id}</td><td>{e(readable(w.received_at))}</td>"
                         f"<td>{e(format_duration(w.waiting_seconds))}</td></tr>")
        parts.append("</table></section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"

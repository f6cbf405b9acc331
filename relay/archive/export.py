"""`relay archive export`: one conversation written as an mbox or a folder
of .eml files with a manifest, atomically (all or nothing at the destination)."""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from relay import private
from relay.archive.chain import sha256_hex
from relay.archive.times import parse_iso

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
            self._tmp.mkdir(mode=private.DIR_MODE)
            self._mbox = None
        else:
            self._mbox = private.open_new(self._tmp, exclusive=True)
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
    tmp.unlink(missing_ok=True)  # a left-over keeps its old mode under O_TRUNC
    try:
        _write_file(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_file(path: Path, data: bytes) -> None:
    # 0600 from the start, like the database the messages come from: an
    # export holds the parties' real addresses (relay/private.py).
    with private.open_new(path) as handle:
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

"""A message as received, held by the event loop's process while a worker
processes it: in memory, or in a temporary file once a worker has it.

The event loop's process needs the bytes as received twice: for the
inbound SPF/DKIM/DMARC check and to hand them to a worker. After that, only
if the archive must compress them itself: a message refused or deferred
after the worker read it, or one whose archive form the worker could not
make. A worker makes the archive form of every delivered message, so for
those the bytes are never read again. Holding a 10 MB message in the event
loop's process meanwhile would put a second copy of it in memory next to
the worker's, at the moment the worker's own use is highest (docs/benchmark.md):
so a big message is written to an unlinked temporary file (`TMPDIR`, like
postfix's queue files on disk, not memory) and dropped, and read back only
if asked for. Small messages stay in memory: a file would cost more than it
saves.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile

log = logging.getLogger("relay.spool")

# Smaller messages stay in memory (most mail is a few kilobytes).
SPOOL_MIN_OCTETS = 1 << 20


class HeldMessage:
    """The bytes of one message as received (`size` octets)."""

    def __init__(self, raw: bytes):
        self.size = len(raw)
        self._raw: bytes | None = raw
        self._file = None

    @property
    def raw(self) -> bytes:
        """The bytes, while they are in memory (before `spill`)."""
        if self._raw is None:
            raise RuntimeError("the message was spilled to its file: read() it")
        return self._raw

    async def spill(self) -> None:
        """Keep a big message in a temporary file from now on, not in
        memory (a small one stays where it is)."""
        if self._raw is None or self.size < SPOOL_MIN_OCTETS:
            return
        try:
            self._file = await asyncio.to_thread(_written, self._raw)
        except OSError as exc:  # a full or unwritable TMPDIR: a saving lost, never the message
            log.warning("message of %d bytes kept in memory: temporary file failed: %s", self.size, exc)
            return
        self._raw = None

    async def read(self) -> bytes:
        """The bytes, from memory or from the file."""
        if self._raw is not None:
            return self._raw
        return await asyncio.to_thread(_read, self._file)

    def close(self) -> None:
        """Drop the bytes and the file (the file has no name: closing it
        frees its space)."""
        self._raw = None
        if self._file is not None:
            self._file.close()
            self._file = None


def _written(data: bytes):
    spool = tempfile.TemporaryFile(prefix="relay-message-")
    try:
        spool.write(data)
        spool.flush()
    except BaseException:
        spool.close()
        raise
    return spool


def _read(spool) -> bytes:
    spool.seek(0)
    return spool.read()

"""Progress of a long CLI command (archive verify, purge, db migrate-to) on
the operator's terminal.

One line on stderr, rewritten in place (carriage return), and finished
with a newline; written only when stderr is a terminal and the command was
not asked for --json, so pipes, cron mail and scripts see nothing of it.
Redrawn at most ten times a second: a million-row verify calls `update`
a million times.
"""

from __future__ import annotations

import sys
import time
import typing

REDRAW_SECONDS = 0.1


class Progress:
    def __init__(self, label: str, *, quiet: bool = False, stream: typing.TextIO | None = None,
                 unit: str = "row(s)"):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = not quiet and _is_terminal(self.stream)
        self.label = label
        self.unit = unit
        self.count = 0
        self.detail = ""
        self._drawn = 0.0
        self._width = 0

    def update(self, count: int, detail: str = "") -> None:
        """`count` done so far (of the current `detail`, e.g. a table)."""
        self.count, self.detail = count, detail
        if self.enabled and time.monotonic() - self._drawn >= REDRAW_SECONDS:
            self._draw()

    def add(self, n: int = 1) -> None:
        self.update(self.count + n, self.detail)

    def done(self) -> None:
        """Draw the final count and end the line."""
        if self.enabled:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
            self.enabled = False

    def _draw(self) -> None:
        detail = f" {self.detail}:" if self.detail else ""
        text = f"{self.label}:{detail} {self.count:,} {self.unit}"
        # Pad over a longer previous line (a longer table name, say).
        self.stream.write("\r" + text.ljust(self._width))
        self.stream.flush()
        self._width = len(text)
        self._drawn = time.monotonic()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.done()


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False

"""Reading an archived message's header section: whether a machine sent it
(auto-replies), and what the rewrite changed between raw and delivered."""

from __future__ import annotations

from email import policy as email_policy
from email.parser import BytesHeaderParser

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
    return _not_matched(before, after), _not_matched(after, before)


def _not_matched(lines: list[str], others: list[str]) -> list[str]:
    """The lines of `lines` left over when each line of `others` cancels one
    equal line (a multiset difference that keeps `lines`' order)."""
    unmatched = list(others)
    left = []
    for line in lines:
        if line in unmatched:
            unmatched.remove(line)
        else:
            left.append(line)
    return left

"""Bounces: signed VERP return paths, reading DSNs, and the notices they cause.

Every delivered message goes upstream with the envelope sender
``bounce+<id>.<expiry>.<mac>@<domain>``: `<id>` is the hex of the relay's
Message-ID for it, `<expiry>` the last valid day (days since 1970, hex), and
`<mac>` an HMAC-SHA256 of both under a secret of the relay's (truncated to
80 bits). So a delivery failure comes back to the relay, never to the real
sender; a forged or stale bounce address is refused; and the id says which
message failed without any lookup table.

A delivery report to such an address is read in two ways: a DSN (RFC 3464:
multipart/report with a message/delivery-status part) by its own fields;
anything else (old postfix, qmail, Exim, Yahoo, Microsoft and the other
formats seen in the wild) by Mailman's bounce detectors, `flufl.bounce`.
A permanent failure becomes a short notice to the original sender from
``mailer-daemon@<domain>``: the message to the alias could not be delivered,
and why in general terms (RFC 3463 status classes). No real address and no
word of the remote server's text (which may quote one) is repeated. A delay
is recorded and answered with nothing.

Every real bounce is automatic (postfix and Exim write `Auto-Submitted:
auto-replied`, others `Precedence: bulk`), so the report's own headers never
suppress the notice; only an automatic *original* message does (the handler
checks that against the archive).
"""

from __future__ import annotations

import base64
import email
import email.policy
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path

from flufl.bounce import _scan as flufl_scan

from relay import private
from relay.pipeline.message import POLICY, content_type, parse, raw_values
from relay.replies import SmtpError

PREFIX = "bounce+"
_LOCAL_RE = re.compile(r"^bounce\+([0-9a-f]{32})\.([0-9a-f]{1,6})\.([a-z2-7]{16})$")
_STATUS_RE = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")
_COMMENT_RE = re.compile(r"\([^()]*\)")
RFC3464 = "rfc3464"


class InvalidBounceAddress(Exception):
    """Not one of ours, altered, or expired."""


def secret_path(config) -> Path:
    """`[bounce] secret_file`, or var/bounce.key when it is empty."""
    return Path(config.bounce.secret_file) if config.bounce.secret_file else config.state_dir / "bounce.key"


def load_secret(config) -> bytes:
    """The HMAC key: `[bounce] secret_file`, or var/bounce.key made now."""
    path = secret_path(config)
    if not path.exists():
        try:
            private.write(path, secrets.token_bytes(32), exclusive=True)
        except FileExistsError:
            pass  # another node on this state folder made it first: use that one
    return path.read_bytes()


def secret_path(config) -> Path:
    return Path(config.bounce.secret_file) if config.bounce.secret_file else config.state_dir / "bounce.key"


def _day(moment: datetime) -> int:
    return int(moment.timestamp() // 86400)


def _mac(secret: bytes, payload: str) -> str:
    digest = hmac.new(secret, payload.encode("ascii"), hashlib.sha256).digest()[:10]
    return base64.b32encode(digest).decode("ascii").lower()


def make_address(relay_message_id: str, domain: str, secret: bytes, now: datetime, lifetime_days: int) -> str:
    hex_id = relay_message_id.strip("<>").split("@", 1)[0]
    payload = f"{hex_id}.{_day(now) + lifetime_days:x}"
    return f"{PREFIX}{payload}.{_mac(secret, payload)}@{domain}"


def is_bounce_local(local: str) -> bool:
    return local.startswith(PREFIX)


def parse_address(local: str, domain: str, secret: bytes, now: datetime) -> str:
    """The relay Message-ID the bounce address stands for; raises
    InvalidBounceAddress if it is malformed, forged or expired."""
    match = _LOCAL_RE.match(local)
    if match is None:
        raise InvalidBounceAddress("malformed")
    hex_id, expiry, mac = match.groups()
    if not hmac.compare_digest(mac, _mac(secret, f"{hex_id}.{expiry}")):
        raise InvalidBounceAddress("bad signature")
    if _day(now) > int(expiry, 16):
        raise InvalidBounceAddress("expired")
    return f"<{hex_id}@{domain}>"


@dataclass(frozen=True)
class DeliveryReport:
    action: str  # failed, delayed, delivered, relayed, expanded
    status: str  # e.g. "5.1.1", or "" when the report gives none
    detector: str = RFC3464


def _field(block, name: str) -> str:
    """A DSN field's value without its RFC 822 comments: `Action: failed
    (Bad destination mailbox address)` is a failure."""
    value = (raw_values(block, name) or [""])[0]
    return _COMMENT_RE.sub(" ", value).strip()


def read_dsn(message: EmailMessage) -> list[DeliveryReport]:
    """The per-recipient reports of a DSN, or [] if it is no DSN."""
    if content_type(message) != "multipart/report":
        return []
    reports = []
    for part in message.walk():
        if content_type(part) not in ("message/delivery-status", "message/global-delivery-status"):
            continue
        # The parser reads a delivery-status body as a list of header blocks:
        # the per-message fields first, then one block per recipient.
        blocks = part.get_payload() if isinstance(part.get_payload(), list) else []
        for block in blocks[1:]:
            action = _field(block, "Action").lower().split(" ", 1)[0]
            status = _field(block, "Status").split(" ", 1)[0]
            if action:
                reports.append(DeliveryReport(action, status if _STATUS_RE.match(status) else ""))
    return reports


# RFC 3463 subjects, in words a buyer or seller understands.
_SUBJECTS = {
    "1": "the recipient's address was not accepted",
    "2": "the recipient's mailbox is unavailable or full",
    "3": "the recipient's mail system could not accept the message",
    "4": "the message could not be routed to the recipient",
    "5": "the recipient's mail system reported a protocol error",
    "6": "the recipient's mail system could not accept the message's content",
    "7": "the recipient's mail system refused the message for policy or security reasons",
}


def reason(status: str) -> str:
    match = _STATUS_RE.match(status or "")
    return _SUBJECTS.get(match.group(2) if match else "", "the recipient's mail system refused the message")


def notice(domain: str, to_name: str, to_address: str, alias: str, sent_at: str, status: str,
           message_id: str, now: datetime) -> bytes:
    """The notice to the original sender, as bytes ready to deliver."""
    msg = EmailMessage(policy=POLICY)
    msg["From"] = Address(display_name="Mail Delivery System", addr_spec=f"mailer-daemon@{domain}")
    msg["To"] = Address(display_name=to_name, addr_spec=to_address)
    msg["Subject"] = f"Undelivered: your message to {alias}"
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = message_id
    msg["Auto-Submitted"] = "auto-replied"
    msg.set_content(
        f"Your message to {alias}, sent {sent_at}, could not be delivered:\n"
        f"{reason(status)}{f' (status {status})' if status else ''}.\n\n"
        "You may try again later, or contact the marketplace's support.\n"
        "This notice was sent automatically; replies to it are not read.\n")
    return msg.as_bytes()


def detect_plain(raw: bytes) -> list[DeliveryReport]:
    """A bounce that is no RFC 3464 DSN, by Mailman's detectors in their own
    order (most specific first; the first that recognises anything wins, as
    in `flufl.bounce.scan_message`). The detectors are run one by one, not
    through `all_failures()`, so the archive can say which one it was. They
    read the compat32 `Message` they were written for. A permanent failure
    is `failed`, a warning `delayed`; the addresses they find are not kept
    (the VERP address already says which message bounced)."""
    message = email.message_from_bytes(raw, policy=email.policy.compat32)
    for detector in flufl_scan._DETECTORS:
        try:
            temporary, permanent = detector().process(message)
        except Exception:  # a heuristic tripping over hostile input is no verdict
            continue
        name = detector.__name__.lower()
        if permanent:
            return [DeliveryReport("failed", "", name)]
        if temporary:
            return [DeliveryReport("delayed", "", name)]
    return []


def read_report(raw: bytes) -> list[DeliveryReport]:
    """In a worker process: the per-recipient reports of a delivery report,
    from its delivery-status part, else from the plain-text detectors.
    Unreadable, or not a bounce at all (a vacation reply) → []."""
    try:
        reports = read_dsn(parse(raw))
    except SmtpError:
        reports = []
    return reports or detect_plain(raw)


def auto_submitted(message: EmailMessage) -> bool:
    """RFC 3834: anything but `Auto-Submitted: no` (or none) is automatic;
    `Precedence: bulk|junk|list` is the older convention for the same."""
    values = [v.strip().lower() for v in raw_values(message, "Auto-Submitted")]
    if any(v and not v.startswith("no") for v in values):
        return True
    return any(v.strip().lower() in ("bulk", "junk", "list") for v in raw_values(message, "Precedence"))


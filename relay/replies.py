"""SMTP replies: the catalogue of every answer the relay gives.

A `Reply` is a value (code, enhanced status code per RFC 3463, text); the
handler is the only place that turns one into a line on the wire. Stages and
lookups that refuse a message raise `SmtpError` carrying the Reply. Texts
never name a party's real address.

Classes follow DESIGN §7: lookup, network and storage failures are 4xx;
policy decisions are 5xx.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str
    text: str

    def __post_init__(self) -> None:
        # The class digit of the enhanced code must agree with the reply code
        # (RFC 3463 §2): a 4xx reply with a 5.x.x code confuses clients.
        assert str(self.code)[0] == self.enhanced[0], (self.code, self.enhanced)
        assert "\r" not in self.text and "\n" not in self.text

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def with_text(self, text: str) -> "Reply":
        return Reply(self.code, self.enhanced, text)

    def line(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"

    __str__ = line


class SmtpError(Exception):
    """Raised to end a transaction (or refuse a recipient) with `reply`."""

    def __init__(self, reply: Reply):
        super().__init__(reply.line())
        self.reply = reply

    def __reduce__(self):  # pickled as itself, not as its message text (worker processes)
        return (SmtpError, (self.reply,))


# --- success ----------------------------------------------------------------
SENDER_OK = Reply(250, "2.1.0", "Sender ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient ok")
RECIPIENT_DUPLICATE = Reply(250, "2.1.5", "Recipient ok (already given)")
DELIVERED = Reply(250, "2.0.0", "Message accepted for delivery")

# --- RCPT -------------------------------------------------------------------
NOT_OUR_DOMAIN = Reply(550, "5.1.1", "Recipient address rejected: not an alias of this relay")
UNKNOWN_ALIAS = Reply(550, "5.1.1", "Recipient address rejected: no such alias")
NOT_COUNTERPART = Reply(550, "5.7.1", "Sender is not permitted to write to this alias")
OTHER_RELATIONSHIP = Reply(
    452, "4.5.3", "Too many recipients: send to this alias in a separate transaction"
)
RELAY_DENIED = Reply(550, "5.7.1", "Relaying denied: write to your buyers' aliases only")
NOT_YOUR_BUYER = Reply(550, "5.7.1", "This alias is not one of your buyers")
DAILY_CAP = Reply(450, "4.7.1", "Daily sending limit reached")
BOUNCE_ADDRESS_INVALID = Reply(550, "5.1.1", "Recipient address rejected: invalid or expired bounce address")
BOUNCE_ACCEPTED = Reply(250, "2.0.0", "Delivery report accepted")
LOOKUP_FAILED = Reply(451, "4.3.0", "Temporary lookup failure, try again later")

# --- listener limits (issue 8) ------------------------------------------------
TOO_MANY_CONNECTIONS = Reply(421, "4.3.2", "Too many connections, try again later")
TOO_MANY_CONNECTIONS_FROM_IP = Reply(421, "4.7.0", "Too many connections from your address, try again later")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
IDLE_TIMEOUT = Reply(421, "4.4.2", "Timeout waiting for input, closing connection")
DATA_TIMEOUT = Reply(421, "4.4.2", "Message transfer took too long, closing connection")
SESSION_TIMEOUT = Reply(421, "4.4.2", "Session time limit reached, closing connection")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long: at most 65536 octets per line")
BARE_LINE_ENDING = Reply(
    550, "5.6.11", "Bare CR or LF in message: lines must end with CRLF (RFC 5321 section 2.3.8)")
BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")
NEED_RCPT = Reply(503, "5.5.1", "Need RCPT command")
DATA_SYNTAX = Reply(501, "5.5.4", "Syntax: DATA")

# --- XFORWARD (postfix) ----------------------------------------------------
XFORWARD_OK = Reply(250, "2.0.0", "Ok")
XFORWARD_DENIED = Reply(550, "5.7.0", "XFORWARD not permitted from this host")
XFORWARD_IN_TRANSACTION = Reply(503, "5.5.1", "XFORWARD not allowed inside a mail transaction")
XFORWARD_BAD_ATTRIBUTE = Reply(501, "5.5.4", "Bad XFORWARD attribute")

# --- AUTH -------------------------------------------------------------------
AUTH_MALFORMED = Reply(501, "5.5.2", "Cannot parse the AUTH response")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode base64")
AUTH_TOO_MANY_FAILURES = Reply(421, "4.7.0", "Too many failed logins from your address, try again later")
AUTH_TEMPORARY_FAILURE = Reply(454, "4.7.0", "Temporary authentication failure")

# --- DATA: policy -------------------------------------------------------------
OPTED_OUT = Reply(550, "5.7.1", "buyer does not accept unsolicited messages")
OUTSIDE_PROACTIVE_WINDOW = Reply(550, "5.7.1", "Outside the contact window")
FROM_HEADER_MISSING = Reply(550, "5.7.1", "Message has no usable From header")
FROM_HEADER_MISMATCH = Reply(550, "5.7.1", "From header does not match the envelope sender")
UNPARSEABLE = Reply(554, "5.6.0", "Message could not be parsed: malformed MIME headers")
TOO_DEEPLY_NESTED = Reply(554, "5.6.0", "Message structure is nested too deeply or has too many parts")
ENCODED_MESSAGE_PART = Reply(
    554, "5.6.0", "An attached message must not have a transfer encoding (RFC 2046 section 5.2.1)")
TEXT_PART_TOO_BIG = Reply(552, "5.3.4", "A text part exceeds the size limit")
ATTACHMENT_NOT_ALLOWED = Reply(550, "5.7.1", "Attachment type not allowed")
ATTACHMENTS_TOO_BIG = Reply(552, "5.3.4", "Attachments exceed the size limit")
TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many hops: mail loop detected")
TOO_COMPLEX = Reply(554, "5.6.0", "Message too complex to process: it exceeded the time or memory limit")
# The database refused a value of the message (relay/store: StoreDataError).
# It would refuse it on every retry, so this is no 451; the store spells
# message-borne text so that it does not happen, and the log has the bug.
UNSTORABLE = Reply(554, "5.6.0", "Message holds data the relay cannot store")

# --- DATA: transient ----------------------------------------------------------
PROCESSING_TIMEOUT = Reply(451, "4.3.0", "Message took too long to process, try again later")
WORKERS_BUSY = Reply(451, "4.3.2", "Too busy to process the message now, try again later")
WORKER_LOST = Reply(451, "4.3.0", "Message processing was interrupted, try again later")
INTERNAL_ERROR = Reply(451, "4.3.0", "Internal error, try again later")
ARCHIVE_FAILED = Reply(451, "4.3.0", "Cannot archive the message now, try again later")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")

# --- upstream ---------------------------------------------------------------
UPSTREAM_UNAVAILABLE = Reply(451, "4.4.1", "Upstream mail server unavailable, try again later")
UPSTREAM_DEFERRED = Reply(451, "4.3.0", "Upstream mail server deferred the message, try again later")
UPSTREAM_NO_MAILBOX = Reply(550, "5.1.1", "Recipient mailbox unavailable")
MX_DNS_TEMPORARY = Reply(451, "4.4.3", "Cannot find the recipient's mail server now, try again later")
MX_NO_MAIL = Reply(550, "5.1.2", "The recipient's domain does not accept mail")
UPSTREAM_REJECTED = Reply(554, "5.0.0", "Upstream mail server rejected the message")
# The upstream's size limit is below ours (behind postfix: message_size_limit
# smaller than what `relay postfix-config` writes): the sender learns why.
UPSTREAM_TOO_BIG = Reply(552, "5.3.4", "Message too large for the upstream")

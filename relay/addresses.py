"""Email addresses: normalising, telling aliases apart, minting alias tokens.

Addresses are compared and stored in one normal form: surrounding space and
angle brackets removed, the whole address lower-cased (local parts are
case-sensitive in theory and never in practice, and a party must not be able
to dodge a check by changing case). An alias is ``<token>@<domain>`` where the
token is 80 random bits from `secrets` in lower-case base32: it reveals
nothing about either party and is stable for the life of the relationship.
"""

from __future__ import annotations

import base64
import re
import secrets

ALIAS_TOKEN_BYTES = 10  # 80 bits, encoded as 16 base32 characters
_ALIAS_TOKEN_RE = re.compile(r"^[a-z2-7]{16}$")
# A deliberately plain shape check for addresses given on the command line;
# mail from the wire is parsed by the email package, never by this.
_ADDRESS_RE = re.compile(r"^[^@\s<>\"(),;:\\\[\]]+@[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")


def normalize(address: str) -> str:
    """The canonical form used for storage and comparison."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    return address.lower()


def is_valid(address: str) -> bool:
    """True for an address fit to register as a party's real address."""
    return bool(_ADDRESS_RE.match(normalize(address))) and ".." not in address


def split(address: str) -> tuple[str, str]:
    """(local part, domain) of a normalised address; domain '' when absent."""
    local, at, domain = normalize(address).rpartition("@")
    if not at:
        return normalize(address), ""
    return local, domain


def new_alias_token() -> str:
    return base64.b32encode(secrets.token_bytes(ALIAS_TOKEN_BYTES)).decode("ascii").lower()


def is_alias_token(token: str) -> bool:
    return bool(_ALIAS_TOKEN_RE.match(token))


def new_message_id(domain: str) -> str:
    """A fresh Message-ID in the relay's domain, angle brackets included."""
    return f"<{secrets.token_hex(16)}@{domain}>"

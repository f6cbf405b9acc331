"""Sellers' submission credentials: hashing, checking, and brute-force throttling.

Passwords are stored only as scrypt hashes (the standard library's
`hashlib.scrypt`, memory-hard, with a random 16-byte salt per password),
in the self-describing form ``scrypt$n$r$p$salt$hash`` so that the cost can
be raised later without invalidating stored hashes. Checking costs tens of
milliseconds of CPU by design, so the handler runs it in a worker thread;
the comparison is constant-time.

`Throttle` slows password guessing without handing an attacker a lockout:
each failure in a row for an account or a client address doubles the delay
before the reply, up to a ceiling; an address that fails too often in the
window is refused outright (421) until the window passes. A right password
from an address that is not blocked is always accepted, so a seller whose
account is under attack from elsewhere can still log in.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
MAX_PASSWORD_BYTES = 1024
# A well-formed hash of a password no one has: checking an unknown account
# costs as much as checking a known one, so timing does not tell them apart.
_DUMMY_SALT = b"relay-dummy-salt"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                            maxmem=64 * 1024 * 1024, dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: bytes, stored: str | None) -> bool:
    """True if `password` matches `stored`; a missing or malformed hash
    costs the same work and fails."""
    if len(password) > MAX_PASSWORD_BYTES:
        return False
    try:
        scheme, n, r, p, salt, digest = (stored or "").split("$")
        n, r, p = int(n), int(r), int(p)
        salt_bytes, expected = base64.b64decode(salt), base64.b64decode(digest)
        assert scheme == "scrypt" and 2 <= n <= 2**20 and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16
    except (ValueError, AssertionError, TypeError):
        scheme, n, r, p, salt_bytes, expected = "scrypt", SCRYPT_N, SCRYPT_R, SCRYPT_P, _DUMMY_SALT, b""
    actual = hashlib.scrypt(password, salt=salt_bytes, n=n, r=r, p=p, maxmem=64 * 1024 * 1024,
                            dklen=len(expected) or 32)
    return bool(expected) and hmac.compare_digest(actual, expected)


@dataclass
class _Failures:
    count: int = 0
    times: list[float] = field(default_factory=list)


class Throttle:
    def __init__(self, delay: float, max_delay: float, max_failures: int, window: float,
                 clock=time.monotonic):
        self.delay = delay
        self.max_delay = max_delay
        self.max_failures = max_failures
        self.window = window
        self.clock = clock
        self._accounts: dict[str, _Failures] = {}
        self._addresses: dict[str, _Failures] = {}

    def _recent(self, table: dict[str, _Failures], key: str) -> _Failures:
        entry = table.setdefault(key, _Failures())
        horizon = self.clock() - self.window
        entry.times = [t for t in entry.times if t > horizon]
        if not entry.times:
            entry.count = 0
        return entry

    def blocked(self, address: str) -> bool:
        """Too many failures from this client address in the window."""
        return len(self._recent(self._addresses, address).times) >= self.max_failures

    def failure(self, account: str, address: str) -> float:
        """Record a failed attempt; return how long to wait before replying."""
        now = self.clock()
        streak = 0
        for table, key in ((self._accounts, account), (self._addresses, address)):
            entry = self._recent(table, key)
            entry.count += 1
            entry.times.append(now)
            streak = max(streak, entry.count)
        self._forget_old(now)
        return min(self.max_delay, self.delay * 2 ** (streak - 1))

    def success(self, account: str, address: str) -> None:
        self._accounts.pop(account, None)
        self._addresses.pop(address, None)

    def _forget_old(self, now: float) -> None:
        # Bounded memory under a spray of accounts/addresses.
        if len(self._accounts) + len(self._addresses) < 10000:
            return
        horizon = now - self.window
        for table in (self._accounts, self._addresses):
            for key in [k for k, v in table.items() if not v.times or v.times[-1] <= horizon]:
                del table[key]

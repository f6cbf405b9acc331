"""Password hashing and the brute-force throttle (time injected)."""

from __future__ import annotations

import pytest

from relay import auth


def test_hash_and_verify():
    stored = auth.hash_password("correct horse")
    assert stored.startswith("scrypt$16384$8$1$")
    assert auth.verify_password(b"correct horse", stored)
    assert not auth.verify_password(b"correct horsE", stored)
    assert auth.hash_password("correct horse") != stored  # salted


@pytest.mark.parametrize("stored", [None, "", "bcrypt$x", "scrypt$1$2$3$%%%$%%%", "scrypt$99999999$8$1$AA==$AA=="])
def test_malformed_or_missing_hash_fails(stored):
    assert auth.verify_password(b"anything", stored) is False


def test_overlong_password_fails_fast():
    stored = auth.hash_password("x" * 10)
    assert auth.verify_password(b"x" * (auth.MAX_PASSWORD_BYTES + 1), stored) is False


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_delays_grow_per_failure_and_are_capped():
    clock = FakeClock()
    throttle = auth.Throttle(delay=0.5, max_delay=4.0, max_failures=100, window=900, clock=clock)
    delays = [throttle.failure("sam@shop.example", "198.51.100.7") for _ in range(6)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_an_address_is_blocked_after_max_failures_until_the_window_passes():
    clock = FakeClock()
    throttle = auth.Throttle(delay=0.1, max_delay=1, max_failures=3, window=900, clock=clock)
    for n in range(3):
        assert not throttle.blocked("198.51.100.7")
        throttle.failure(f"user{n}@shop.example", "198.51.100.7")  # spraying accounts counts too
    assert throttle.blocked("198.51.100.7")
    assert not throttle.blocked("203.0.113.9")  # other addresses are not affected
    clock.now += 901
    assert not throttle.blocked("198.51.100.7")


def test_the_account_streak_slows_an_attacker_on_any_address_but_success_resets_it():
    clock = FakeClock()
    throttle = auth.Throttle(delay=1, max_delay=64, max_failures=100, window=900, clock=clock)
    for n in range(4):
        throttle.failure("sam@shop.example", f"198.51.100.{n}")
    # A fifth guess from yet another address still waits for the account's streak.
    assert throttle.failure("sam@shop.example", "192.0.2.1") == 16
    # The seller logs in (from an address that is not blocked): no lockout,
    # and the streak is forgotten.
    throttle.success("sam@shop.example", "203.0.113.5")
    assert throttle.failure("sam@shop.example", "203.0.113.5") == 1

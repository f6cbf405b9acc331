"""Address normalising and alias tokens."""

from __future__ import annotations

import re

import pytest

from relay import addresses


@pytest.mark.parametrize("raw, normal", [
    ("Bea@Mail.Example", "bea@mail.example"),
    ("<bea@mail.example>", "bea@mail.example"),
    ("  < BEA@mail.example >  ", "bea@mail.example"),
    ("", ""),
    ("<>", ""),
])
def test_normalize(raw, normal):
    assert addresses.normalize(raw) == normal


@pytest.mark.parametrize("address, valid", [
    ("bea@mail.example", True),
    ("bea.b+tag@sub.mail.example", True),
    ("bea", False),
    ("bea@", False),
    ("@mail.example", False),
    ("bea@@mail.example", False),
    ("bea smith@mail.example", False),
    ("<bea>@mail.example", False),
    ("bea@mail..example", False),
    ("bea@-mail.example", False),
])
def test_is_valid(address, valid):
    assert addresses.is_valid(address) is valid


def test_split():
    assert addresses.split("Bea@Mail.Example") == ("bea", "mail.example")
    assert addresses.split("postmaster") == ("postmaster", "")
    assert addresses.split('"a@b"@mail.example') == ('"a@b"', "mail.example")


def test_alias_tokens_are_random_lowercase_and_80_bits():
    tokens = {addresses.new_alias_token() for _ in range(2000)}
    assert len(tokens) == 2000
    for token in tokens:
        assert re.fullmatch(r"[a-z2-7]{16}", token)  # 16 base32 chars = 80 bits
        assert addresses.is_alias_token(token)
    assert addresses.ALIAS_TOKEN_BYTES * 8 >= 64


@pytest.mark.parametrize("token", ["", "postmaster", "AAAAAAAAAAAAAAAA", "aaaaaaaaaaaaaaa1", "a" * 17])
def test_not_alias_tokens(token):
    assert not addresses.is_alias_token(token)


def test_message_ids_are_fresh_and_in_our_domain():
    ids = {addresses.new_message_id("marketplace.example") for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"<[0-9a-f]{32}@marketplace\.example>", i) for i in ids)

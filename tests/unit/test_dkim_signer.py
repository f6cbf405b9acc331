"""The relay's DKIM signatures: dkimpy's, with the RSA step done by OpenSSL.
PKCS#1 v1.5 signatures are deterministic, so both must give the same bytes."""

from __future__ import annotations

import types

import dkim as dkimpy
import pytest

from relay import dkim

MESSAGE = (b"From: Bea <abcdefghijklmnop@marketplace.example>\r\nTo: seller@shop.example\r\n"
           b"Subject: Hello\r\nDate: Thu, 26 Nov 2026 09:30:00 +0000\r\nMessage-ID: <1@marketplace.example>\r\n"
           b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHi there.\r\n")


@pytest.fixture(scope="module")
def key():
    return dkim.DkimKey("s1", "marketplace.example", dkim.generate_private_pem())


def test_openssl_signature_is_the_pure_python_one(key, monkeypatch):
    # dkimpy stamps t= from the clock: both signatures must be made in the
    # same second, or they differ there and nowhere else.
    monkeypatch.setattr(dkimpy, "time", types.SimpleNamespace(time=lambda: 1_795_000_000))
    fast = dkim.sign(MESSAGE, key)
    monkeypatch.setattr(dkimpy, "RSASSA_PKCS1_v1_5_sign", dkim._pure_python_sign)
    slow = dkim.sign(MESSAGE, key)
    assert fast == slow
    assert fast.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")


def test_the_signature_verifies_against_the_published_record(key):
    record = dkim.dns_record(key.private_pem).encode()

    def dnsfunc(name, timeout=5):
        assert name == b"s1._domainkey.marketplace.example."
        return record

    signed = dkim.sign(MESSAGE, key)
    assert dkimpy.verify(signed, dnsfunc=dnsfunc)
    tampered = signed.replace(b"Hi there.", b"Hi there!")
    assert not dkimpy.verify(tampered, dnsfunc=dnsfunc)


def test_the_signer_is_the_one_dkimpy_calls():
    assert dkimpy.RSASSA_PKCS1_v1_5_sign is dkim.openssl_rsassa_sign
    assert dkimpy.RSASSA_PKCS1_v1_5_verify is dkim.openssl_rsassa_verify


def test_openssl_verification_gives_dkimpy_s_verdict(key):
    """Valid, tampered, a signature by another key, and the forms OpenSSL
    leaves to dkimpy (too short, too long, not below the modulus): the
    same verdict from both, through dkimpy's own verify()."""
    import hashlib

    from dkim import crypto

    other = dkim.DkimKey("s1", "marketplace.example", dkim.generate_private_pem())
    public = crypto.parse_public_key(__import__("base64").b64decode(
        dkim.dns_record(key.private_pem).split("p=", 1)[1]))
    private = crypto.parse_pem_private_key(key.private_pem)
    n = public["modulus"]
    size = (n.bit_length() + 7) // 8
    digest = hashlib.sha256(b"the signed header block")
    good = dkim._pure_python_sign(digest, private)
    bad = dkim._pure_python_sign(digest, crypto.parse_pem_private_key(other.private_pem))
    unreduced = (int.from_bytes(good, "big") + n).to_bytes(size + 1, "big")
    cases = {
        "valid": good, "other key": bad, "flipped bit": bytes([good[0] ^ 1]) + good[1:],
        "short": good.lstrip(b"\0")[1:], "long": b"\0" + good, "not below n": unreduced,
        "all ones": b"\xff" * size, "zero": b"\0" * size,
    }
    verdicts = {}
    for name, signature in cases.items():
        fast = dkim.openssl_rsassa_verify(hashlib.sha256(b"the signed header block"), signature, public)
        slow = dkim._pure_python_verify(hashlib.sha256(b"the signed header block"), signature, public)
        assert fast == slow, name
        verdicts[name] = fast
    assert verdicts["valid"] and not verdicts["other key"] and not verdicts["flipped bit"]
    assert verdicts["long"]  # dkimpy's arithmetic takes a leading zero octet; so does the relay


def _samples():
    """Bytes made of the characters canonicalization cares about, in every
    arrangement up to length 6, plus real-looking messages."""
    import itertools

    alphabet = [b" ", b"\t", b"\r", b"\n", b"a", b":"]
    for length in range(7):
        for combo in itertools.product(alphabet, repeat=length):
            yield b"".join(combo)
    yield MESSAGE
    yield MESSAGE.replace(b"Hi there.", b"Hi  there.\t\r\n \r\n\r\n")
    yield MESSAGE.replace(b"\r\n", b"\n")
    yield b"\r\n" + MESSAGE


def test_fast_paths_give_dkimpys_own_output():
    samples = list(_samples())
    assert len(samples) > 50_000
    for sample in samples:
        assert dkim.compress_whitespace(sample) == dkim._compress_whitespace(sample), sample
        assert dkim.strip_trailing_whitespace(sample) == dkim._strip_trailing_whitespace(sample), sample
    for sample in samples:
        try:
            expected = dkim._rfc822_parse(sample)
        except Exception as error:  # dkimpy raises MessageFormatError, or IndexError on a lone fold
            with pytest.raises(type(error)):
                dkim.rfc822_parse(sample)
            continue
        assert dkim.rfc822_parse(sample) == expected, sample


@pytest.mark.parametrize("body", [b"Hi there.\r\n", b"Hi  there.\t \r\n\r\n\r\n", b"a\tb  c \r\nd\r\n"])
def test_signatures_agree_with_and_without_the_fast_paths(key, monkeypatch, body):
    message = MESSAGE.replace(b"Hi there.\r\n", body)
    fast = dkim.sign(message, key)
    monkeypatch.setattr(dkimpy.canonicalization, "compress_whitespace", dkim._compress_whitespace)
    monkeypatch.setattr(dkimpy.canonicalization, "strip_trailing_whitespace", dkim._strip_trailing_whitespace)
    monkeypatch.setattr(dkimpy, "rfc822_parse", dkim._rfc822_parse)
    assert dkim.sign(message, key) == fast

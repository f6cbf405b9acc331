"""DKIM signing of delivered mail, with `d=` the relay's domain.

Every message leaves `From:` an alias in the relay's domain, so receivers
judge it by that domain's DMARC policy: the relay signs it (dkimpy, relaxed
canonicalization, rsa-sha256) over the bytes exactly as delivered, last of
all, and over-signs the headers whose addition later would change what a
reader sees (each is listed once more than it occurs, so a header added in
transit breaks the signature).

The key is an RSA PEM file (`[dkim] key_file`); without one, a 2048-bit key
is made in var/dkim/ at first start and the DNS record to publish is logged.
`relay dkim keygen --out FILE` makes one on purpose and prints the record.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from pathlib import Path

import functools

import dkim as dkimpy
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from relay import private

log = logging.getLogger("relay.dkim")

OVERSIGNED = (b"From", b"To", b"Subject", b"Date", b"Message-ID", b"In-Reply-To", b"References")
SIGNED_ONCE = (b"MIME-Version", b"Content-Type", b"Content-Transfer-Encoding", b"X-Relay-Policy",
               b"Auto-Submitted")


@dataclass(frozen=True)
class DkimKey:
    selector: str
    domain: str
    private_pem: bytes = b""

    def __repr__(self) -> str:  # never print the key
        return f"DkimKey(selector={self.selector!r}, domain={self.domain!r})"


def generate_private_pem(bits: int = 2048) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def dns_record(private_pem: bytes) -> str:
    """The TXT record value to publish at <selector>._domainkey.<domain>."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(private_pem, password=None)
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode('ascii')}"


# RFC 1035 §3.3.14: a TXT record is a sequence of <character-string>s of
# at most 255 bytes each; RFC 6376 §3.6.2.2 has verifiers join them with
# nothing in between. A 2048-bit key's record is about 410 characters.
TXT_STRING_BYTES = 255


def txt_strings(value: str) -> list[str]:
    """`value` as TXT strings of at most 255 bytes: the tags before `p=` in
    one, then the key in as few as fit (joined, they are `value` again)."""
    data = value.encode("ascii")  # base64 and tag names: ASCII, nothing to escape
    if b'"' in data or b"\\" in data:
        raise ValueError("a DKIM record with a quote or a backslash")
    split = data.find(b"p=")
    parts = [data[:split], data[split:]] if split > 0 else [data]
    return [part[i:i + TXT_STRING_BYTES].decode("ascii")
            for part in parts for i in range(0, len(part), TXT_STRING_BYTES)]


def zone_record(name: str, value: str, *, one_line: bool = False) -> str:
    """The record in zone-file syntax (RFC 1035 §5.1), to publish as is:
    `name` absolute with its final dot, the strings in parentheses."""
    quoted = [f'"{text}"' for text in txt_strings(value)]
    if one_line:
        return f"{name}. IN TXT ( {' '.join(quoted)} )"
    return f"{name}. IN TXT (\n" + "\n".join(f"    {text}" for text in quoted) + " )"


def record_name(selector: str, domain: str) -> str:
    return f"{selector}._domainkey.{domain}"


def write_key(path: Path, private_pem: bytes) -> None:
    """Write atomically, 0600 (new folders 0700)."""
    private.write(path, private_pem)


def key_path(config) -> Path:
    """`[dkim] key_file`, by default var/dkim/<selector>.pem."""
    if config.dkim.key_file:
        return Path(config.dkim.key_file)
    return config.state_dir / "dkim" / f"{config.dkim.selector}.pem"


def key_path(config) -> Path:
    """`[dkim] key_file`, or var/dkim/<selector>.pem when it is empty."""
    if config.dkim.key_file:
        return Path(config.dkim.key_file)
    return config.state_dir / "dkim" / f"{config.dkim.selector}.pem"


def load_key(config) -> DkimKey:
    """The key at `key_path`, made there now if it does not exist yet."""
    selector, domain = config.dkim.selector, config.domain
    path = key_path(config)
    if not path.exists():
        write_key(path, generate_private_pem())
        log.warning("made a DKIM key in %s; publish this TXT record: %s", path,
                    zone_record(record_name(selector, domain), dns_record(path.read_bytes()), one_line=True))
    return DkimKey(selector, domain, path.read_bytes())


# dkimpy does the RSA arithmetic of a signature with Python integers: about
# 7 ms of CPU per message on this project's machines, the largest single
# cost of the pipeline. RSASSA-PKCS1-v1_5 is deterministic, so OpenSSL's
# (through `cryptography`, already a dependency) gives the very same bytes
# in a tenth of the time; dkimpy keeps doing everything else (canonical
# form, hashing, the header). tests/unit/test_dkim_signer.py holds the two
# to the same output.
_pure_python_sign = dkimpy.RSASSA_PKCS1_v1_5_sign
_DIGESTS = {32: hashes.SHA256(), 20: hashes.SHA1()}


@functools.lru_cache(maxsize=8)
def _openssl_key(n: int, e: int, d: int, p: int, q: int, dmp1: int, dmq1: int, iqmp: int):
    return rsa.RSAPrivateNumbers(p, q, d, dmp1, dmq1, iqmp, rsa.RSAPublicNumbers(e, n)).private_key()


def openssl_rsassa_sign(digest_source, private_key: dict) -> bytes:
    """dkimpy's RSASSA_PKCS1_v1_5_sign(hash, private_key), by OpenSSL."""
    digest = digest_source.digest()
    algorithm = _DIGESTS.get(len(digest))
    if algorithm is None:
        return _pure_python_sign(digest_source, private_key)
    key = _openssl_key(private_key["modulus"], private_key["publicExponent"], private_key["privateExponent"],
                       private_key["prime1"], private_key["prime2"], private_key["exponent1"],
                       private_key["exponent2"], private_key["coefficient"])
    return key.sign(digest, padding.PKCS1v15(), utils.Prehashed(algorithm))


dkimpy.RSASSA_PKCS1_v1_5_sign = openssl_rsassa_sign

# The same for checking a sender's signature (relay/mailauth.py): dkimpy's
# pure-Python verification was 4 % of the event loop's CPU under load.
# OpenSSL is stricter than dkimpy's arithmetic in ways RFC 8017 allows (a
# signature shorter or longer than the modulus, one not below it) and in
# the keys it takes; those are left to dkimpy, so every verdict is dkimpy's.
_pure_python_verify = dkimpy.RSASSA_PKCS1_v1_5_verify


@functools.lru_cache(maxsize=256)
def _openssl_public_key(n: int, e: int):
    return rsa.RSAPublicNumbers(e, n).public_key()


def openssl_rsassa_verify(digest_source, signature: bytes, public_key: dict) -> bool:
    """dkimpy's RSASSA_PKCS1_v1_5_verify(hash, signature, public_key), by OpenSSL."""
    n, e = public_key["modulus"], public_key["publicExponent"]
    digest = digest_source.digest()
    algorithm = _DIGESTS.get(len(digest))
    # OpenSSL also refuses keys dkimpy takes: a modulus over 16384 bits, an
    # exponent over 64 bits with a modulus over 3072 (reported as a bad
    # signature); real keys have e = 65537 and 1024 to 4096 bits.
    if (algorithm is None or e.bit_length() > 32 or n.bit_length() > 8192
            or len(signature) != (n.bit_length() + 7) // 8 or int.from_bytes(signature, "big") >= n):
        return _pure_python_verify(digest_source, signature, public_key)
    try:
        key = _openssl_public_key(n, e)
    except ValueError:  # numbers OpenSSL will not take as a key (dkimpy may still)
        return _pure_python_verify(digest_source, signature, public_key)
    try:
        key.verify(signature, digest, padding.PKCS1v15(), utils.Prehashed(algorithm))
    except InvalidSignature:
        return False
    return True


dkimpy.RSASSA_PKCS1_v1_5_verify = openssl_rsassa_verify

# dkimpy's canonicalization runs regular expressions over the whole message
# even where they cannot change anything: about 25 ms for a message with a
# 500 KB attachment, both when the relay checks a sender's signature and
# when it signs. These wrappers return the input unchanged when the
# function would (no tab and no double space to compress, no white space
# before a line end, no bare LF), and call dkimpy's own otherwise; the
# output is the same bytes either way (tests/unit/test_dkim_signer.py).
_compress_whitespace = dkimpy.canonicalization.compress_whitespace
_strip_trailing_whitespace = dkimpy.canonicalization.strip_trailing_whitespace
_rfc822_parse = dkimpy.rfc822_parse


_strip_trailing_lines = dkimpy.canonicalization.strip_trailing_lines


def compress_whitespace(content: bytes) -> bytes:
    if isinstance(content, memoryview):  # a body rfc822_parse found canonical already
        return content
    if b"\t" not in content and b"  " not in content:
        return content
    return _compress_whitespace(content)


def strip_trailing_whitespace(content: bytes) -> bytes:
    if isinstance(content, memoryview):
        return content
    if b" \r\n" not in content and b"\t\r\n" not in content:
        return content
    return _strip_trailing_whitespace(content)


def strip_trailing_lines(content: bytes) -> bytes:
    if isinstance(content, memoryview):
        return content
    return _strip_trailing_lines(content)


def rfc822_parse(message: bytes):
    """dkimpy's rfc822_parse without splitting the body into lines: with CRLF
    line ends only, the body it returns is the bytes after the blank line —
    as a view of them, not a copy, when both canonicalizations leave it as
    it is (the copy was a second 10 MB message in memory while signing or
    checking one)."""
    end = message.find(b"\r\n\r\n")
    if end < 0 or message.startswith(b"\r\n") or message.count(b"\n") != message.count(b"\r\n"):
        return _rfc822_parse(message)
    headers, _ = _rfc822_parse(message[:end + 4])
    if _canonical_as_is(message, end + 4):
        return headers, memoryview(message)[end + 4:]
    return headers, message[end + 4:]


def _canonical_as_is(message: bytes, start: int) -> bool:
    """Whether message[start:] (CRLF line ends only) is its own simple and
    relaxed canonical form: no tab, no run of spaces, no space before a
    line end, and exactly one line end after its last line."""
    return (len(message) - start > 2 and message.endswith(b"\r\n") and not message.endswith(b"\r\n\r\n")
            and message.find(b"\t", start) == -1 and message.find(b"  ", start) == -1
            and message.find(b" \r\n", start) == -1)


# dkimpy reads the PEM key (a pure-Python ASN.1 parse) for every signature.
dkimpy.parse_pem_private_key = functools.lru_cache(maxsize=8)(dkimpy.parse_pem_private_key)
dkimpy.canonicalization.compress_whitespace = compress_whitespace
dkimpy.canonicalization.strip_trailing_whitespace = strip_trailing_whitespace
dkimpy.canonicalization.strip_trailing_lines = strip_trailing_lines
dkimpy.rfc822_parse = rfc822_parse


def sign(data: bytes, key: DkimKey) -> bytes:
    """`data` with a DKIM-Signature header in front."""
    return signature(data, key) + data


def signature(data: bytes, key: DkimKey) -> bytes:
    """The DKIM-Signature header line(s) for `data`, to go in front of it."""
    end = data.find(b"\r\n\r\n")
    lines = (data if end < 0 else data[:end]).split(b"\r\n")  # the header block only, not a copy of the body
    present = {line.split(b":", 1)[0].strip().lower() for line in lines if line[:1] not in (b" ", b"\t")}
    include = []
    for name in OVERSIGNED:
        count = sum(1 for line in lines if line.lower().startswith(name.lower() + b":"))
        include.extend([name] * (count + 1))
    include.extend(name for name in SIGNED_ONCE if name.lower() in present)
    return dkimpy.sign(data, key.selector.encode(), key.domain.encode(), key.private_pem,
                       canonicalize=(b"relaxed", b"relaxed"), include_headers=include)

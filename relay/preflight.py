"""Checks before listening: every file the config names, read and loaded
the way the running relay will, before `relay serve` opens a store or a
socket (and by `relay check-config`).

A bad file is one `Problem`, printed as one line that names the config key
and the path as configured (``[submission] tls_key: keys/tls.pem: No such
file or directory``); the command then exits 2, having opened nothing. The
checks only read: a file that the relay makes at first start when it is
missing (the DKIM key, the bounce secret, the self-signed pair) is not a
problem while missing; once it exists it is checked like any other.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm

from relay.config import Config

# RFC 2104 §3: an HMAC key shorter than the hash's output (32 bytes for
# SHA-256) weakens it; the relay's own secret is 32 random bytes.
MIN_SECRET_BYTES = 32
# RFC 8301 §3.2: signers must use RSA keys of at least 1024 bits.
MIN_DKIM_BITS = 1024


@dataclass(frozen=True)
class Problem:
    key: str  # "[section] name", as in the config file
    path: str  # as configured (relative paths resolve against the working directory)
    reason: str

    def __str__(self) -> str:
        return f"{self.key}: {self.path}: {self.reason}"


class FileProblems(Exception):
    """Raised by `relay serve` before it listens; each problem is one line."""

    def __init__(self, problems: list[Problem]):
        super().__init__("\n".join(map(str, problems)))
        self.problems = problems


def check(config: Config, now: datetime | None = None) -> tuple[list[Problem], list[Problem]]:
    """(problems, warnings) for every file the config names. A warning (an
    expired certificate, say) does not stop the relay."""
    problems: list[Problem] = []
    warnings: list[Problem] = []
    now = now or datetime.now(timezone.utc)
    submission = config.submission
    if submission.listen is not None or submission.listen_tls is not None:
        if submission.tls_cert:
            _check_pair(submission.tls_cert, submission.tls_key, problems, warnings, now)
        else:
            # The self-signed pair the relay made at an earlier start.
            from relay.tls import self_signed_paths

            cert, key = self_signed_paths(config.state_dir / "tls")
            if cert.exists() and key.exists():
                _check_pair(str(cert), str(key), problems, warnings, now)
    if config.upstream.ca_file:
        _check_ca_file(config.upstream.ca_file, problems)
    _check_dkim_key(config, problems)
    _check_bounce_secret(config, problems)
    if config.webhooks.url:
        _check_webhook_secret(config, problems)
    return problems, warnings


def require(config: Config) -> list[Problem]:
    """`check()` for start-up: raise FileProblems if any file is bad, else
    return the warnings."""
    problems, warnings = check(config)
    if problems:
        raise FileProblems(problems)
    return warnings


def _read(key: str, path: str, problems: list[Problem]) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        problems.append(Problem(key, path, exc.strerror or str(exc)))
        return None


def _check_pair(cert_path: str, key_path: str, problems: list[Problem], warnings: list[Problem],
                now: datetime) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert_key, key_key = "[submission] tls_cert", "[submission] tls_key"
    cert_data = _read(cert_key, cert_path, problems)
    key_data = _read(key_key, key_path, problems)
    if cert_data is None or key_data is None:
        return
    try:
        chain = x509.load_pem_x509_certificates(cert_data)
    except ValueError:
        problems.append(Problem(cert_key, cert_path, "holds no PEM certificate"))
        return
    try:
        private = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:  # cryptography: "Password was not given but private key is encrypted"
        problems.append(Problem(key_key, key_path, "the private key is encrypted; relay needs it unencrypted"))
        return
    except (ValueError, UnsupportedAlgorithm):
        problems.append(Problem(key_key, key_path, "holds no PEM private key"))
        return
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if private.public_key().public_bytes(*spki) != chain[0].public_key().public_bytes(*spki):
        problems.append(Problem(key_key, key_path, f"does not match the certificate in {cert_path}"))
        return
    try:
        from relay.tls import server_context

        server_context(cert_path, key_path)  # what the listener will do with them
    except (ssl.SSLError, OSError) as exc:
        problems.append(Problem(cert_key, cert_path, f"TLS cannot load the pair: {exc}"))
        return
    if chain[0].not_valid_after_utc < now:
        warnings.append(Problem(cert_key, cert_path,
                                f"the certificate expired at {chain[0].not_valid_after_utc.isoformat()}"))


def _check_ca_file(path: str, problems: list[Problem]) -> None:
    from cryptography import x509

    key = "[upstream] ca_file"
    data = _read(key, path, problems)
    if data is None:
        return
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        problems.append(Problem(key, path, "holds no PEM certificate"))
        return
    try:
        ssl.create_default_context(cafile=path)  # as relay.forward does
    except (ssl.SSLError, OSError) as exc:
        problems.append(Problem(key, path, f"TLS cannot load it: {exc}"))


def _check_dkim_key(config: Config, problems: list[Problem]) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from relay import dkim

    key = "[dkim] key_file"
    path = dkim.key_path(config)
    if not path.exists() and not path.is_symlink():
        return  # made at start (relay.dkim.load_key)
    data = _read(key, str(path), problems)
    if data is None:
        return
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        problems.append(Problem(key, str(path), "the private key is encrypted; relay needs it unencrypted"))
        return
    except (ValueError, UnsupportedAlgorithm):
        problems.append(Problem(key, str(path), "holds no PEM private key"))
        return
    if not isinstance(private, rsa.RSAPrivateKey):
        problems.append(Problem(key, str(path), "not an RSA key (relay signs with rsa-sha256)"))
        return
    if private.key_size < MIN_DKIM_BITS:
        problems.append(Problem(key, str(path), f"an RSA key of {private.key_size} bits; "
                                                f"DKIM needs at least {MIN_DKIM_BITS} (RFC 8301)"))
        return
    try:  # dkimpy reads the PEM itself: sign once as delivery will
        dkim.sign(b"From: check@example.invalid\r\n\r\n",
                  dkim.DkimKey(config.dkim.selector, config.domain, data))
    except Exception as exc:  # dkimpy's errors have no common base worth naming
        problems.append(Problem(key, str(path), f"dkimpy cannot sign with it: {exc}"))


def _check_bounce_secret(config: Config, problems: list[Problem]) -> None:
    from relay import bounces

    # made at start when missing (relay.bounces.load_secret); its bytes are the key
    _check_secret("[bounce] secret_file", bounces.secret_path(config), problems, text=False)


def _check_webhook_secret(config: Config, problems: list[Problem]) -> None:
    from relay import webhooks

    # made at start when missing (relay.webhooks.load_secret); its text is the key
    _check_secret("[webhooks] secret_file", webhooks.secret_path(config), problems, text=True)


def _check_secret(key: str, path: Path, problems: list[Problem], *, text: bool) -> None:
    """An HMAC key file: readable and long enough (a missing one is made at
    start). A `text` key is the file's text without surrounding whitespace,
    so that is what is counted."""
    if not path.exists() and not path.is_symlink():
        return
    data = _read(key, str(path), problems)
    if data is None:
        return
    if text:
        data = data.strip()
    if len(data) < MIN_SECRET_BYTES:
        make = "openssl rand -hex 32 > FILE" if text else "head -c 32 /dev/urandom > FILE"
        problems.append(Problem(key, str(path), f"{len(data)} bytes; the secret needs at least "
                                                f"{MIN_SECRET_BYTES} ({make})"))

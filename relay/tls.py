"""TLS for the submission listeners: the server context, and a self-signed
certificate pair made at first start when the config names none.

RFC 8314 defaults: TLS 1.2 or newer, the library's default ciphers, no
client certificates. A self-signed pair is fine for a trial and for mail
clients told to trust it; production names a real certificate in
`[submission] tls_cert` / `tls_key`.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import ssl
from pathlib import Path

from relay import private

log = logging.getLogger("relay.tls")


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


def self_signed_paths(directory: Path) -> tuple[Path, Path]:
    """Where `self_signed_pair` keeps the certificate and the key."""
    return directory / "submission-cert.pem", directory / "submission-key.pem"


def self_signed_pair(directory: Path, hostname: str) -> tuple[str, str]:
    """The paths of a self-signed pair under `directory`, made if missing."""
    cert_path, key_path = self_signed_paths(directory)
    if cert_path.exists() and key_path.exists():
        return str(cert_path), str(key_path)
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName(hostname), x509.DNSName("localhost"),
             x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    # Both 0600 in a 0700 folder (the certificate is public, but whoever
    # hands it to mail clients copies it as root or the relay's user). The
    # key first: a certificate without its key is made anew at next start.
    private.write(key_path, key_bytes)
    private.write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    log.warning("made a self-signed certificate for %s in %s; set [submission] tls_cert and tls_key "
                "for a real one", hostname, directory)
    return str(cert_path), str(key_path)

"""Helpers for the dispute-tool tests (no tests here): the real `relay`
command in a subprocess, the relay's clock set to a moment, copies of a live
database, a sender's own DKIM key."""

from __future__ import annotations

import base64
import os
import smtplib
import sqlite3
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from support import Clock


def clock_at(moment: datetime) -> Clock:
    """support.Clock, set to `moment`."""
    clock = Clock()
    clock.now = moment
    return clock


def write_config(folder: Path, database: Path) -> Path:
    """A config file for the CLI that points at `database`."""
    path = folder / "relay.toml"
    path.write_text(f'database = "{database}"\n')
    return path


def relay_cli(config: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m relay --config CONFIG ARGS…`; stdout as bytes, stderr as text."""
    result = subprocess.run([sys.executable, "-m", "relay", "--config", str(config), *args],
                            cwd=cwd or config.parent, capture_output=True, timeout=60,
                            env={**os.environ, "RELAY_CONFIG": ""})
    result.stderr = result.stderr.decode("utf-8", errors="replace")
    return result


def copy_database(source: Path, target: Path) -> Path:
    """A consistent copy of a live SQLite database (WAL included)."""
    src, dst = sqlite3.connect(source), sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()
    return target


def send(relay, sender: str, recipient: str, data: bytes):
    """Send over SMTP; returns the (code, text) of the final reply."""
    with smtplib.SMTP(relay.host, relay.port, timeout=30) as client:
        try:
            client.sendmail(sender, [recipient], data)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error.decode()
        return 250, ""


class SenderKey:
    """A sending domain's own DKIM key (as the buyer's provider would have)."""

    def __init__(self, domain: str = "mail.example", selector: str = "s1"):
        key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        self.domain, self.selector = domain, selector
        self.private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption())
        public_der = key.public_key().public_bytes(serialization.Encoding.DER,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
        self.txt = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public_der)

    def sign(self, data: bytes) -> bytes:
        signature = dkim.sign(data, self.selector.encode(), self.domain.encode(), self.private_pem,
                              include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
        return signature + data

    def verifies(self, data: bytes) -> bool:
        expected = f"{self.selector}._domainkey.{self.domain}."

        def dnsfunc(name, timeout=5):
            name = name.decode() if isinstance(name, bytes) else name
            return self.txt if name.rstrip(".") + "." == expected else None

        return dkim.verify(data, dnsfunc=dnsfunc)

"""Checks before listening: `relay check-config` and `relay serve` (the real
command, in a subprocess) read every file the config names, and a bad one
is one line naming the config key and the path, exit 2 — and `serve` has
then opened nothing: no port accepts a connection and no database exists."""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relay import dkim
from support import closed_port, shared_dkim_key_file

ROOT = Path(__file__).resolve().parents[2]
MISSING = "No such file or directory"
IS_DIR = "Is a directory"


def relay_cmd(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relay", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "RELAY_CONFIG": ""})


class Files:
    """Good files of every kind in `folder`, and bad ones on request."""

    def __init__(self, folder: Path):
        self.folder = folder
        ca = trustme.CA()
        leaf = ca.issue_cert("relay.marketplace.example")
        self.cert, self.key, self.ca = folder / "cert.pem", folder / "key.pem", folder / "ca.pem"
        leaf.cert_chain_pems[0].write_to_path(str(self.cert))
        leaf.private_key_pem.write_to_path(str(self.key))
        ca.cert_pem.write_to_path(str(self.ca))
        other = ca.issue_cert("other.example")
        self.other_key = folder / "other-key.pem"
        other.private_key_pem.write_to_path(str(self.other_key))
        self.dkim = folder / "dkim.pem"
        self.dkim.write_bytes(Path(shared_dkim_key_file()).read_bytes())
        self.secret = folder / "bounce.key"
        self.secret.write_bytes(os.urandom(32))
        # As an operator keeps secrets (else serve warns about each, which
        # the exact-stderr checks below would see).
        for path in (self.key, self.other_key, self.dkim, self.secret):
            path.chmod(0o600)

    def write(self, name: str, data: bytes) -> Path:
        path = self.folder / name
        path.write_bytes(data)
        path.chmod(0o600)
        return path

    def directory(self, name: str) -> Path:
        path = self.folder / name
        path.mkdir()
        return path


def encrypted_key(files: Files) -> Path:
    key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    return files.write("encrypted.pem", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))


def ec_key(files: Files) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    return files.write("ec.pem", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))


def small_rsa_key(files: Files) -> Path:
    # cryptography refuses to make an RSA key under 1024 bits; openssl will.
    path = files.folder / "small.pem"
    try:
        subprocess.run(["openssl", "genrsa", "-out", str(path), "768"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"openssl cannot make a 768-bit key here: {exc}")
    return path


def dangling(files: Files) -> Path:
    path = files.folder / "dangling.pem"
    path.symlink_to(files.folder / "gone.pem")
    return path


# (case, the config values to set (from the Files), the key and path in the
# line (path: a value set, or a file the relay made), the reason)
CASES = [
    ("tls_key missing", lambda f: {"tls_key": f.folder / "nokey.pem"}, "[submission] tls_key", "tls_key", MISSING),
    ("tls_cert missing", lambda f: {"tls_cert": f.folder / "nocert.pem"}, "[submission] tls_cert", "tls_cert",
     MISSING),
    ("tls_cert a folder", lambda f: {"tls_cert": f.directory("certs")}, "[submission] tls_cert", "tls_cert", IS_DIR),
    ("tls_cert not PEM", lambda f: {"tls_cert": f.write("c.pem", b"not a certificate\n")},
     "[submission] tls_cert", "tls_cert", "holds no PEM certificate"),
    ("tls_key not PEM", lambda f: {"tls_key": f.write("k.pem", b"-----BEGIN PRIVATE KEY-----\nAAAA\n")},
     "[submission] tls_key", "tls_key", "holds no PEM private key"),
    ("tls_key of another certificate", lambda f: {"tls_key": f.other_key}, "[submission] tls_key", "tls_key",
     "does not match the certificate in {tls_cert}"),
    ("tls_key encrypted", lambda f: {"tls_key": encrypted_key(f)}, "[submission] tls_key", "tls_key",
     "the private key is encrypted; relay needs it unencrypted"),
    ("ca_file missing", lambda f: {"ca_file": f.folder / "noca.pem"}, "[upstream] ca_file", "ca_file", MISSING),
    ("ca_file not PEM", lambda f: {"ca_file": f.write("ca-bad.pem", b"\x00\x01binary")}, "[upstream] ca_file",
     "ca_file", "holds no PEM certificate"),
    ("dkim key not PEM", lambda f: {"key_file": f.write("d.pem", b"hello\n")}, "[dkim] key_file", "key_file",
     "holds no PEM private key"),
    ("dkim key a dangling link", lambda f: {"key_file": dangling(f)}, "[dkim] key_file", "key_file", MISSING),
    ("dkim key not RSA", lambda f: {"key_file": ec_key(f)}, "[dkim] key_file", "key_file",
     "not an RSA key (relay signs with rsa-sha256)"),
    ("dkim key too small", lambda f: {"key_file": small_rsa_key(f)}, "[dkim] key_file", "key_file",
     "an RSA key of 768 bits; DKIM needs at least 1024 (RFC 8301)"),
    ("bounce secret short", lambda f: {"secret_file": f.write("short.key", b"hunter2\n")}, "[bounce] secret_file",
     "secret_file", "8 bytes; the secret needs at least 32 (head -c 32 /dev/urandom > FILE)"),
    ("bounce secret empty", lambda f: {"secret_file": f.write("empty.key", b"")}, "[bounce] secret_file",
     "secret_file", "0 bytes; the secret needs at least 32 (head -c 32 /dev/urandom > FILE)"),
    ("bounce secret a folder", lambda f: {"secret_file": f.directory("secrets")}, "[bounce] secret_file",
     "secret_file", IS_DIR),
    # The webhook key is the file's text: a short one with a newline is counted without it.
    ("webhook secret short", lambda f: {"webhook_url": "https://marketplace.example/events",
                                        "webhook_secret_file": f.write("hook.key", b"0123456789abcdef\n")},
     "[webhooks] secret_file", "webhook_secret_file",
     "16 bytes; the secret needs at least 32 (openssl rand -hex 32 > FILE)"),
]


# The section of each setting the cases name (two sections have a secret_file).
SECTIONS = {"tls_cert": "submission", "tls_key": "submission", "ca_file": "upstream", "key_file": "dkim",
            "secret_file": "bounce", "webhook_url": "webhooks", "webhook_secret_file": "webhooks"}


def write_config(workdir: Path, files: Files, ports: dict[str, int], **values) -> dict[str, str]:
    """The shipped config with every file set to a good one, `values` laid
    over them, and the listeners on `ports`. Returns the file settings."""
    settings = {"tls_cert": files.cert, "tls_key": files.key, "ca_file": files.ca, "key_file": files.dkim,
                "secret_file": files.secret, **values}
    settings = {name: str(value) for name, value in settings.items()}
    text = (ROOT / "config" / "relay.toml").read_text()
    for name, value in settings.items():
        head, _, rest = text.partition(f"\n[{SECTIONS[name]}]")
        body, bracket, tail = rest.partition("\n[")
        key = name.removeprefix("webhook_")
        assert body.count(f'\n{key} = ""') == 1, name
        text = head + f"\n[{SECTIONS[name]}]" + body.replace(f'\n{key} = ""', f'\n{key} = "{value}"') + bracket + tail
    for shipped, port in (("2525", ports["inbound"]), ("5870", ports["submission"]), ("4650", ports["tls"])):
        text = text.replace(f'"127.0.0.1:{shipped}"', f'"127.0.0.1:{port}"')
    (workdir / "config").mkdir(exist_ok=True)
    (workdir / "config" / "relay.toml").write_text(text)
    return settings


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "files").mkdir()
    (tmp_path / "run").mkdir()
    return tmp_path


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.parametrize("case, values, key, path_of, reason", CASES, ids=[c[0] for c in CASES])
def test_a_bad_file_is_one_line_and_exit_2(workdir, case, values, key, path_of, reason):
    files = Files(workdir / "files")
    ports = {"inbound": closed_port(), "submission": closed_port(), "tls": closed_port()}
    settings = write_config(workdir / "run", files, ports, **values(files))
    line = f"relay: {key}: {settings[path_of]}: {reason.format(**settings)}\n"

    check = relay_cmd(workdir / "run", "check-config")
    assert (check.returncode, check.stderr, check.stdout) == (2, line, "")

    serve = relay_cmd(workdir / "run", "serve")
    assert (serve.returncode, serve.stderr) == (2, line)
    # Nothing was opened: no listener, no database.
    assert all(refused(port) for port in ports.values())
    assert not (workdir / "run" / "var").exists()


def test_every_problem_gets_its_line(workdir):
    files = Files(workdir / "files")
    ports = {"inbound": 0, "submission": 0, "tls": 0}
    settings = write_config(workdir / "run", files, ports, tls_key=files.folder / "nokey.pem",
                            secret_file=files.write("short.key", b"x" * 31))
    check = relay_cmd(workdir / "run", "check-config", "--json")
    assert check.returncode == 2 and check.stdout == ""
    assert check.stderr.splitlines() == [
        f"relay: [submission] tls_key: {settings['tls_key']}: {MISSING}",
        f"relay: [bounce] secret_file: {settings['secret_file']}: 31 bytes; the secret needs at least 32"
        " (head -c 32 /dev/urandom > FILE)",
    ]


def test_good_files_pass(workdir):
    files = Files(workdir / "files")
    write_config(workdir / "run", files, {"inbound": 0, "submission": 0, "tls": 0})
    check = relay_cmd(workdir / "run", "check-config")
    assert (check.returncode, check.stderr) == (0, "")
    assert f'tls_key = "{files.key}"' in check.stdout


def test_files_the_relay_makes_are_not_required_until_made(workdir):
    """The shipped config names no file: check-config passes and makes
    nothing; once the relay made a self-signed pair, a damaged one is
    named like a configured one."""
    (workdir / "run" / "config").mkdir()
    text = (ROOT / "config" / "relay.toml").read_text()
    (workdir / "run" / "config" / "relay.toml").write_text(text)
    check = relay_cmd(workdir / "run", "check-config")
    assert (check.returncode, check.stderr) == (0, "")
    assert not (workdir / "run" / "var").exists()

    tls = workdir / "run" / "var" / "tls"
    tls.mkdir(parents=True)
    (tls / "submission-cert.pem").write_bytes(b"junk\n")
    (tls / "submission-key.pem").write_bytes(b"junk\n")
    check = relay_cmd(workdir / "run", "check-config")
    assert (check.returncode, check.stderr) == (
        2, "relay: [submission] tls_cert: var/tls/submission-cert.pem: holds no PEM certificate\n")


def test_an_expired_certificate_is_a_warning(workdir):
    files = Files(workdir / "files")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay.marketplace.example")])
    expired_at = datetime.datetime(2020, 1, 2, tzinfo=datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(expired_at - datetime.timedelta(days=30))
            .not_valid_after(expired_at).sign(key, hashes.SHA256()))
    cert_path = files.write("old-cert.pem", cert.public_bytes(serialization.Encoding.PEM))
    key_path = files.write("old-key.pem", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    write_config(workdir / "run", files, {"inbound": 0, "submission": 0, "tls": 0},
                 tls_cert=cert_path, tls_key=key_path)
    check = relay_cmd(workdir / "run", "check-config")
    assert check.returncode == 0
    assert check.stderr == (f"relay: warning: [submission] tls_cert: {cert_path}: "
                            "the certificate expired at 2020-01-02T00:00:00+00:00\n")


def test_a_dkim_key_of_the_relays_own_making_passes(workdir):
    files = Files(workdir / "files")
    made = files.folder / "made.pem"
    dkim.write_key(made, dkim.generate_private_pem(1024))
    write_config(workdir / "run", files, {"inbound": 0, "submission": 0, "tls": 0}, key_file=made)
    check = relay_cmd(workdir / "run", "check-config")
    assert (check.returncode, check.stderr) == (0, "")

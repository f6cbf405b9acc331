"""Big base64 attachments stay out of the parse (relay/pipeline/lifted.py),
and nothing the pipeline decides or delivers changes because of it.

Every message is run through the whole pure pipeline twice, parsed in full
and with its canonical base64 bodies lifted (the size threshold lowered so
that small ones lift too), and the two outcomes must be the same bytes, the
same refusal and the same list of changes: the attachment table, CPython's
email corpus, the bounce corpus, the bench's messages, and hostile shapes
made here.
"""

from __future__ import annotations

import base64
import random
import sys
from pathlib import Path

import pytest

from relay import pipeline
from relay.config import PolicyConfig
from relay.pipeline import lifted
from relay.pipeline.lifted import LiftedPart, canonical_base64
from relay.replies import SmtpError

from corpus import CORPUS
from test_attachment_table import ROWS, build
from test_corpus import context_for
from test_rewrite_hostile import eml, make_context

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import bench_messages as mix  # noqa: E402

BOUNCES = sorted((ROOT / "tests" / "cases" / "bounces").glob("*.txt"))


def outcome(raw: bytes, context: pipeline.Context, lift: bool):
    """(delivered bytes or the refusal's reply, the changes, lifted parts)."""
    changes: list[str] = []
    try:
        message = pipeline.parse(raw, lift=lift)
    except SmtpError as refusal:
        return refusal.reply, changes, 0
    lifted_parts = sum(isinstance(part, LiftedPart) for part in message.walk())
    try:
        result = pipeline.process(message, context, changes)
    except SmtpError as refusal:
        return refusal.reply, changes, lifted_parts
    return result.delivered, list(changes), lifted_parts


def same_either_way(raw: bytes, context: pipeline.Context) -> int:
    """Assert both parses give one outcome; how many parts lifted."""
    full, full_changes, none = outcome(raw, context, lift=False)
    assert none == 0
    lifted_result, lifted_changes, count = outcome(raw, context, lift=True)
    assert lifted_result == full
    assert lifted_changes == full_changes
    return count


@pytest.fixture
def lift_small(monkeypatch):
    monkeypatch.setattr(lifted, "LIFT_MIN_OCTETS", 4)


def crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_attachment_table(row, lift_small):
    raw = build(row)
    count = same_either_way(raw, make_context(policy=row.policy))
    if row.options.get("cte", "base64") == "base64" and row.content not in ("empty",) \
            and (row.content_type or "").split("/")[0] not in ("text", "message"):
        assert count >= 1, "a base64 attachment of this table should lift"


@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
def test_cpython_corpus(path, lift_small):
    raw = crlf(path.read_bytes())
    same_either_way(raw, context_for(raw))


@pytest.mark.parametrize("path", BOUNCES, ids=[p.name for p in BOUNCES])
def test_bounce_corpus(path, lift_small):
    raw = crlf(path.read_bytes())
    same_either_way(raw, context_for(raw))


def test_corpora_lift_something(lift_small):
    """The corpora above hold real base64 attachments that do lift, so
    their equality is not two full parses compared."""
    lifted_total = sum(outcome(crlf(p.read_bytes()), context_for(crlf(p.read_bytes())), True)[2]
                       for p in CORPUS + BOUNCES)
    assert lifted_total >= 5


def test_bench_messages_at_the_real_threshold():
    key = mix.TEST_KEY.read_bytes()
    variants = mix.build_variants("bbbbbbbbbbbbbbbb@marketplace.example", 1, key)
    pdfs = [v for v in variants if v.kind == "pdf"]
    assert pdfs
    for variant in variants[:6] + pdfs[:2]:
        raw = variant.payload()
        count = same_either_way(raw, context_for(raw))
        assert count == (1 if variant.kind == "pdf" else 0)


def attachment_message(data: bytes, *, name="report.pdf", ctype="application/pdf", width=76,
                       body: str | None = None, extra_part: str = "") -> bytes:
    lines = body if body is not None else "\n".join(
        base64.b64encode(data).decode()[i:i + width] for i in range(0, len(base64.b64encode(data)), width))
    return eml("MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=BOUNDARY",
               "--BOUNDARY\nContent-Type: text/plain\n\nThe file.\n"
               f"--BOUNDARY\nContent-Type: {ctype}; name={name}\nContent-Disposition: attachment; "
               f"filename={name}\nContent-Transfer-Encoding: base64\n\n{lines}\n{extra_part}--BOUNDARY--\n")


PDF = b"%PDF-1.4\n" + random.Random(7).randbytes(120_000) + b"\n%%EOF\n"


def test_a_big_attachment_is_lifted_and_delivered_as_received():
    raw = attachment_message(PDF)
    message = pipeline.parse(raw, lift=True)
    parts = [p for p in message.walk() if isinstance(p, LiftedPart)]
    assert len(parts) == 1
    # The parse holds a token, not the lines; a reader still gets the bytes.
    assert len(parts[0]._payload) < 100
    assert parts[0].get_payload(decode=True) == PDF
    result = pipeline.process(message, make_context(), [])
    encoded = raw[raw.index(b"JVBER"):raw.index(b"\r\n--BOUNDARY--")]
    assert encoded in result.delivered
    assert same_either_way(raw, make_context()) == 1


def test_refusals_of_lifted_attachments_are_the_same():
    # Content not what the name says, and over the size limit: the size is
    # counted from the lifted lines, not decoded.
    zipped = b"PK\x03\x04" + random.Random(3).randbytes(100_000)
    raw = attachment_message(zipped)
    reply, changes, count = outcome(raw, make_context(), lift=True)
    assert count == 1 and reply.code == 550 and "ZIP archive" in reply.text, reply
    assert same_either_way(raw, make_context()) == 1
    small_limit = make_context(policy=PolicyConfig(max_attachment_bytes=len(PDF) - 1))
    reply, changes, count = outcome(attachment_message(PDF), small_limit, lift=True)
    assert reply.code == 552 and f"total {len(PDF)} bytes" in reply.text, reply
    assert same_either_way(attachment_message(PDF), small_limit) == 1


@pytest.mark.parametrize("size", [100_000, 100_001, 100_002])
def test_every_padding(size):
    data = b"%PDF-1.4\n" + random.Random(size).randbytes(size)
    raw = attachment_message(data)
    assert same_either_way(raw, make_context()) == 1
    part = next(p for p in pipeline.parse(raw, lift=True).walk() if isinstance(p, LiftedPart))
    assert part.lifted.decoded_size == len(data)
    assert part.lifted.head(65536) == data[:65536]


def b64_lines(data: bytes, width: int) -> list[str]:
    text = base64.b64encode(data).decode()
    return [text[i:i + width] for i in range(0, len(text), width)]


@pytest.mark.parametrize("shape", [
    "uneven",        # one line shorter in the middle
    "inner-pad",     # '=' before the end
    "bad-char",      # a character outside the alphabet
    "bare-lf",       # a line ending without CR
    "long-lines",    # lines over 998 octets (the line stage re-encodes them)
    "odd-width",     # lines not a multiple of 4
    "space",         # a trailing space on a line
])
def test_non_canonical_bodies_are_parsed_in_full(shape):
    lines = b64_lines(PDF, 1200 if shape == "long-lines" else 75 if shape == "odd-width" else 76)
    if shape == "uneven":
        lines[5] = lines[5][:40]
    elif shape == "inner-pad":
        lines[5] = lines[5][:-2] + "=="
    elif shape == "bad-char":
        lines[5] = lines[5][:10] + "*" + lines[5][11:]
    elif shape == "space":
        lines[5] += " "
    body = "\n".join(lines)
    raw = attachment_message(PDF, body=body)
    if shape == "bare-lf":
        raw = raw.replace(lines[5].encode() + b"\r\n", lines[5].encode() + b"\n")
    assert same_either_way(raw, make_context()) == 0


def test_canonical_shapes():
    def check(text: bytes):
        return canonical_base64(text, 0, len(text))
    assert check(b"QUJD") == (4, 3)
    assert check(b"QUJDRA==") == (8, 4)
    assert check(b"QUJDREVG\r\nQUJD") == (8, 9)
    assert check(b"QUJDREVG\r\nQUJDREVGRA==") is None  # last line longer
    assert check(b"QUJD\r\n") is None  # a line end at the end is not the body's
    assert check(b"QU=D") is None
    assert check(b"QUJ") is None
    assert check(b"") is None


def test_base64_text_parts_are_not_lifted(lift_small):
    # A text part in base64 is read and rewritten by the stages (the
    # scrubber must see the address inside): it must never lift.
    text = ("Write to me at bea@mail.example any time. " * 3000).encode()
    raw = attachment_message(text, name="notes.txt", ctype="text/plain")
    reply_or_bytes, _, count = outcome(raw, make_context(), lift=True)
    assert count == 0
    assert same_either_way(raw, make_context()) == 0


def test_a_base64_run_outside_an_attachment_falls_back(lift_small):
    # Base64-looking lines after a blank line in a plain-text body, and as a
    # multipart preamble: lexically liftable, but no attachment's body.
    run = "\n".join(b64_lines(PDF[:3000], 76))
    plain = eml("", f"Hello,\n\n{run}\n")
    assert same_either_way(plain, make_context()) == 0
    preamble = eml("MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=B",
                   f"{run}\n--B\nContent-Type: text/plain\n\nhi\n--B--\n")
    assert same_either_way(preamble, make_context()) == 0


def test_a_detached_signature_lifted_and_removed(lift_small):
    signature = b"\x30\x82" + random.Random(5).randbytes(50_000)
    sig = "\n".join(b64_lines(signature, 64))
    raw = eml('MIME-Version: 1.0\nContent-Type: multipart/signed; protocol="application/pkcs7-signature"; '
              "micalg=sha-256; boundary=S",
              "--S\nContent-Type: text/plain\n\nSigned words.\n"
              f"--S\nContent-Type: application/pkcs7-signature; name=smime.p7s\n"
              f"Content-Transfer-Encoding: base64\n\n{sig}\n--S--\n")
    delivered, changes, count = outcome(raw, make_context(), lift=True)
    assert count == 1
    assert isinstance(delivered, bytes) and b"application/pkcs7-signature" not in delivered
    assert any("detached signature" in change for change in changes)
    assert same_either_way(raw, make_context()) == 1


def test_two_lifted_attachments_keep_their_places():
    other = b"%PDF-1.4\n" + random.Random(11).randbytes(90_000)
    second = "\n".join(b64_lines(other, 72))
    raw = attachment_message(PDF, extra_part=(
        "--BOUNDARY\nContent-Type: application/pdf; name=b.pdf\nContent-Transfer-Encoding: base64\n\n"
        f"{second}\n\n\n"))
    assert same_either_way(raw, make_context()) == 2
    delivered = outcome(raw, make_context(), lift=True)[0]
    assert delivered.index(b64_lines(PDF, 76)[0].encode()) < delivered.index(second[:72].encode())


def test_the_token_is_nowhere_in_the_message():
    raw = attachment_message(PDF)
    skeleton, bodies = lifted.lift(raw)
    prefix = bodies[0].token[:-6].encode()
    assert prefix not in raw and skeleton.count(prefix) == 1
    # A message naming the word itself is no trouble.
    raw = attachment_message(PDF).replace(b"The file.", b"RelayLiftedBody RelayLiftedBody00x000000")
    assert same_either_way(raw, make_context()) == 1


def test_the_worker_s_bytearray_gives_the_same_bytes():
    # A worker gets the message as the buffer it was read into (relay/frames.py).
    raw = attachment_message(PDF)
    expected = outcome(raw, make_context(), lift=True)[0]
    from relay.pipeline import runner
    begun = runner.begin(bytearray(raw))
    assert begun.refusal is None
    processed = runner.finish(make_context())
    assert processed.result.delivered == expected
    assert processed.bodies.are_of(len(raw), expected)


def test_the_archive_splices_the_attachments_delivered_as_received():
    """finish() tells the archive which ranges of raw it lifted: the
    delivered copy is stored as a splice of raw (those bytes not compressed
    a second time), and decodes to the delivered bytes exactly."""
    from relay.pipeline import runner
    from relay.store import decode_bodies

    other = b"%PDF-1.4\n" + random.Random(11).randbytes(90_000)
    raw = attachment_message(PDF, extra_part=(
        "--BOUNDARY\nContent-Type: application/pdf; name=b.pdf\nContent-Transfer-Encoding: base64\n\n"
        + "\n".join(b64_lines(other, 72)) + "\n"))
    assert runner.begin(bytearray(raw)).refusal is None
    processed = runner.finish(make_context())
    delivered, bodies = processed.result.delivered, processed.bodies
    assert bodies.delivered_blob[:4] == bytes.fromhex("5e2a4d18")  # the splice's skippable frame
    assert len(bodies.delivered_blob) < 3000 < 200_000 < len(raw)
    assert decode_bodies("zstd", bodies.raw_blob, bodies.delivered_blob) == (raw, delivered)


def test_a_lifted_attachment_a_stage_removed_is_not_spliced():
    sig = "\n".join(b64_lines(b"\x30\x82" + random.Random(5).randbytes(50_000), 64))
    raw = eml('MIME-Version: 1.0\nContent-Type: multipart/signed; protocol="application/pkcs7-signature"; '
              "micalg=sha-256; boundary=S",
              "--S\nContent-Type: text/plain\n\nSigned words.\n"
              f"--S\nContent-Type: application/pkcs7-signature; name=smime.p7s\n"
              f"Content-Transfer-Encoding: base64\n\n{sig}\n--S--\n")
    from relay.pipeline import runner
    from relay.store import decode_bodies

    assert runner.begin(raw).refusal is None
    processed = runner.finish(make_context())
    assert any("detached signature" in change for change in processed.changes)
    assert processed.bodies.delivered_blob[:4] == bytes.fromhex("28b52ffd")  # a plain zstd frame
    assert decode_bodies("zstd", processed.bodies.raw_blob, processed.bodies.delivered_blob) == (
        raw, processed.result.delivered)

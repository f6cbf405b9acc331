"""`relay archive list / show / export / verify` on an archive written by a
running relay over real SMTP, read by the real command in a subprocess.
Tampering is done the way an attacker would: sqlite3 on the file."""

from __future__ import annotations

import hashlib
import json
import mailbox
import sqlite3
import stat
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import zstandard

from relay.archive import mbox_unquote
from support import RecordingUpstream, RunningRelay, make_config, message, upstream_url
from archive_support import SenderKey, clock_at, copy_database, relay_cli, send, write_config


@dataclass
class World:
    config: Path
    database: Path
    raw: dict  # archive id -> bytes sent
    delivered: dict  # archive id -> bytes the upstream got
    t0: datetime
    key: SenderKey
    seller_alias: str
    buyer_alias: str


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    """Five messages through a real relay: Bea writes (DKIM-signed by her
    provider), Sam answers, Bea is refused (From: not hers), Bob writes, Bea
    writes again a day later."""
    folder = tmp_path_factory.mktemp("archive")
    upstream = RecordingUpstream().start()
    t0 = (datetime.now(timezone.utc) - timedelta(days=3)).replace(microsecond=0)
    clock = clock_at(t0)
    relay = RunningRelay(make_config(folder, upstream_url(upstream)), clock=clock)
    key = SenderKey()
    raw, delivered = {}, {}
    try:
        bea = relay.pair()
        bob = relay.pair(buyer="bob@mail.example", buyer_name="Bob", order="ORDER-2")
        first = key.sign(message(bea.buyer, bea.seller_alias, subject="Broken mug",
                                 body="The mug arrived broken.\nFrom the photo you can see the crack.\n"
                                      ">From an earlier mail: quoted\n",
                                 message_id="<m1@mail.example>"))
        steps = [
            (timedelta(0), bea.buyer, bea.seller_alias, first, 250),
            (timedelta(hours=2), bea.seller, bea.buyer_alias,
             message(bea.seller, bea.buyer_alias, subject="Re: Broken mug", body="Sorry! A new one is on its way.\n",
                     message_id="<s1@shop.example>", headers={"In-Reply-To": "<m1@mail.example>"}), 250),
            (timedelta(hours=3), bea.buyer, bea.seller_alias,
             message("someone@else.example", bea.seller_alias, body="Not me.\n", message_id="<m2@mail.example>"),
             550),
            (timedelta(hours=4), bob.buyer, bob.seller_alias,
             message(bob.buyer, bob.seller_alias, body="Is the blue one in stock?\n", message_id="<b1@mail.example>"),
             250),
            (timedelta(hours=26), bea.buyer, bea.seller_alias,
             message(bea.buyer, bea.seller_alias, subject="Re: Broken mug", body="Thanks, it arrived.\n",
                     message_id="<m3@mail.example>"), 250),
        ]
        for number, (offset, sender, to, data, code) in enumerate(steps, start=1):
            clock.now = t0 + offset
            assert send(relay, sender, to, data)[0] == code
            raw[number] = data
        got = upstream.wait_for(4)
        for number, received in zip((1, 2, 4, 5), got):
            delivered[number] = received.data
        assert relay.call(relay.store.archive_ids()) == [1, 2, 3, 4, 5]
    finally:
        relay.stop()
        upstream.stop()
    database = folder / "relay.sqlite3"
    return World(write_config(folder, database), database, raw, delivered, t0, key, bea.seller_alias, bea.buyer_alias)


def listed(world, *args):
    result = relay_cli(world.config, "archive", "list", "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_list_newest_first_with_filters_and_pages(world):
    rows = listed(world)
    assert [row["archive_id"] for row in rows] == [5, 4, 3, 2, 1]
    assert {key for key in rows[0]} >= {"archive_id", "relationship", "direction", "verdict", "received_at", "bytes", "reply"}
    assert rows[4]["direction"] == "buyer_to_seller" and rows[3]["direction"] == "seller_to_buyer"
    assert rows[4]["bytes"] == len(world.raw[1])
    assert rows[2]["verdict"] == "rejected" and rows[2]["reply"].startswith("550 5.7.1")
    assert rows[0]["received_at"] == (world.t0 + timedelta(hours=26)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    assert [r["archive_id"] for r in listed(world, "--relationship", "1")] == [5, 3, 2, 1]
    assert [r["archive_id"] for r in listed(world, "--relationship", world.buyer_alias.upper())] == [5, 3, 2, 1]
    assert [r["archive_id"] for r in listed(world, "--seller", "seller@shop.example", "--buyer", "bob@mail.example")] == [4]
    assert [r["archive_id"] for r in listed(world, "--verdict", "rejected")] == [3]
    since = (world.t0 + timedelta(hours=2)).isoformat()
    until = (world.t0 + timedelta(hours=4)).isoformat()
    assert [r["archive_id"] for r in listed(world, "--since", since, "--until", until)] == [3, 2]
    assert [r["archive_id"] for r in listed(world, "--limit", "2", "--page", "2")] == [3, 2]

    text = relay_cli(world.config, "archive", "list", "--limit", "2")
    assert text.returncode == 0
    lines = text.stdout.decode().splitlines()
    assert lines[0].split()[:2] == ["id", "received"] and lines[1].split()[0] == "5"
    assert lines[-1] == "more: --page 2"

    bad = relay_cli(world.config, "archive", "list", "--since", "last tuesday")
    assert (bad.returncode, bad.stderr) == (2, "relay: --since: not an ISO 8601 date or time: 'last tuesday'\n")


def test_show_raw_is_the_bytes_received_and_the_senders_dkim_still_verifies(world):
    shown = relay_cli(world.config, "archive", "show", "1", "--raw")
    assert shown.returncode == 0
    assert shown.stdout == world.raw[1]
    assert world.key.verifies(shown.stdout)
    # What the seller got carries no trace of Bea's signature (nor her address).
    out = relay_cli(world.config, "archive", "show", "1", "--delivered")
    assert out.stdout == world.delivered[1]
    assert b"d=mail.example" not in out.stdout and b"buyer@mail.example" not in out.stdout

    changes = relay_cli(world.config, "archive", "show", "1", "--changes").stdout.decode()
    assert "headers, as received (-) and as delivered (+):" in changes
    assert "  - DKIM-Signature: v=1;" in changes
    assert f"  + From: \"Bea Buyer\" <{world.buyer_alias.split('@')[0]}" in changes or "  + From: " in changes

    summary = relay_cli(world.config, "archive", "show", "3").stdout.decode()
    assert "verdict:      rejected" in summary and "reply:        550 5.7.1" in summary
    none = relay_cli(world.config, "archive", "show", "3", "--delivered")
    assert (none.returncode, none.stderr) == (1, "relay: archive row 3 has no delivered bytes (verdict rejected)\n")
    assert none.stdout == b""


def test_export_eml_dir_and_mbox_with_manifest(world, tmp_path):
    out = tmp_path / "case-17"
    result = relay_cli(world.config, "archive", "export", "--relationship", "1", "--format", "eml-dir", str(out))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert [m["archive_id"] for m in manifest["messages"]] == [1, 2, 3, 5]
    assert [m["direction"] for m in manifest["messages"]][:2] == ["buyer_to_seller", "seller_to_buyer"]
    assert manifest["messages"][2]["verdict"] == "rejected"
    assert world.key.verifies((out / manifest["messages"][0]["file"]).read_bytes())
    for entry in manifest["messages"]:
        data = (out / entry["file"]).read_bytes()
        assert data == world.raw[entry["archive_id"]]
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert entry["received_at"] and entry["row_sha256"]
    assert sorted(p.name for p in out.iterdir()) == sorted([m["file"] for m in manifest["messages"]] + ["manifest.json"])
    assert [p.name for p in tmp_path.iterdir()] == ["case-17"]  # no temporary left beside it

    box = tmp_path / "case-17.mbox"
    result = relay_cli(world.config, "archive", "export", "--seller", "SELLER@shop.example",
                       "--buyer", "buyer@mail.example", "--format", "mbox", "--as", "delivered", str(box))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "case-17.mbox.manifest.json").read_text())
    assert [m["archive_id"] for m in manifest["messages"]] == [1, 2, 5]
    assert manifest["omitted"] == [{"archive_id": 3, "direction": "buyer_to_seller", "verdict": "rejected",
                                    "received_at": manifest["omitted"][0]["received_at"],
                                    "reason": "no delivered bytes (verdict rejected)"}]
    reader = mailbox.mbox(str(box), create=False)
    try:
        stored = [reader.get_bytes(key) for key in reader.keys()]
    finally:
        reader.close()
    assert len(stored) == 3
    for data, entry in zip(stored, manifest["messages"]):
        data = mbox_unquote(data).replace(b"\n", b"\r\n")
        assert data == world.delivered[entry["archive_id"]]
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    assert b"\n>From the photo" in box.read_bytes() and b"\n>>From an earlier" in box.read_bytes()

    again = relay_cli(world.config, "archive", "export", "--relationship", "1", "--format", "mbox", str(box))
    assert (again.returncode, again.stderr) == (1, f"relay: {box} exists; give a new name\n")

    # The messages name the parties' real addresses: like the database they
    # come from, only the relay's own user may open an export.
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.iterdir(), box,
                                                              tmp_path / "case-17.mbox.manifest.json"]}
    assert modes == {**{name: 0o600 for name in modes}, "case-17": 0o700}


def test_verify_intact_chain(world):
    result = relay_cli(world.config, "archive", "verify")
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.decode().splitlines()
    assert line.startswith("archive chain verified: 5 row(s), head ")
    head = line.rsplit(" ", 1)[1]
    assert relay_cli(world.config, "archive", "verify", "--head", head).returncode == 0
    rewritten = relay_cli(world.config, "archive", "verify", "--head", "1" * 64)
    assert (rewritten.returncode, rewritten.stderr) == (
        1, f"relay: archive chain broken: the head {'1' * 64} is no longer in the chain: "
           "rows after it were rewritten or deleted\n")


def _edited_body(db, archive_id):
    blob = db.execute("SELECT raw FROM archive_bodies WHERE archive_id = ?", (archive_id,)).fetchone()[0]
    edited = zstandard.ZstdDecompressor().decompress(blob).replace(b"Sorry!", b"Tough.")
    db.execute("UPDATE archive_bodies SET raw = ? WHERE archive_id = ?",
               (zstandard.ZstdCompressor().compress(edited), archive_id))


TAMPERING = [
    ("edited bytes", _edited_body,
     "archive chain broken at row 2: its raw bytes do not match raw_sha256: edited bytes"),
    ("edited inline raw", lambda db, _: db.execute("UPDATE archive SET raw = x'41' WHERE id = 2"),
     "archive chain broken at row 2: its stored bodies cannot be decoded"),
    ("edited verdict", lambda db, _: db.execute("UPDATE archive SET verdict = 'delivered' WHERE id = 3"),
     "archive chain broken at row 3: row_sha256 does not match the row's metadata and hashes: edited metadata"),
    ("deleted middle row", lambda db, _: db.execute("DELETE FROM archive WHERE id = 3"),
     "archive chain broken at row 3: archive_bodies refers to it but it is missing: a deleted row"),
    ("swapped ids", lambda db, _: db.executescript(
        "UPDATE archive SET id = -2 WHERE id = 2; UPDATE archive SET id = 2 WHERE id = 3;"
        " UPDATE archive SET id = 3 WHERE id = -2;"),
     "archive chain broken at row 2: it follows row 3 in the chain, not row 1: rows reordered or their ids changed"),
    ("deleted newest row", lambda db, _: db.execute("DELETE FROM archive WHERE id = 5"),
     "archive chain broken at row 5: archive_bodies refers to it but it is missing: a deleted row"),
]


@pytest.mark.parametrize("name, tamper, expected", TAMPERING, ids=[t[0] for t in TAMPERING])
def test_verify_finds_the_first_broken_link(world, tmp_path, name, tamper, expected):
    database = copy_database(world.database, tmp_path / "copy.sqlite3")
    db = sqlite3.connect(database)
    with db:
        tamper(db, 2)
    db.close()
    result = relay_cli(write_config(tmp_path, database), "archive", "verify")
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"relay: {expected}"), result.stderr


def test_verify_explains_a_deleted_row_without_references(world, tmp_path):
    # A careful attacker deletes the bodies and map entries too: the chain
    # link of the next row still gives it away.
    database = copy_database(world.database, tmp_path / "copy.sqlite3")
    db = sqlite3.connect(database)
    with db:
        for table, column in (("archive_bodies", "archive_id"), ("message_ids", "archive_id"),
                              ("seller_sends", "archive_id"), ("archive", "id")):
            db.execute(f"DELETE FROM {table} WHERE {column} = 2")
    db.close()
    result = relay_cli(write_config(tmp_path, database), "archive", "verify", "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False and report["rows"] == 4
    assert report["breaks"] == [{"archive_id": 3, "kind": "link",
                                 "detail": "its prev_sha256 does not match row 1: row 2 deleted"}]

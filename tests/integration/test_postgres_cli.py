"""`relay db migrate-to` and the operator's commands on PostgreSQL: an
archive written over SMTP by a running relay on SQLite (with a tombstone, a
hold, a seller's send and a delivery report) is copied by the real command
into a fresh PostgreSQL database; the copy verifies, and every dispute tool
then answers on PostgreSQL exactly what it answers on the SQLite original."""

from __future__ import annotations

import json
import mailbox
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from archive_support import clock_at, copy_database, relay_cli, send, write_config
from json_names import check, documented
from relay.store.common import migrations
from support import RecordingUpstream, RunningRelay, make_config, message, shared_dkim_key_file, upstream_url


#: The schema version a fresh database reaches (the newest migration).
LATEST = migrations("postgresql")[-1][0]


def write_postgres_config(folder: Path, url: str) -> Path:
    """A config for the CLI on PostgreSQL: the shared files a node needs,
    no submission listener (so no certificate)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bounce.key").write_bytes(b"k" * 32)
    path = folder / "relay.toml"
    path.write_text(f'database = "{url}"\n\n[bounce]\nsecret_file = "{folder / "bounce.key"}"\n\n'
                    f'[dkim]\nkey_file = "{shared_dkim_key_file()}"\n\n'
                    '[submission]\nlisten = ""\nlisten_tls = ""\n')
    return path


def run(config: Path, *args) -> str:
    result = relay_cli(config, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.decode()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Relationship 1 (Bea): a message 800 days old (purged), a recent one,
    the seller's answer, a refused one and a delivery report about the
    answer; relationship 2 (Bob, on hold): one message 800 days old."""
    folder = tmp_path_factory.mktemp("sqlite-world")
    upstream = RecordingUpstream().start()
    now = datetime.now(timezone.utc).replace(microsecond=0)
    clock = clock_at(now - timedelta(days=800))
    relay = RunningRelay(make_config(folder, upstream_url(upstream)), clock=clock)
    try:
        bea = relay.pair()
        bob = relay.pair(buyer="bob@mail.example", buyer_name="Bob", order="ORDER-2")
        steps = [
            (timedelta(days=800), bea.buyer, bea.seller_alias, message(bea.buyer, bea.seller_alias, body="Old.\n",
                                                       message_id="<m1@mail.example>"), 250),
            (timedelta(days=800), bob.buyer, bob.seller_alias, message(bob.buyer, bob.seller_alias, body="Old, Bob.\n",
                                                       message_id="<b1@mail.example>"), 250),
            (timedelta(days=2), bea.buyer, bea.seller_alias, message(bea.buyer, bea.seller_alias, subject="Broken mug",
                                                     body="It arrived broken.\n", message_id="<m2@mail.example>"), 250),
            (timedelta(hours=3), bea.seller, bea.buyer_alias, message(bea.seller, bea.buyer_alias, subject="Re: Broken mug",
                                                     body="Sorry! A new one is on its way.\n",
                                                     message_id="<s1@shop.example>",
                                                     headers={"In-Reply-To": "<m2@mail.example>"}), 250),
            (timedelta(hours=2), bea.buyer, bea.seller_alias, message("someone@else.example", bea.seller_alias, body="Not me.\n",
                                                     message_id="<m3@mail.example>"), 550),
        ]
        for ago, sender, to, data, code in steps:
            clock.now = now - ago
            assert send(relay, sender, to, data)[0] == code
        upstream.wait_for(4)
        answer = relay.archive(4)
        relay.call(relay.store.record_bounce(answer["received_at"], "<x@marketplace.example>", 4, bea.relationship_id,
                                             "failed", "5.1.1", True, b"Reporting-MTA: dns; mx.example\r\n",
                                             webhook_event="message.bounced"))
    finally:
        relay.stop()
        upstream.stop()
    config = write_config(folder, folder / "relay.sqlite3")
    run(config, "archive", "hold", "2", "--reason", "case 2026-118")
    run(config, "api-token", "add", "shop-backend", "--role", "provisioning")
    assert json.loads(run(config, "purge", "--json"))["rows"] == 1  # Bea's old message
    return folder / "relay.sqlite3"


@pytest.fixture
def migrated(world, tmp_path, postgres_url):
    """(SQLite config, PostgreSQL config, migrate-to's result) on fresh copies."""
    sqlite_config = write_config(tmp_path / "sqlite", copy_database(world, _folder(tmp_path / "sqlite") / "r.sqlite3"))
    postgres_config = write_postgres_config(tmp_path / "postgresql", postgres_url)
    result = relay_cli(sqlite_config, "db", "migrate-to", postgres_url)
    return sqlite_config, postgres_config, result


def _folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_migrate_to_copies_every_table_and_verifies_the_copy(migrated, postgres_url):
    sqlite_config, postgres_config, result = migrated
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    head = json.loads(run(sqlite_config, "archive", "verify", "--json"))["head"]
    lines = out.splitlines()
    assert lines[0] == f"copied {sqlite_config.parent / 'r.sqlite3'} into {postgres_url} (schema version {LATEST}):"
    counts = {line.split()[0]: int(line.split()[1]) for line in lines[1:-1]}
    assert counts == {"parties": 3, "relationships": 2, "orders": 2, "archive_purges": 1, "archive": 5,
                      "archive_bodies": 4, "message_ids": 3, "seller_sends": 1, "archive_holds": 1, "bounces": 1,
                      "api_tokens": 1, "api_idempotency": 0, "webhook_events": 1}
    assert lines[-1] == f"copy: archive chain verified: 5 row(s) (1 purged), head {head}"
    # The same, as JSON, from the command on the PostgreSQL side.
    verified = json.loads(run(postgres_config, "archive", "verify", "--json"))
    assert (verified["ok"], verified["rows"], verified["purged"], verified["head"]) == (True, 5, 1, head)
    assert run(postgres_config, "archive", "verify", "--head", head).startswith("archive chain verified")
    # The API token came along (its hash, not a new one).
    assert run(postgres_config, "api-token", "list", "--json") == run(sqlite_config, "api-token", "list", "--json")


def test_every_dispute_tool_answers_the_same_on_postgresql(migrated, tmp_path):
    sqlite_config, postgres_config, result = migrated
    assert result.returncode == 0, result.stderr
    until = (datetime.now(timezone.utc) + timedelta(days=1)).date().isoformat()
    same = [
        ("archive", "list", "--json"),
        ("archive", "list", "--seller", "seller@shop.example", "--buyer", "buyer@mail.example", "--json"),
        ("archive", "list", "--verdict", "rejected", "--json"),
        ("archive", "list", "--limit", "2", "--page", "2"),
        ("archive", "show", "3", "--json"),
        ("archive", "show", "4", "--changes", "--json"),
        ("archive", "show", "1"),  # the tombstone
        ("archive", "show", "3", "--raw"),
        ("archive", "show", "4", "--delivered"),
        ("archive", "holds", "--json"),
        ("relationship", "show", "--seller", "seller@shop.example", "--buyer", "buyer@mail.example", "--json"),
        ("report", "response-time", "--until", until, "--json"),
        ("report", "response-time", "--until", until, "--seller", "seller@shop.example"),
        ("archive", "verify", "--json"),
    ]
    for args in same:
        on_sqlite, on_postgres = relay_cli(sqlite_config, *args), relay_cli(postgres_config, *args)
        assert (on_postgres.returncode, on_postgres.stdout) == (on_sqlite.returncode, on_sqlite.stdout), args
        assert on_sqlite.returncode == 0, (args, on_sqlite.stderr)
    shown = json.loads(run(postgres_config, "seller", "show", "seller@shop.example", "--json"))
    assert (shown["sent_in_window"], [b["buyer"] for b in shown["buyers"]]) == (
        1, ["buyer@mail.example", "bob@mail.example"])
    # Purge: nothing more past retention; Bob's old message is held.
    dry = json.loads(run(postgres_config, "purge", "--dry-run", "--json"))
    assert (dry["rows"], dry["held"], dry["damaged"]) == (0, 1, 0)
    # Export: the same files, and a manifest that differs only in its date.
    exports = {}
    for name, config in (("sqlite", sqlite_config), ("postgresql", postgres_config)):
        out = tmp_path / f"export-{name}.mbox"
        run(config, "archive", "export", "--relationship", "1", "--format", "mbox", "--as", "delivered", str(out))
        manifest = json.loads(Path(f"{out}.manifest.json").read_text())
        manifest.pop("exported_at")
        exports[name] = (out.read_bytes(), manifest)
    assert exports["sqlite"] == exports["postgresql"]
    box = mailbox.mbox(str(tmp_path / "export-postgresql.mbox"))
    try:
        assert len(box) == 2  # Bea's two delivered messages (the old one is purged)
    finally:
        box.close()
    # Release the hold on PostgreSQL: the purge takes Bob's old message now.
    run(postgres_config, "archive", "release", "2")
    assert json.loads(run(postgres_config, "purge", "--json"))["rows"] == 1
    assert json.loads(run(postgres_config, "archive", "verify", "--json"))["purged"] == 2


def test_new_rows_after_the_copy_get_fresh_ids(migrated):
    _, postgres_config, result = migrated
    assert result.returncode == 0, result.stderr
    assert f"up to date at version {LATEST}" in run(postgres_config, "db", "upgrade")
    run(postgres_config, "seller", "add", "new@shop.example", "--name", "New")
    assert json.loads(run(postgres_config, "buyer", "add", "cleo@mail.example", "--json"))["party_id"] == 5
    order = json.loads(run(postgres_config, "order", "add", "ORDER-3", "--seller", "new@shop.example",
                           "--buyer", "cleo@mail.example", "--json"))
    assert (order["relationship"], order["created"]) == (3, True)
    again = relay_cli(postgres_config, "order", "add", "ORDER-1", "--seller", "new@shop.example",
                      "--buyer", "cleo@mail.example")
    assert (again.returncode, again.stderr) == (1, "relay: order ORDER-1 is already recorded\n")
    settings = json.loads(run(postgres_config, "check-config", "--json"))
    assert settings["database"].startswith("postgresql://")


def test_migrate_to_refuses_a_non_empty_target_and_wrong_arguments(migrated, postgres_url, tmp_path):
    sqlite_config, postgres_config, result = migrated
    assert result.returncode == 0, result.stderr
    again = relay_cli(sqlite_config, "db", "migrate-to", postgres_url)
    assert again.returncode == 1
    assert again.stderr == (f"relay: {postgres_url} is not empty (parties has rows); "
                            "migrate-to copies into an empty database only\n")
    from_postgres = relay_cli(postgres_config, "db", "migrate-to", postgres_url)
    assert from_postgres.returncode == 2 and "is PostgreSQL already" in from_postgres.stderr
    not_a_url = relay_cli(sqlite_config, "db", "migrate-to", "backup/other.sqlite3")
    assert (not_a_url.returncode, not_a_url.stderr) == (2, "relay: not a postgresql:// URL: 'backup/other.sqlite3'\n")
    missing = write_config(_folder(tmp_path / "missing"), tmp_path / "missing" / "none.sqlite3")
    gone = relay_cli(missing, "db", "migrate-to", postgres_url)
    assert gone.returncode == 1 and "no such file" in gone.stderr
    assert not (tmp_path / "missing" / "none.sqlite3").exists()


def test_verify_on_postgresql_finds_an_edited_row(migrated, postgres_url, postgres_cluster):
    _, postgres_config, result = migrated
    assert result.returncode == 0, result.stderr
    postgres_cluster.psql("UPDATE archive SET reply = '250 2.0.0 all fine' WHERE id = 5",
                          database=postgres_url.rsplit("/", 1)[1])
    broken = relay_cli(postgres_config, "archive", "verify")
    assert broken.returncode == 1
    assert broken.stderr.startswith("relay: archive chain broken at row 5: row_sha256 does not match")


def test_migrate_to_an_unreachable_server_is_one_line(world, tmp_path, postgres_cluster):
    config = write_config(_folder(tmp_path), copy_database(world, tmp_path / "r.sqlite3"))
    result = relay_cli(config, "db", "migrate-to",
                       f"postgresql://postgres:secret@127.0.0.1:{postgres_cluster.port + 1}/relay?connect_timeout=2")
    assert result.returncode == 1
    assert result.stderr.startswith("relay: database error:") and result.stderr.count("\n") == 1
    assert "secret" not in result.stderr


def test_shipped_postgres_example_is_valid(tmp_path):
    """The README's two-node config, as a file: check-config accepts it
    (with the files it names in place: check-config reads each)."""
    import trustme

    shutil.copy(shared_dkim_key_file(), tmp_path / "dkim.pem")
    leaf = trustme.CA().issue_cert("relay.marketplace.example")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    config = tmp_path / "relay.toml"
    config.write_text('database = "postgresql://relay@db.internal:5432/relay?pool_size=20"\n'
                      f'[bounce]\nsecret_file = "{tmp_path}/bounce.key"\n'
                      f'[dkim]\nkey_file = "{tmp_path}/dkim.pem"\n'
                      f'[submission]\ntls_cert = "{tmp_path}/cert.pem"\ntls_key = "{tmp_path}/key.pem"\n')
    result = relay_cli(config, "check-config", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["database"] == "postgresql://relay@db.internal:5432/relay?pool_size=20"


def test_all_aliases_for_the_postfix_table_from_either_engine(migrated, postgres_url):
    from relay.store import all_aliases

    sqlite_config, _, result = migrated
    assert result.returncode == 0, result.stderr
    on_sqlite = all_aliases(str(sqlite_config.parent / "r.sqlite3"))
    assert len(on_sqlite) == 4
    assert sorted(all_aliases(postgres_url)) == sorted(on_sqlite)


def test_migrate_to_json_has_the_documented_names(world, tmp_path, postgres_url):
    config = write_config(_folder(tmp_path), copy_database(world, tmp_path / "r.sqlite3"))
    result = relay_cli(config, "db", "migrate-to", postgres_url, "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["ok"] and out["rows"]["archive"] == 5
    check("db migrate-to", out, documented())

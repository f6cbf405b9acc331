"""relay.postfix: the postfix configuration generated from relay.toml — the
domain and ports come from the relay's config and appear nowhere else.
No sockets; tests/integration/test_postfix_e2e.py runs it in a real postfix."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
from datetime import datetime, timezone
from pathlib import Path

import pytest

from relay import bounces, postfix
from relay.config import from_mapping
from relay.store import open_store, utc_now


def make(domain="marketplace.example", listen="127.0.0.1:2525", upstream="smtp://127.0.0.1:10026",
         database="var/relay.sqlite3", **extra):
    data = {"domain": domain, "database": database, "inbound": {"listen": listen}, "upstream": {"url": upstream}}
    for key, value in extra.items():
        data.setdefault(key, {}).update(value)
    return from_mapping(data)


def settings(main_cf: str) -> dict[str, str]:
    lines = [line for line in main_cf.splitlines() if line and not line.startswith("#")]
    return dict(line.split(" = ", 1) for line in lines)


def services(master_cf: str) -> dict[str, list[str]]:
    """service name → [its 8 fields joined, then its -o options]."""
    found, current = {}, None
    for line in master_cf.splitlines():
        if not line or line.startswith("#"):
            continue
        if line[0].isspace():
            assert current is not None, f"continuation line without a service: {line!r}"
            found[current].append(line.strip())
        else:
            fields = line.split()
            assert len(fields) == 8, f"a master.cf service line has 8 fields: {line!r}"
            current = fields[0]
            assert current not in found, f"duplicate service {current}"
            found[current] = [" ".join(fields[1:])]
    return found


def test_transport_mode_main_cf():
    cf = settings(postfix.render_main_cf(make(), "transport"))
    assert cf == {
        "relay_domains": "marketplace.example",
        "relay_recipient_maps": "hash:/etc/postfix/relay/relay_recipients, "
                                "regexp:/etc/postfix/relay/relay_bounces.regexp",
        "transport_maps": "hash:/etc/postfix/relay/transport",
        "aliasrelay_destination_recipient_limit": "1",
        "message_size_limit": "24834694",
    }


def test_transport_mode_master_cf():
    found = services(postfix.render_master_cf(make(), "transport"))
    assert set(found) == {"aliasrelay", "127.0.0.1:10026"}
    assert found["aliasrelay"][0] == "unix - - n - - smtp"
    assert "-o smtp_send_xforward_command=yes" in found["aliasrelay"]
    reinject = found["127.0.0.1:10026"]
    assert reinject[0] == "inet n - n - - smtpd"
    assert "-o content_filter=" in reinject  # no filter on the way out: no loop
    assert "-o mynetworks=127.0.0.0/8" in reinject
    assert "-o smtpd_recipient_restrictions=permit_mynetworks,reject" in reinject
    # "relay" is postfix's stock transport; we never redefine it.
    assert "relay" not in found


@pytest.mark.parametrize("policy, size_limit, postfix_limit", [
    # The default: SIZE is the base64 of a 10 MiB attachment (13.6 MiB),
    # two text parts of 2 MiB and 1 MiB of headers; postfix adds room for
    # the relay's re-encoding and its own Received: line.
    ({}, 19591814, 24834694),
    ({"max_attachment_bytes": 20971520}, 33940748, 39183628),
    ({"max_text_part_bytes": 1048576}, 17494662, 20640390),
])
def test_message_size_limit_is_above_the_relay_size(policy, size_limit, postfix_limit):
    config = make(policy=policy)
    assert config.size_limit == size_limit
    assert postfix.message_size_limit(config) == postfix_limit
    # Postfix's default (10240000) is below the base64 of a 9.5 MB attachment alone.
    assert postfix_limit > config.size_limit > 10240000
    assert settings(postfix.render_main_cf(config))["message_size_limit"] == str(postfix_limit)


def test_an_explicit_relay_size_is_followed():
    config = make(inbound={"max_message_bytes": 5000000})
    assert postfix.message_size_limit(config) == 5000000 + 2 * 2097152 + 1048576


def reuse_options(config) -> dict[str, str]:
    options = services(postfix.render_master_cf(config))["aliasrelay"][1:]
    return dict(o.removeprefix("-o ").split("=", 1) for o in options if "connection_" in o)


@pytest.mark.parametrize("limits, options", [
    # 498 reuses = 499 deliveries = 998 XFORWARD commands, under 1000.
    ({}, {"smtp_connection_reuse_count_limit": "498", "smtp_connection_reuse_time_limit": "300s"}),
    ({"command_call_limit": 10, "session_timeout": 120},
     {"smtp_connection_reuse_count_limit": "3", "smtp_connection_reuse_time_limit": "60s"}),
    ({"command_call_limit": 5},
     {"smtp_connection_cache_on_demand": "no", "smtp_connection_cache_destinations": ""}),
    ({"session_timeout": 1},
     {"smtp_connection_cache_on_demand": "no", "smtp_connection_cache_destinations": ""}),
])
def test_connection_reuse_stays_under_the_relay_session_limits(limits, options):
    config = make(limits=limits)
    assert reuse_options(config) == options
    reuse = postfix.connection_reuse(config)
    if reuse.count_limit:
        deliveries = reuse.count_limit + 1
        assert deliveries * postfix.COMMANDS_PER_DELIVERY < config.limits.command_call_limit
        assert reuse.time_limit <= config.limits.session_timeout / 2


def test_filter_mode_adds_the_content_filter_to_the_public_smtpd():
    config = make()
    found = services(postfix.render_master_cf(config, "filter"))
    assert found["smtp"] == ["inet n - n - - smtpd", "-o content_filter=aliasrelay:[127.0.0.1]:2525"]
    assert set(found) == {"smtp", "aliasrelay", "127.0.0.1:10026"}
    named = services(postfix.render_master_cf(config, "filter", smtpd_service="127.0.0.1:10025"))
    assert "127.0.0.1:10025" in named and "smtp" not in named
    # Filter mode keeps the transport map: bounces and local mail to the
    # alias domain never pass the smtpd's filter.
    assert settings(postfix.render_main_cf(config, "filter"))["transport_maps"] == "hash:/etc/postfix/relay/transport"


def test_domain_and_ports_come_from_the_config():
    config = make(domain="mail.shop.example", listen="0.0.0.0:2626", upstream="smtp://127.0.0.1:10036")
    files = postfix.render(config, "transport", map_dir="/srv/maps/")
    assert files[postfix.TRANSPORT_MAP].splitlines()[-1] == "mail.shop.example aliasrelay:[127.0.0.1]:2626"
    assert settings(files[postfix.MAIN_CF])["relay_domains"] == "mail.shop.example"
    assert "hash:/srv/maps/transport" in files[postfix.MAIN_CF]
    assert "127.0.0.1:10036" in services(files[postfix.MASTER_CF])
    text = "".join(files.values())
    assert "2525" not in text and "10026" not in text and "marketplace.example" not in text


def test_ipv6_loopback():
    config = make(listen="[::1]:2525", upstream="smtp://[::1]:10026", inbound={"xforward_hosts": ["::1"]})
    assert "aliasrelay:[::1]:2525" in postfix.render_transport(config)
    found = services(postfix.render_master_cf(config))
    assert "-o mynetworks=[::1]/128" in found["[::1]:10026"]
    assert postfix.warnings_for(config) == []


@pytest.mark.parametrize("overrides, key", [
    ({"upstream": "maildir:var/outbox"}, "upstream.url"),
    ({"upstream": "mx:"}, "upstream.url"),
    ({"upstream": "smtp+starttls://u:p@127.0.0.1:10026"}, "upstream.url"),
    ({"upstream": "smtp://mail.example.com:10026"}, "upstream.url"),
    ({"upstream": "smtp://192.0.2.1:10026"}, "upstream.url"),
    ({"listen": "relay.internal:2525"}, "inbound.listen"),
    ({"listen": "127.0.0.1:0"}, "inbound.listen"),
])
def test_configs_postfix_cannot_serve_are_refused_naming_the_key(overrides, key):
    with pytest.raises(postfix.PostfixConfigError) as excinfo:
        postfix.render(make(**overrides))
    assert str(excinfo.value).startswith(f"{key}: ")


def test_unknown_mode():
    with pytest.raises(postfix.PostfixConfigError, match="--mode"):
        postfix.render(make(), "milter")


def test_warnings():
    assert postfix.warnings_for(make(auth={"inbound": "dmarc"})) == []
    [warning] = postfix.warnings_for(make(inbound={"xforward_hosts": []}, auth={"inbound": "dmarc"}))
    assert "xforward_hosts does not list 127.0.0.1" in warning
    [warning] = postfix.warnings_for(make(auth={"inbound": "dmarc"}, policy={"max_attachment_bytes": 52428800}))
    assert "mailbox_size_limit" in warning


def test_bounce_map_matches_the_relay_return_paths_only():
    config = make()
    [line] = [x for x in postfix.render_bounce_map(config).splitlines() if not x.startswith("#")]
    pattern = re.fullmatch(r"/(.*)/ OK", line).group(1)
    ere = re.compile(pattern, re.IGNORECASE)  # postfix regexp tables: POSIX ERE, case-insensitive
    now = datetime.now(timezone.utc)
    address = bounces.make_address("<" + "ab" * 16 + "@marketplace.example>", "marketplace.example",
                                   b"k" * 32, now, 7)
    assert ere.match(address) and ere.match(address.upper())
    assert bounces._LOCAL_RE.match(address.split("@")[0])  # the same shape the relay parses
    for other in ("bounce+x@marketplace.example", address.replace("@marketplace.example", "@evil.example"),
                  "abcdefghijklmnop@marketplace.example", address + ".evil.example"):
        assert not ere.match(other), other


def test_recipient_table():
    text = postfix.render_recipients(make(), ["b2345678abcdefgh@marketplace.example", "A234567ABCDEFGHI@Marketplace.Example",
                                              "zzzzzzzzzzzzzzzz@old.example", "b2345678abcdefgh@marketplace.example"])
    assert [line for line in text.splitlines() if not line.startswith("#")] == [
        "a234567abcdefghi@marketplace.example OK",
        "b2345678abcdefgh@marketplace.example OK",
    ]
    assert "Aliases of marketplace.example: 2." in text


def make_db(path: Path, pairs: int) -> tuple[Path, list[str]]:
    """A database made by the real store with `pairs` relationships; their aliases."""
    async def work():
        store = await open_store(str(path))
        try:
            await store.upgrade()
            aliases = []
            for n in range(pairs):
                await store.add_party("seller", f"s{n}@shop.example", "")
                await store.add_party("buyer", f"b{n}@mail.example", "")
                relationship, _ = await store.add_order(f"O-{n}", f"s{n}@shop.example", f"b{n}@mail.example",
                                                        utc_now(), "marketplace.example")
                aliases += [relationship.seller_alias, relationship.buyer_alias]
            return aliases
        finally:
            await store.close()

    return path, asyncio.run(work())


def test_aliases_from_db_reads_only(tmp_path):
    db, aliases = make_db(tmp_path / "relay.sqlite3", 2)
    before = db.stat().st_mtime_ns
    assert sorted(postfix.aliases_from_db(db)) == sorted(aliases) and len(aliases) == 4
    assert db.stat().st_mtime_ns == before
    with pytest.raises(postfix.PostfixRuntimeError, match="no such file"):
        postfix.aliases_from_db(tmp_path / "missing.sqlite3")
    assert not (tmp_path / "missing.sqlite3").exists()


def test_write_atomically(tmp_path):
    target = tmp_path / "transport"
    postfix.write_atomically(target, "one\n")
    postfix.write_atomically(target, "two\n")
    assert target.read_text() == "two\n"
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)
    with pytest.raises(UnicodeEncodeError):
        postfix.write_atomically(target, "three \udc80\n")  # fails half-way: the old file stays
    assert target.read_text() == "two\n"
    assert os.listdir(tmp_path) == ["transport"]  # no temporary file left behind


def run(config, argv, capsys):
    parser = argparse.ArgumentParser()
    postfix.add_arguments(parser)
    status = postfix.run(parser.parse_args(argv), config)
    out, err = capsys.readouterr()
    return status, out, err


def test_command_prints_the_files(capsys):
    status, out, err = run(make(auth={"inbound": "dmarc"}), ["--mode", "filter"], capsys)
    assert status == 0 and err == ""
    assert "# ==> main.cf <==" in out and "# ==> /etc/postfix/relay/transport <==" in out
    assert "content_filter=aliasrelay:[127.0.0.1]:2525" in out


def test_command_writes_the_files(tmp_path, capsys):
    db, aliases = make_db(tmp_path / "relay.sqlite3", 1)
    config = make(database=str(db))
    out_dir = tmp_path / "postfix"
    status, out, err = run(config, ["--out", str(out_dir)], capsys)
    assert (status, out) == (0, "")
    assert sorted(os.listdir(out_dir)) == ["main.cf", "master.cf", "relay_bounces.regexp",
                                           "relay_recipients", "transport"]
    assert f"hash:{out_dir.resolve()}/transport" in (out_dir / "main.cf").read_text()
    assert f"{aliases[1]} OK" in (out_dir / "relay_recipients").read_text()

    # The provisioning hook / timer: only the alias table.
    (out_dir / "relay_recipients").unlink()
    (out_dir / "main.cf").write_text("mine")
    status, _, _ = run(config, ["--recipients-only", "--out", str(out_dir)], capsys)
    assert status == 0 and (out_dir / "relay_recipients").exists()
    assert (out_dir / "main.cf").read_text() == "mine"


def test_command_errors(tmp_path, capsys):
    status, out, err = run(make(upstream="maildir:var/outbox"), [], capsys)
    assert status == 2 and out == "" and err.startswith("relay: upstream.url: ") and err.count("\n") == 1
    status, out, err = run(make(database=str(tmp_path / "none.sqlite3")), ["--recipients-only"], capsys)
    assert status == 1 and "no such file" in err
    status, out, err = run(make(), ["--postmap"], capsys)
    assert status == 2 and "--postmap needs --out" in err
    status, out, err = run(make(), ["--out", str(tmp_path), "--postfix-config-dir", str(tmp_path)], capsys)
    assert status == 2 and "--postfix-config-dir is for --postmap" in err


ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "scripts" / "postfix" / "example"


@pytest.mark.parametrize("mode", postfix.MODES)
def test_shipped_examples_are_what_the_generator_writes(mode):
    """scripts/postfix/example/<mode>/ is `relay postfix-config --mode <mode>`
    for scripts/postfix/relay.toml.example; regenerate them when this fails."""
    from relay.config import load

    config = load(ROOT / "scripts" / "postfix" / "relay.toml.example")
    assert postfix.warnings_for(config) == []
    files = postfix.render(config, mode)
    assert sorted(p.name for p in (EXAMPLES / mode).iterdir()) == sorted(files)
    for name, text in files.items():
        assert (EXAMPLES / mode / name).read_text() == text, name


def test_recipient_table_from_postgresql(postgres_url):
    """With several relay nodes on PostgreSQL, the postfix recipient table
    is read from that database (`relay postfix-config --recipients-only`)."""
    _, aliases = make_db(postgres_url, 3)
    assert sorted(postfix.aliases_from_db(postgres_url)) == sorted(aliases)

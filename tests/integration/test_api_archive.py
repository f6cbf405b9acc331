"""The dispute side of the HTTP API, over a real relay that really carried
mail: a delivered message with hostile HTML and an attachment, the
seller's answer, and a message from a stranger the relay refused. The
answers are checked against the OpenAPI document (test_api.Client), the
bytes against the archive's rows and what the upstream received, the
export against `relay archive export` run on the same store."""

from __future__ import annotations

import json
import mailbox
from email.message import EmailMessage

import pytest

from archive_support import relay_cli, send
from test_api import Client, api_relay, cli_config, make_token, tokens  # noqa: F401 (fixtures)
from support import message

PDF = b"%PDF-1.4\n" + b"0" * 3000 + b"\n%%EOF\n"


def hostile(sender: str, to: str) -> bytes:
    mail = EmailMessage()
    mail["From"], mail["To"], mail["Subject"] = sender, to, "The mug"
    mail["Message-ID"] = "<mug-1@mail.example>"
    mail.set_content("It arrived broken.\n")
    mail.add_alternative('<p onclick="steal()">It arrived <b>broken</b>.<script>steal()</script>'
                         '<img src="https://tracker.example/p.gif"></p>', subtype="html")
    mail.add_attachment(PDF, maintype="application", subtype="pdf", filename="photo-of-mug.pdf")
    return bytes(mail)


@pytest.fixture
def world(api_relay, upstream):
    """(client, the pair, archive ids: delivered, answer, refused)."""
    pair = api_relay.pair()
    assert send(api_relay, pair.buyer, pair.seller_alias, hostile(pair.buyer, pair.seller_alias))[0] == 250
    assert send(api_relay, pair.seller, pair.buyer_alias,
                message(pair.seller, pair.buyer_alias, subject="Re: The mug", body="A new one is coming.\n",
                        headers={"In-Reply-To": "<mug-1@mail.example>"}))[0] == 250
    # The envelope is the buyer's, the From someone else's: refused after DATA, and archived.
    assert send(api_relay, pair.buyer, pair.seller_alias,
                message("stranger@else.example", pair.seller_alias, body="Buy my pills.\n"))[0] == 550
    upstream.wait_for(2)
    ids = api_relay.call(api_relay.store.archive_ids())
    assert len(ids) == 3
    return Client(api_relay), pair, ids


def test_a_provisioning_token_cannot_read_the_archive(world, tokens):  # noqa: F811
    client, pair, ids = world
    for path in ("/api/v1/archive", f"/api/v1/archive/{ids[0]}", f"/api/v1/archive/{ids[0]}/raw",
                 f"/api/v1/relationships/{pair.relationship_id}/thread",
                 f"/api/v1/relationships/{pair.relationship_id}/export", "/api/v1/archive/verify",
                 "/api/v1/reports/response-time"):
        status, body, _ = client.call("GET", path, token=tokens["provisioning"])
        assert (status, body["error"]["code"]) == (403, "forbidden"), path
        assert client.call("GET", path)[0] == 401, path


def test_search_the_archive(world, tokens):  # noqa: F811
    client, pair, ids = world
    token = tokens["disputes"]
    status, page, _ = client.call("GET", "/api/v1/archive?order=ORDER-1", token=token)
    assert status == 200
    assert [row["archive_id"] for row in page["messages"]] == ids[::-1]  # newest first
    assert [row["verdict"] for row in page["messages"]] == ["rejected", "delivered", "delivered"]
    assert page["next_page"] is None
    assert {row["seller"] for row in page["messages"]} == {pair.seller}
    # The same relationship by alias, by id; paged; by verdict.
    by_alias = client.call("GET", f"/api/v1/archive?alias={pair.buyer_alias}", token=token)[1]
    assert by_alias == page
    first = client.call("GET", f"/api/v1/archive?relationship={pair.relationship_id}&limit=2", token=token)[1]
    assert ([row["archive_id"] for row in first["messages"]], first["next_page"]) == (ids[:0:-1], 2)
    second = client.call("GET", f"/api/v1/archive?relationship={pair.relationship_id}&limit=2&page=2",
                         token=token)[1]
    assert ([row["archive_id"] for row in second["messages"]], second["next_page"]) == ([ids[0]], None)
    refused = client.call("GET", "/api/v1/archive?verdict=rejected", token=token)[1]["messages"]
    assert [row["archive_id"] for row in refused] == [ids[2]]
    assert client.call("GET", "/api/v1/archive?until=2000-01-01", token=token)[1]["messages"] == []
    assert client.call("GET", f"/api/v1/archive?seller={pair.seller}&since=2000-01-01", token=tokens["admin"]
                       )[1]["messages"] == page["messages"]
    # Bad input names the field.
    for query, field in (("verdict=maybe", "verdict"), ("limit=0", "limit"), ("limit=x", "limit"),
                         ("since=yesterday-ish", "since"), ("colour=red", "colour"),
                         (f"alias={pair.buyer_alias}&seller={pair.seller}", "alias")):
        status, body, _ = client.call("GET", f"/api/v1/archive?{query}", token=token)
        assert (status, body["error"]["code"], body["error"].get("field")) == (400, "invalid_field", field), query
    assert client.call("GET", "/api/v1/archive?order=NO-SUCH", token=token)[0] == 404


def test_one_message_as_received_and_as_delivered(world, tokens, upstream, api_relay):  # noqa: F811
    client, pair, ids = world
    token = tokens["disputes"]
    status, shown, _ = client.call("GET", f"/api/v1/archive/{ids[0]}", token=token)
    assert status == 200
    assert (shown["verdict"], shown["direction"], shown["seller"], shown["buyer"]) == (
        "delivered", "buyer_to_seller", pair.seller, pair.buyer)
    assert shown["attachments"] == [{"filename": "photo-of-mug.pdf", "content_type": "application/pdf",
                                     "bytes": len(PDF)}]
    assert any("script" in change for change in shown["changes"]), shown["changes"]
    assert any(line.lower().startswith("from:") for line in shown["headers_removed"])
    row = api_relay.archive(ids[0])
    status, raw, headers = client.call("GET", f"/api/v1/archive/{ids[0]}/raw", token=token)
    assert (status, raw, headers["Content-Type"].split(";")[0]) == (200, row["raw"], "message/rfc822")
    assert headers["Relay-SHA256"] == row["raw_sha256"] and headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Content-Disposition"].startswith("attachment")
    delivered = client.call("GET", f"/api/v1/archive/{ids[0]}/delivered", token=token)[1]
    assert delivered == row["delivered"]
    assert b"<script" not in delivered and pair.buyer.encode() not in delivered
    assert upstream.messages[0].data == delivered
    # The refused one: its reason, its raw bytes, nothing delivered.
    refused = client.call("GET", f"/api/v1/archive/{ids[2]}", token=token)[1]
    assert refused["verdict"] == "rejected" and refused["reply"].startswith("550")
    assert refused["delivered_bytes"] is None and refused["attachments"] == []
    status, body, _ = client.call("GET", f"/api/v1/archive/{ids[2]}/delivered", token=token)
    assert (status, body["error"]["code"]) == (404, "not_found")
    assert client.call("GET", "/api/v1/archive/999999", token=token)[0] == 404
    assert client.call("GET", "/api/v1/archive/x1", token=token)[0] == 400


def test_the_thread_and_the_export(world, tokens, api_relay, tmp_path):  # noqa: F811
    client, pair, ids = world
    token = tokens["disputes"]
    status, thread, _ = client.call("GET", f"/api/v1/relationships/{pair.relationship_id}/thread", token=token)
    assert status == 200
    assert (thread["seller_alias"], thread["buyer_alias"]) == (pair.seller_alias, pair.buyer_alias)
    assert [(m["archive_id"], m["direction"], m["verdict"]) for m in thread["messages"]] == [
        (ids[0], "buyer_to_seller", "delivered"), (ids[1], "seller_to_buyer", "delivered"),
        (ids[2], "buyer_to_seller", "rejected")]
    # The export is the CLI's, byte for byte.
    status, mbox, headers = client.call("GET", f"/api/v1/relationships/{pair.relationship_id}/export",
                                        token=token)
    assert status == 200 and headers["Content-Type"].startswith("application/mbox")
    config = cli_config(api_relay, tmp_path / "cli")
    out = tmp_path / "conversation.mbox"
    result = relay_cli(config, "archive", "export", "--relationship", str(pair.relationship_id), "--format", "mbox", str(out))
    assert result.returncode == 0, result.stderr
    assert mbox == out.read_bytes()
    box = mailbox.mbox(str(out))
    try:
        assert len(box) == 3
    finally:
        box.close()
    manifest = client.call("GET", f"/api/v1/relationships/{pair.relationship_id}/export?part=manifest&as=delivered",
                           token=token)[1]
    assert manifest["as"] == "delivered"
    assert [m["archive_id"] for m in manifest["messages"]] == ids[:2]
    assert [(m["archive_id"], m["reason"]) for m in manifest["omitted"]] == [
        (ids[2], "no delivered bytes (verdict rejected)")]
    cli_manifest = json.loads((tmp_path / "conversation.mbox.manifest.json").read_text())
    assert {k: v for k, v in cli_manifest.items() if k not in ("exported_at", "as", "messages", "omitted")} == \
        {k: v for k, v in manifest.items() if k not in ("exported_at", "as", "messages", "omitted")}
    status, body, _ = client.call("GET", f"/api/v1/relationships/{pair.relationship_id}/export?as=html",
                                  token=token)
    assert (status, body["error"]["field"]) == (400, "as")


def test_verify_and_the_response_time_report(world, tokens):  # noqa: F811
    client, pair, ids = world
    token = tokens["disputes"]
    status, verified, _ = client.call("GET", "/api/v1/archive/verify", token=token)
    assert (status, verified["ok"], verified["rows"], verified["breaks"]) == (200, True, 3, [])
    again = client.call("GET", f"/api/v1/archive/verify?head={verified['head']}", token=token)[1]
    assert again["ok"] is True
    gone = client.call("GET", "/api/v1/archive/verify?head=" + "0" * 64, token=token)[1]
    assert gone["ok"] is False and [b["kind"] for b in gone["breaks"]] == ["head"]
    status, report, _ = client.call("GET", f"/api/v1/reports/response-time?seller={pair.seller}", token=token)
    assert status == 200
    [seller] = report["sellers"]
    assert seller["seller"] == pair.seller
    assert report["answer_within_hours"] == 24
    assert client.call("GET", "/api/v1/reports/response-time?seller=nobody@shop.example", token=token)[0] == 404

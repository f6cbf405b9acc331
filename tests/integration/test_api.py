"""The HTTP API (relay/api.py) of a real relay, over real HTTP, on the store
the tests run on (SQLite, or PostgreSQL with RELAY_TEST_DATABASE=postgresql).

Every answer is checked against the OpenAPI document the relay serves
(the schema for its route and status), so the document is the API."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import re
import smtplib
import ssl
from dataclasses import replace

import jsonschema
import pytest

from relay import api
from relay.config import ApiConfig, Endpoint
from support import RunningRelay, make_config, upstream_url

DOMAIN = "marketplace.example"


class Client:
    """HTTP calls to the relay's API, each answer checked against its spec."""

    def __init__(self, relay: RunningRelay):
        self.relay = relay
        self.host, self.port = relay.threaded.server.api_address
        self.document = self.call("GET", "/api/openapi.json")[1]
        self.checked: set[tuple[str, str, int]] = set()

    def call(self, method: str, path: str, body=None, token: str | None = None, headers: dict | None = None,
             raw: bytes | None = None):
        connection = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            sent = dict(headers or {})
            if token is not None:
                sent["Authorization"] = f"Bearer {token}"
            data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
            if data is not None:
                sent["Content-Type"] = "application/json"
            connection.request(method, path, body=data, headers=sent)
            response = connection.getresponse()
            text = response.read()
            media = (response.getheader("Content-Type") or "").split(";")[0].strip()
            # JSON is decoded; anything else (a message, an mbox) stays bytes.
            value = json.loads(text) if text and media == "application/json" else (text or None)
            if hasattr(self, "document"):
                self._check(method, path, response.status, value, media)
            return response.status, value, dict(response.getheaders())
        finally:
            connection.close()

    def _check(self, method: str, path: str, status: int, value, media: str = "application/json") -> None:
        template = self._template(path.split("?", 1)[0])
        if template is None or method.lower() not in self.document["paths"][template]:
            # No such route: an error, as every error is.
            assert status in (401, 404, 405), (method, path, status)
            jsonschema.Draft202012Validator({**self.document, "$ref": "#/components/schemas/Error"}).validate(value)
            return
        operation = self.document["paths"][template][method.lower()]
        spec = operation["responses"].get(str(status))
        assert spec is not None, f"{method} {template}: status {status} is not documented"
        content = spec.get("content", {})
        if value is not None and media != "application/json":
            assert media in content, f"{method} {template} {status}: {media} is not documented"
            assert isinstance(value, bytes)
            self.checked.add((method, template, status))
            return
        schema = content.get("application/json", {}).get("schema")
        if schema is None:
            assert value is None, f"{method} {template} {status}: a body where none is documented"
        else:
            jsonschema.Draft202012Validator({**self.document, **schema}).validate(value)
        self.checked.add((method, template, status))

    def _template(self, path: str) -> str | None:
        for template in self.document["paths"]:
            pattern = "^" + re.sub(r"\{[^/]+\}", "[^/]+", template) + "$"
            if re.match(pattern, path):
                return template
        return None


def cli_config(relay: RunningRelay, folder):
    """A config for the CLI on the relay's own store, either engine."""
    from archive_support import write_config
    from test_postgres_cli import write_postgres_config

    database = relay.config.database
    if database.startswith("postgres"):
        return write_postgres_config(folder, database)
    folder.mkdir()
    return write_config(folder, database)


def make_token(relay: RunningRelay, name: str, role: str) -> str:
    token = api.new_token()
    relay.call(relay.store.add_api_token(name, role, api.token_sha256(token)))
    return token


@pytest.fixture
def api_relay(tmp_path, upstream):
    config = make_config(tmp_path, upstream_url(upstream))
    relay = RunningRelay(replace(config, api=ApiConfig(listen=Endpoint("127.0.0.1", 0))))
    yield relay
    relay.stop()


@pytest.fixture
def client(api_relay):
    return Client(api_relay)


@pytest.fixture
def tokens(api_relay):
    return {role: make_token(api_relay, f"{role}-bot", role) for role in api.ROLES}


def error_code(answer) -> tuple[int, str, str | None]:
    status, body, _ = answer
    return status, body["error"]["code"], body["error"].get("field")


# --- authentication and roles ------------------------------------------------------

def test_every_call_needs_a_live_token(client, tokens, api_relay):
    assert error_code(client.call("GET", "/api/v1/holds"))[:2] == (401, "unauthorized")
    assert error_code(client.call("GET", "/api/v1/holds", token="rly_not-a-token"))[:2] == (401, "unauthorized")
    assert client.call("GET", "/api/v1/holds", token=tokens["disputes"])[0] == 200
    assert api_relay.call(api_relay.store.revoke_api_token("disputes-bot"))
    assert error_code(client.call("GET", "/api/v1/holds", token=tokens["disputes"]))[:2] == (401, "unauthorized")
    # An unknown route answers 401 without a token, 404 with one: no probing for routes.
    assert client.call("GET", "/api/v1/nothing")[0] == 401


def test_roles_are_boundaries(client, tokens):
    seller = {"seller": "sam@shop.example", "seller_name": "Sam"}
    assert error_code(client.call("POST", "/api/v1/sellers", seller, token=tokens["disputes"]))[:2] == (403, "forbidden")
    assert client.call("POST", "/api/v1/sellers", seller, token=tokens["provisioning"])[0] == 201
    assert client.call("POST", "/api/v1/buyers", {"buyer": "bea@mail.example"}, token=tokens["admin"])[0] == 201
    status, order, _ = client.call("POST", "/api/v1/orders", {"order": "112-1", "seller": "sam@shop.example",
                                                              "buyer": "bea@mail.example"}, token=tokens["provisioning"])
    relationship_id = order["relationship"]
    # A provisioning token reads aliases but may not touch the archive's holds.
    assert error_code(client.call("GET", "/api/v1/holds", token=tokens["provisioning"]))[:2] == (403, "forbidden")
    assert error_code(client.call("PUT", f"/api/v1/relationships/{relationship_id}/hold",
                                  token=tokens["provisioning"]))[:2] == (403, "forbidden")
    assert error_code(client.call("GET", "/api/v1/relationships?order=112-1",
                                  token=tokens["disputes"]))[:2] == (403, "forbidden")
    assert client.call("GET", f"/api/v1/relationships/{relationship_id}", token=tokens["disputes"])[0] == 200
    assert client.call("PUT", f"/api/v1/relationships/{relationship_id}/hold", token=tokens["admin"])[0] == 201


# --- provisioning ---------------------------------------------------------------------

def test_sellers_and_buyers(client, tokens, api_relay, upstream):
    token = tokens["provisioning"]
    status, seller, _ = client.call("POST", "/api/v1/sellers", {
        "seller": "Sam@Shop.example", "seller_name": "Sam's Shop", "password": "correct horse",
        "daily_orders_override": 40}, token=token)
    assert status == 201
    # The fields of `relay seller add --json` (docs/cli.md), from the same function.
    assert seller == {"party_id": seller["party_id"], "seller": "sam@shop.example", "seller_name": "Sam's Shop",
                      "daily_orders_override": 40}
    assert error_code(client.call("POST", "/api/v1/sellers", {"seller": "sam@shop.example"}, token=token))[:2] == \
        (409, "conflict")
    status, changed, _ = client.call("PATCH", "/api/v1/sellers/sam@shop.example", {"daily_orders_override": None,
                                                                                   "seller_name": "Sam"}, token=token)
    assert status == 200 and changed["daily_orders_override"] is None and changed["seller_name"] == "Sam"
    assert client.call("GET", "/api/v1/sellers/sam@shop.example", token=token)[1] == changed
    assert error_code(client.call("PATCH", "/api/v1/sellers/nobody@shop.example", {"seller_name": "x"},
                                  token=token))[:2] == (404, "not_found")
    # The password set over the API is the one submission checks.
    stored = api_relay.call(api_relay.store.password_hash("sam@shop.example"))
    assert stored is not None and stored[1].startswith("scrypt")

    status, buyer, _ = client.call("POST", "/api/v1/buyers", {"buyer": "bea@mail.example", "buyer_name": "Bea"},
                                   token=token)
    assert status == 201 and buyer == {"party_id": buyer["party_id"], "buyer": "bea@mail.example",
                                       "buyer_name": "Bea", "opted_out": False}
    assert client.call("POST", "/api/v1/buyers/bea@mail.example/opt-out", token=token)[1]["opted_out"] is True
    assert api_relay.call(api_relay.store.get_party("buyer", "bea@mail.example")).opted_out is True
    assert client.call("POST", "/api/v1/buyers/bea@mail.example/opt-in", token=token)[1]["opted_out"] is False
    assert client.call("PATCH", "/api/v1/buyers/bea@mail.example", {"opted_out": True}, token=token)[1][
        "opted_out"] is True


@pytest.mark.parametrize("body, field", [
    ({"seller_name": "no address"}, "seller"),
    ({"seller": "not an address"}, "seller"),
    ({"seller": 42}, "seller"),
    ({"seller": "x@marketplace.example"}, "seller"),  # an alias's domain is no real address
    ({"seller": "sam@shop.example", "daily_orders_override": "40"}, "daily_orders_override"),
    ({"seller": "sam@shop.example", "daily_orders_override": -1}, "daily_orders_override"),
    ({"seller": "sam@shop.example", "daily_orders_override": True}, "daily_orders_override"),
    ({"seller": "sam@shop.example", "password": "short"}, "password"),
    ({"seller": "sam@shop.example", "seller_name": "a\nb"}, "seller_name"),
    ({"seller": "sam@shop.example", "colour": "blue"}, "colour"),
    # The names before docs/cli.md's vocabulary are refused, not ignored.
    ({"address": "sam@shop.example"}, "address"),
    ({"seller": "sam@shop.example", "name": "Sam"}, "name"),
    ({"seller": "sam@shop.example", "daily_orders": 3}, "daily_orders"),
])
def test_bad_fields_are_400_naming_the_field_and_write_nothing(client, tokens, api_relay, body, field):
    assert error_code(client.call("POST", "/api/v1/sellers", body, token=tokens["provisioning"])) == \
        (400, "invalid_field", field)
    assert api_relay.call(api_relay.store.get_party("seller", "sam@shop.example")) is None


@pytest.mark.parametrize("raw", [b"{", b"[1, 2]", b"\xff\xfe", b"null", b'"text"'])
def test_a_body_that_is_no_json_object_is_400(client, tokens, raw):
    assert error_code(client.call("POST", "/api/v1/orders", raw=raw, token=tokens["provisioning"]))[:2] == \
        (400, "invalid_json")


def test_a_huge_body_is_413(client, tokens):
    raw = json.dumps({"order": "x" * (api.MAX_BODY_OCTETS + 10)}).encode()
    assert client.call("POST", "/api/v1/orders", raw=raw, token=tokens["provisioning"])[0] == 413


def provision(client, token, seller="sam@shop.example", buyer="bea@mail.example"):
    client.call("POST", "/api/v1/sellers", {"seller": seller, "seller_name": "Sam"}, token=token)
    client.call("POST", "/api/v1/buyers", {"buyer": buyer, "buyer_name": "Bea"}, token=token)


def test_an_order_gives_the_relationship_and_its_aliases(client, tokens, api_relay, upstream):
    token = tokens["provisioning"]
    provision(client, token)
    status, order, headers = client.call("POST", "/api/v1/orders", {
        "order": "112-4567890", "seller": "sam@shop.example", "buyer": "bea@mail.example",
        "placed_at": "2026-12-07T09:30:00+01:00"}, token=token)
    # `relay order add --json`'s fields, from the same function.
    assert status == 201 and (order["order"], order["created"]) == ("112-4567890", True)
    assert (order["seller"], order["buyer"]) == ("sam@shop.example", "bea@mail.example")
    assert order["seller_alias"].endswith("@" + DOMAIN) and order["buyer_alias"].endswith("@" + DOMAIN)
    pair = {name: order[name] for name in ("relationship", "seller", "buyer", "seller_alias", "buyer_alias",
                                           "created_at")}
    # A second order of the pair: the same relationship.
    status, second, _ = client.call("POST", "/api/v1/orders", {"order": "112-2", "seller": "sam@shop.example",
                                                               "buyer": "bea@mail.example"}, token=token)
    assert status == 201 and second == {**pair, "order": "112-2", "created": False}
    # Every way of looking it up: `relay relationship show --json`'s fields.
    shown = {**pair, "seller_name": "Sam", "buyer_name": "Bea", "orders": 2,
             "messages": {"buyer_to_seller": 0, "seller_to_buyer": 0}, "last_message_at": None}
    for query in (f"alias={pair['seller_alias']}", f"alias={pair['buyer_alias']}",
                  "order=112-4567890", "seller=sam@shop.example&buyer=bea@mail.example"):
        assert client.call("GET", f"/api/v1/relationships?{query}", token=token)[1] == shown
    assert error_code(client.call("GET", "/api/v1/relationships?order=none", token=token))[:2] == (404, "not_found")
    assert error_code(client.call("GET", "/api/v1/relationships?order_id=112-2", token=token))[:2] == \
        (400, "invalid_field")
    assert error_code(client.call("GET", "/api/v1/relationships?seller=sam@shop.example", token=token))[:2] == \
        (400, "invalid_field")
    # The same order again is a conflict, and changes nothing.
    assert error_code(client.call("POST", "/api/v1/orders", {"order": "112-2", "seller": "sam@shop.example",
                                                             "buyer": "bea@mail.example"}, token=token))[:2] == \
        (409, "conflict")
    # Unknown parties: 404, nothing written.
    assert error_code(client.call("POST", "/api/v1/orders", {"order": "9", "seller": "who@shop.example",
                                                             "buyer": "bea@mail.example"}, token=token))[:2] == \
        (404, "not_found")
    # The aliases work: mail from the buyer to the seller alias reaches the seller.
    raw = (f"From: Bea <bea@mail.example>\r\nTo: {pair['seller_alias']}\r\nSubject: hi\r\n"
           "Date: Mon, 07 Dec 2026 10:00:00 +0000\r\nMessage-ID: <a1@mail.example>\r\n\r\nHello\r\n").encode()
    with smtplib.SMTP(api_relay.host, api_relay.port, timeout=30) as smtp:
        smtp.sendmail("bea@mail.example", [pair["seller_alias"]], raw)
    [got] = upstream.wait_for(1)
    assert got.rcpt_tos == ["sam@shop.example"]


def test_an_idempotency_key_replays_the_first_answer(client, tokens, api_relay):
    token = tokens["provisioning"]
    provision(client, token)
    body = {"order": "112-7", "seller": "sam@shop.example", "buyer": "bea@mail.example",
            "placed_at": "2026-12-07T08:00:00Z"}
    key = {"Idempotency-Key": "order-112-7-attempt"}
    first = client.call("POST", "/api/v1/orders", body, token=token, headers=key)
    again = client.call("POST", "/api/v1/orders", body, token=token, headers=key)
    assert first[0] == again[0] == 201 and first[1] == again[1]
    assert first[2]["Idempotent-Replayed"] == "false" and again[2]["Idempotent-Replayed"] == "true"
    # The same key with another request: refused, nothing recorded.
    other = client.call("POST", "/api/v1/orders", {**body, "order": "112-8"}, token=token, headers=key)
    assert error_code(other)[:2] == (409, "conflict")
    assert api_relay.call(api_relay.store.relationship_by_order("112-8")) is None
    # Keys are each token's own: another token's same key is a new request.
    admin = client.call("POST", "/api/v1/orders", {**body, "order": "112-9"}, token=tokens["admin"], headers=key)
    assert admin[0] == 201 and admin[2]["Idempotent-Replayed"] == "false"
    bad = client.call("POST", "/api/v1/orders", body, token=token, headers={"Idempotency-Key": "x" * 201})
    assert error_code(bad) == (400, "invalid_field", "Idempotency-Key")


def test_concurrent_orders_of_one_pair_make_one_relationship(client, tokens, api_relay):
    token = tokens["provisioning"]
    provision(client, token)

    def order(n: int):
        return client.call("POST", "/api/v1/orders", {"order": f"c-{n}", "seller": "sam@shop.example",
                                                      "buyer": "bea@mail.example"}, token=token)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(order, range(16)))
    assert {status for status, _, _ in answers} == {201}
    assert len({body["relationship"] for _, body, _ in answers}) == 1
    assert sum(body["created"] for _, body, _ in answers) == 1


def test_concurrent_retries_with_one_key_make_one_order(client, tokens, api_relay):
    token = tokens["provisioning"]
    provision(client, token)
    body = {"order": "r-1", "seller": "sam@shop.example", "buyer": "bea@mail.example"}

    def attempt(_):
        return client.call("POST", "/api/v1/orders", body, token=token, headers={"Idempotency-Key": "k-r-1"})

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(attempt, range(6)))
    assert {status for status, _, _ in answers} == {201}
    assert len({json.dumps(body, sort_keys=True) for _, body, _ in answers}) == 1
    assert sum(headers["Idempotent-Replayed"] == "false" for _, _, headers in answers) == 1


# --- disputes -------------------------------------------------------------------------

def test_holds(client, tokens):
    provision(client, tokens["admin"])
    order = client.call("POST", "/api/v1/orders", {"order": "h-1", "seller": "sam@shop.example",
                                                   "buyer": "bea@mail.example"}, token=tokens["admin"])[1]
    relationship_id = order["relationship"]
    token = tokens["disputes"]
    status, placed, _ = client.call("PUT", f"/api/v1/relationships/{relationship_id}/hold",
                                    {"reason": "case 4711"}, token=token)
    assert status == 201 and placed["placed"] is True and placed["hold"]["reason"] == "case 4711"
    status, again, _ = client.call("PUT", f"/api/v1/relationships/{relationship_id}/hold", token=token)
    assert status == 200 and again["placed"] is False
    holds = client.call("GET", "/api/v1/holds", token=token)[1]["holds"]
    assert [hold["relationship"] for hold in holds] == [relationship_id]
    assert client.call("DELETE", f"/api/v1/relationships/{relationship_id}/hold", token=token)[0] == 204
    assert error_code(client.call("DELETE", f"/api/v1/relationships/{relationship_id}/hold", token=token))[:2] == \
        (404, "not_found")
    assert error_code(client.call("PUT", "/api/v1/relationships/99999/hold", token=token))[:2] == (404, "not_found")
    assert error_code(client.call("PUT", "/api/v1/relationships/x/hold", token=token)) == (400, "invalid_field", "id")


# --- what an operator sees ------------------------------------------------------------

def test_calls_are_logged_by_token_name_and_counted(client, tokens, api_relay, caplog):
    from prometheus_client import generate_latest

    with caplog.at_level("INFO", logger="relay.api"):
        client.call("GET", "/api/v1/holds", token=tokens["disputes"])
        client.call("GET", "/api/v1/holds", token=tokens["provisioning"])
    lines = [record.getMessage() for record in caplog.records if record.name == "relay.api"]
    assert any("token=disputes-bot GET list_holds status=200" in line for line in lines), lines
    assert any("token=provisioning-bot GET list_holds status=403" in line for line in lines), lines
    assert not any(tokens["disputes"] in line or tokens["provisioning"] in line for line in lines)
    metrics = generate_latest(api_relay.threaded.server.metrics.registry).decode()
    assert 'relay_api_calls_total{route="list_holds",status="200"} 1.0' in metrics
    assert 'relay_api_calls_total{route="list_holds",status="403"} 1.0' in metrics


def test_the_document_describes_every_route(client, tokens):
    # Every route the relay has is in the document, and the other way round.
    app_routes = {(route.method, route.resource.canonical)
                  for route in api.Api(None, DOMAIN).app().router.routes() if route.method != "HEAD"}
    documented = {(method.upper(), path) for path, operations in client.document["paths"].items()
                  for method in operations}
    assert app_routes - {("GET", "/api/openapi.json")} == documented


def test_tokens_from_the_command_line(client, api_relay, tmp_path):
    from archive_support import relay_cli

    config = cli_config(api_relay, tmp_path / "cli")
    made = relay_cli(config, "api-token", "add", "dispute-desk", "--role", "disputes")
    assert made.returncode == 0, made.stderr
    token = made.stdout.decode().split()[-1]
    assert token.startswith(api.TOKEN_PREFIX) and len(token) > 40
    assert client.call("GET", "/api/v1/holds", token=token)[0] == 200
    # Listed by name and role; the token itself is never shown again, nor stored.
    listed = relay_cli(config, "api-token", "list")
    assert b"dispute-desk" in listed.stdout and b"disputes" in listed.stdout and token.encode() not in listed.stdout
    # (Never read the live SQLite file from this process: closing any handle
    # on it drops the relay's own POSIX locks on it.)
    rows = api_relay.call(api_relay.store._fetchall("SELECT * FROM api_tokens"))
    assert rows and not any(token in str(value) for row in rows for value in row)
    assert api.token_sha256(token) in {value for row in rows for value in row}
    assert relay_cli(config, "api-token", "add", "dispute-desk", "--role", "admin").returncode != 0  # name taken
    revoked = relay_cli(config, "api-token", "revoke", "dispute-desk")
    assert revoked.returncode == 0, revoked.stderr
    assert client.call("GET", "/api/v1/holds", token=token)[0] == 401
    assert relay_cli(config, "api-token", "revoke", "dispute-desk").returncode == 1
    # The name is free again once revoked.
    assert relay_cli(config, "api-token", "add", "dispute-desk", "--role", "admin").returncode == 0

"""The HTTP API: what a marketplace does with the relay, over JSON.

Served by `relay serve` on `[api] listen` (off unless set), with aiohttp in
the relay's own event loop, on the same store as the SMTP side. Every call
but `/api/openapi.json` carries `Authorization: Bearer <token>`; a token is
made with `relay api-token add NAME --role ROLE`, shown once and stored as
its SHA-256. The role decides what the token may do (`ROLES`):
`provisioning` creates and updates parties and orders and reads
relationships (aliases included); `disputes` reads the archive and sets
holds; `admin` both. Every call is logged with the token's name (never
the token) and counted in the metrics by route and status.

Errors are JSON, `{"error": {"code": …, "message": …, "field": …}}`, with
a stable `code` (`ERRORS` lists them); bad input is a 400 naming the field,
and a call writes in one transaction or not at all. `POST /api/v1/orders`
takes an `Idempotency-Key`: a retry with the same key and body gets the
first answer again (`Idempotent-Replayed: true`), never a second order.
The OpenAPI document (relay/api_spec.py) describes every route, and a test
checks the real answers against it.

No page or answer of this API shows a party's real address to anyone but
a token of the marketplace itself (every role is the marketplace's own
staff or systems): the rule for any future seller-facing role is in
docs/api.md.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import time
from datetime import datetime, timezone

from aiohttp import web

from relay import addresses, archive, auth, disputes, provisioning
from relay.archive.times import iso
from relay.store import Conflict, NotFound, StoreDataError, StoreUnavailable

log = logging.getLogger("relay.api")

ROLES = ("admin", "disputes", "provisioning")
# Which roles may call a route, by the route's name.
PROVISIONING = frozenset({"admin", "provisioning"})
DISPUTES = frozenset({"admin", "disputes"})
TOKEN_PREFIX = "rly_"
MAX_BODY_OCTETS = 64 * 1024
MAX_IDEMPOTENCY_KEY = 200
TOKEN_KEY = web.RequestKey("token", dict)  # the caller's token row, set by the middleware

ERRORS = {
    "unauthorized": 401,   # no token, or not a live one
    "forbidden": 403,      # the token's role may not do this
    "not_found": 404,
    "conflict": 409,       # exists already; an idempotency key reused for another request
    "invalid_json": 400,   # the body is not a JSON object
    "invalid_field": 400,  # a field is missing, of the wrong type or not valid; `field` names it
    "too_large": 413,
    "unavailable": 503,    # the store did not answer: try again
    "damaged": 500,        # an archive row fails its hashes: run `relay archive verify`
}


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


class ApiError(Exception):
    def __init__(self, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.code, self.message, self.field = code, message, field

    def response(self) -> web.Response:
        body = {"code": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        return json_response({"error": body}, ERRORS[self.code])


def json_response(body, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(text=json.dumps(body, ensure_ascii=False), status=status,
                        content_type="application/json", headers=headers)


# --- reading requests ------------------------------------------------------------

async def json_object(request: web.Request) -> dict:
    if request.content_length is not None and request.content_length > MAX_BODY_OCTETS:
        raise ApiError("too_large", f"the body is over {MAX_BODY_OCTETS} octets")
    raw = await request.content.read(MAX_BODY_OCTETS + 1)
    if len(raw) > MAX_BODY_OCTETS:
        raise ApiError("too_large", f"the body is over {MAX_BODY_OCTETS} octets")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError("invalid_json", "the body is not JSON") from None
    if not isinstance(body, dict):
        raise ApiError("invalid_json", "the body must be a JSON object")
    return body


def text_field(body: dict, name: str, *, required: bool, max_length: int = 200) -> str | None:
    if name not in body or body[name] is None:
        if required:
            raise ApiError("invalid_field", f"{name} is required", name)
        return None
    value = body[name]
    if not isinstance(value, str):
        raise ApiError("invalid_field", f"{name} must be a string", name)
    if len(value) > max_length or any(ord(c) < 32 for c in value):
        raise ApiError("invalid_field", f"{name} must be at most {max_length} printable characters", name)
    return value


def address_field(body: dict, name: str, domain: str, *, required: bool = True) -> str | None:
    value = text_field(body, name, required=required, max_length=254)
    if value is None:
        return None
    if not addresses.is_valid(value):
        raise ApiError("invalid_field", f"{name} is not an email address", name)
    if addresses.split(value)[1] == domain:
        raise ApiError("invalid_field", f"{name} is in the relay's own domain; give the real address", name)
    return addresses.normalize(value)


def path_address(request: web.Request, domain: str) -> str:
    return address_field({"address": request.match_info["address"]}, "address", domain)


def no_other_fields(body: dict, allowed: set[str]) -> None:
    for name in body:
        if name not in allowed:
            raise ApiError("invalid_field", f"unknown field {name}; allowed: {', '.join(sorted(allowed))}", name)


def placed_at_field(body: dict) -> str:
    value = text_field(body, "placed_at", required=False, max_length=40)
    if value is None:
        return iso(datetime.now(timezone.utc))
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ApiError("invalid_field", "placed_at must be an ISO 8601 date and time", "placed_at") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return iso(moment)


# --- what a request may say of a party -----------------------------------------------

def _party_fields(role: str) -> set[str]:
    """What a request may change of a party of `role` (its address is its key)."""
    return {f"{role}_name"} | ({"password", "daily_orders_override"} if role == "seller" else {"opted_out"})


# --- the application ------------------------------------------------------------------

class Api:
    """The routes, over one store; `app()` is the aiohttp application."""

    def __init__(self, store, domain: str, metrics=None, console=None):
        self.store = store
        self.domain = domain
        self.metrics = metrics
        self.console = console  # relay.console.Console, mounted at /console

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=MAX_BODY_OCTETS)
        routes = [
            ("GET", "/api/openapi.json", self.openapi, None),
            ("POST", "/api/v1/sellers", self.create_seller, PROVISIONING),
            ("GET", "/api/v1/sellers/{address}", self.get_seller, PROVISIONING),
            ("PATCH", "/api/v1/sellers/{address}", self.update_seller, PROVISIONING),
            ("POST", "/api/v1/buyers", self.create_buyer, PROVISIONING),
            ("GET", "/api/v1/buyers/{address}", self.get_buyer, PROVISIONING),
            ("PATCH", "/api/v1/buyers/{address}", self.update_buyer, PROVISIONING),
            ("POST", "/api/v1/buyers/{address}/opt-out", self.opt_out, PROVISIONING),
            ("POST", "/api/v1/buyers/{address}/opt-in", self.opt_in, PROVISIONING),
            ("POST", "/api/v1/orders", self.create_order, PROVISIONING),
            ("GET", "/api/v1/relationships", self.find_relationship, PROVISIONING),
            ("GET", "/api/v1/relationships/{id}", self.get_relationship, PROVISIONING | DISPUTES),
            ("GET", "/api/v1/holds", self.list_holds, DISPUTES),
            ("PUT", "/api/v1/relationships/{id}/hold", self.place_hold, DISPUTES),
            ("DELETE", "/api/v1/relationships/{id}/hold", self.release_hold, DISPUTES),
            ("GET", "/api/v1/relationships/{id}/thread", self.thread, DISPUTES),
            ("GET", "/api/v1/relationships/{id}/export", self.export, DISPUTES),
            ("GET", "/api/v1/archive", self.search_archive, DISPUTES),
            ("GET", "/api/v1/archive/verify", self.verify_archive, DISPUTES),
            ("GET", "/api/v1/archive/{archive_id}", self.archive_message, DISPUTES),
            ("GET", "/api/v1/archive/{archive_id}/raw", self.archive_raw, DISPUTES),
            ("GET", "/api/v1/archive/{archive_id}/delivered", self.archive_delivered, DISPUTES),
            ("GET", "/api/v1/reports/response-time", self.response_time_report, DISPUTES),
        ]
        for method, path, handler, roles in routes:
            resource = app.router.add_resource(path, name=handler.__name__)
            route = resource.add_route(method, handler)
            route.roles = roles  # read by the middleware
        if self.console is not None:
            app.add_subapp("/console", self.console.app())
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        if request.path == "/console" or request.path.startswith("/console/"):
            return await handler(request)  # pages and sessions of their own (relay/console.py)
        started = time.monotonic()
        route = request.match_info.route
        name = getattr(route.resource, "name", None) or "unknown"
        token = None
        try:
            roles = getattr(route, "roles", None)
            if roles is not None or name == "unknown":
                token = await self._token(request)
                if roles is not None and token["role"] not in roles:
                    raise ApiError("forbidden", f"a {token['role']} token may not do this")
            request[TOKEN_KEY] = token
            response = await handler(request)
        except ApiError as error:
            response = error.response()
        except web.HTTPException as error:  # aiohttp's own: no such route, method not allowed
            code = {404: "not_found", 405: "not_found", 413: "too_large"}.get(error.status, "invalid_json")
            response = ApiError(code, error.reason or "not found").response()
            response.set_status(error.status)
        except (Conflict, NotFound) as error:
            response = ApiError("conflict" if isinstance(error, Conflict) else "not_found", str(error)).response()
        except StoreUnavailable as error:
            log.warning("api %s: store unavailable: %s", name, error)
            response = ApiError("unavailable", "the store did not answer; try again").response()
        except StoreDataError as error:
            log.error("api %s: the store refused a value: %s", name, error)
            response = ApiError("invalid_field", "the store cannot hold a value of this request").response()
        log.info("api token=%s %s %s status=%d ms=%.1f", token["name"] if token else "-", request.method,
                 name, response.status, (time.monotonic() - started) * 1000)
        if self.metrics is not None:
            self.metrics.api_call(name, response.status)
        return response

    async def _token(self, request: web.Request) -> dict:
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise ApiError("unauthorized", "send Authorization: Bearer <token> (relay api-token add)")
        token = await self.store.api_token(token_sha256(value.strip()))
        if token is None:
            raise ApiError("unauthorized", "this token is not valid (revoked, or never made)")
        return token

    # --- routes ---------------------------------------------------------------

    async def openapi(self, request: web.Request) -> web.Response:
        from relay.api_spec import openapi_document

        return json_response(openapi_document())

    async def _create_party(self, request: web.Request, role: str) -> web.Response:
        body = await json_object(request)
        no_other_fields(body, {role} | _party_fields(role))
        address = address_field(body, role, self.domain)
        name = text_field(body, f"{role}_name", required=False) or ""
        changes = await self._party_changes(body, role)
        party = await self.store.save_party(role, address, create=True, display_name=name, **changes)
        return json_response(provisioning.party_json(party), 201)

    async def _party_changes(self, body: dict, role: str) -> dict:
        changes = {}
        if role == "seller":
            password = text_field(body, "password", required=False, max_length=auth.MAX_PASSWORD_BYTES)
            if password is not None:
                if len(password) < 8:
                    raise ApiError("invalid_field", "password must have at least 8 characters", "password")
                changes["password_hash"] = await _hash_password(password)
            if "daily_orders_override" in body:
                value = body["daily_orders_override"]
                if value is not None and (type(value) is not int or value < 0):
                    raise ApiError("invalid_field", "daily_orders_override must be a whole number >= 0, or null",
                                   "daily_orders_override")
                changes["daily_orders"] = value
        elif "opted_out" in body:
            if type(body["opted_out"]) is not bool:
                raise ApiError("invalid_field", "opted_out must be true or false", "opted_out")
            changes["opted_out"] = body["opted_out"]
        return changes

    async def _update_party(self, request: web.Request, role: str) -> web.Response:
        address = path_address(request, self.domain)
        body = await json_object(request)
        no_other_fields(body, _party_fields(role))
        name = text_field(body, f"{role}_name", required=False)
        changes = await self._party_changes(body, role)
        party = await self.store.save_party(role, address, create=False, display_name=name, **changes)
        return json_response(provisioning.party_json(party))

    async def _get_party(self, request: web.Request, role: str) -> web.Response:
        address = path_address(request, self.domain)
        party = await self.store.get_party(role, address)
        if party is None:
            raise ApiError("not_found", f"no {role} {address}")
        return json_response(provisioning.party_json(party))

    async def create_seller(self, request):
        return await self._create_party(request, "seller")

    async def get_seller(self, request):
        return await self._get_party(request, "seller")

    async def update_seller(self, request):
        return await self._update_party(request, "seller")

    async def create_buyer(self, request):
        return await self._create_party(request, "buyer")

    async def get_buyer(self, request):
        return await self._get_party(request, "buyer")

    async def update_buyer(self, request):
        return await self._update_party(request, "buyer")

    async def opt_out(self, request):
        party = await self.store.save_party("buyer", path_address(request, self.domain), create=False,
                                            opted_out=True)
        return json_response(provisioning.party_json(party))

    async def opt_in(self, request):
        party = await self.store.save_party("buyer", path_address(request, self.domain), create=False,
                                            opted_out=False)
        return json_response(provisioning.party_json(party))

    async def create_order(self, request: web.Request) -> web.Response:
        body = await json_object(request)
        no_other_fields(body, {"order", "seller", "buyer", "placed_at"})
        order_id = (text_field(body, "order", required=True) or "").strip()
        if not order_id:
            raise ApiError("invalid_field", "order must not be empty", "order")
        seller = address_field(body, "seller", self.domain)
        buyer = address_field(body, "buyer", self.domain)
        placed_at = placed_at_field(body)
        key = request.headers.get("Idempotency-Key")

        def answer(relationship, created: bool) -> tuple[int, str]:
            return 201, json.dumps(provisioning.order_json(relationship, order_id, created), ensure_ascii=False)

        if key is None:
            relationship, created = await self.store.add_order(order_id, seller, buyer, placed_at, self.domain)
            status, text = answer(relationship, created)
            return web.Response(text=text, status=status, content_type="application/json")
        if not key or len(key) > MAX_IDEMPOTENCY_KEY or any(ord(c) < 33 or ord(c) > 126 for c in key):
            raise ApiError("invalid_field", f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII "
                           "characters", "Idempotency-Key")
        # The request as the key's first call made it: a retry must be the same.
        fingerprint = hashlib.sha256(json.dumps([order_id, seller, buyer, body.get("placed_at")]).encode()).hexdigest()
        status, text, replayed = await self.store.add_order_once(
            request[TOKEN_KEY]["id"], key, fingerprint, order_id, seller, buyer, placed_at, self.domain, answer)
        return web.Response(text=text, status=status, content_type="application/json",
                            headers={"Idempotent-Replayed": "true" if replayed else "false"})

    async def find_relationship(self, request: web.Request) -> web.Response:
        query = request.query
        given = [name for name in ("alias", "order", "seller", "buyer") if name in query]
        if given == ["alias"]:
            relationship = await self.store.relationship_by_alias(query["alias"])
        elif given == ["order"]:
            relationship = await self.store.relationship_by_order(query["order"])
        elif sorted(given) == ["buyer", "seller"]:
            relationship = await self.store.relationship_for_pair(query["seller"], query["buyer"])
        else:
            raise ApiError("invalid_field", "give alias, or order, or seller and buyer", "query")
        if relationship is None:
            raise ApiError("not_found", "no such relationship")
        return json_response(await provisioning.relationship_json(self.store, relationship))

    async def _relationship(self, request: web.Request):
        try:
            relationship_id = int(request.match_info["id"])
        except ValueError:
            raise ApiError("invalid_field", "the relationship id must be a number", "id") from None
        relationship = await self.store.relationship_by_id(relationship_id)
        if relationship is None:
            raise ApiError("not_found", f"no relationship {relationship_id}")
        return relationship

    async def get_relationship(self, request):
        return json_response(await provisioning.relationship_json(self.store, await self._relationship(request)))

    async def list_holds(self, request):
        return json_response({"holds": [_hold_json(row) for row in await self.store.holds()]})

    async def place_hold(self, request):
        relationship = await self._relationship(request)
        body = await json_object(request) if request.can_read_body else {}
        no_other_fields(body, {"reason"})
        reason = text_field(body, "reason", required=False, max_length=500) or ""
        placed = await self.store.hold(relationship.id, reason)
        hold = next((row for row in await self.store.holds() if row["relationship"] == relationship.id), None)
        return json_response({"placed": placed, "hold": _hold_json(hold) if hold else None}, 201 if placed else 200)

    async def release_hold(self, request):
        relationship = await self._relationship(request)
        if not await self.store.release(relationship.id):
            raise ApiError("not_found", f"relationship {relationship.id} has no hold")
        return web.Response(status=204)


    # --- the archive (disputes) ------------------------------------------------

    async def search_archive(self, request: web.Request) -> web.Response:
        query = request.query
        no_other_fields(dict(query), {"relationship", "alias", "order", "seller", "buyer", "since", "until",
                                      "verdict", "limit", "page"})
        limit, page = _whole(query, "limit", 50, 1, 500), _whole(query, "page", 1, 1, 1_000_000)
        relationship_id = None
        named = [name for name in ("relationship", "alias", "order") if name in query]
        if len(named) > 1 or (named and ("seller" in query or "buyer" in query)):
            raise ApiError("invalid_field", "give one of relationship, alias, order, or seller and/or buyer",
                           named[-1] if named else "seller")
        if named:
            name = named[0]
            if name == "relationship":
                relationship = await self.store.relationship_by_id(_whole(query, "relationship", 0, 1, 2**62))
            elif name == "alias":
                relationship = await self.store.relationship_by_alias(query["alias"])
            else:
                relationship = await self.store.relationship_by_order(query["order"])
            if relationship is None:
                raise ApiError("not_found", f"no relationship with this {name}")
            relationship_id = relationship.id
        verdict = query.get("verdict")
        if verdict is not None and verdict not in VERDICTS:
            raise ApiError("invalid_field", f"verdict must be one of {', '.join(VERDICTS)}", "verdict")
        rows = await disputes.search(
            self.store, relationship_id=relationship_id, seller=query.get("seller"), buyer=query.get("buyer"),
            since=_when(query, "since"), until=_when(query, "until", end_of_day=True), verdict=verdict,
            limit=limit + 1, offset=(page - 1) * limit)
        return json_response({"messages": rows[:limit], "next_page": page + 1 if len(rows) > limit else None})

    async def _archive_row(self, request: web.Request):
        archive_id = _number(request.match_info["archive_id"], "archive_id")
        found = await disputes.message(self.store, archive_id)
        if found is None:
            raise ApiError("not_found", f"no archive row {archive_id}")
        return found

    async def archive_message(self, request: web.Request) -> web.Response:
        row, summary, _ = await self._archive_row(request)
        shown = disputes.changes(row)
        attachments = await asyncio.to_thread(disputes.attachments, row)
        return json_response({**summary, "headers_removed": shown["headers_removed"],
                              "headers_added": shown["headers_added"], "attachments": attachments})

    async def _archive_bytes(self, request: web.Request, which: str) -> web.Response:
        row, _, _ = await self._archive_row(request)
        try:
            data = disputes.body_bytes(row, which)
        except LookupError as exc:
            raise ApiError("not_found", str(exc)) from None
        except ValueError as exc:
            raise ApiError("damaged", str(exc)) from None
        # The bytes as archived, never rendered: a browser must not run them.
        return web.Response(body=data, content_type="message/rfc822",
                            headers={"Content-Disposition": f'attachment; filename="archive-{row["id"]}-{which}.eml"',
                                     "X-Content-Type-Options": "nosniff",
                                     "Relay-SHA256": row[f"{which}_sha256"]})

    async def archive_raw(self, request):
        return await self._archive_bytes(request, "raw")

    async def archive_delivered(self, request):
        return await self._archive_bytes(request, "delivered")

    async def thread(self, request: web.Request) -> web.Response:
        return json_response(await disputes.thread(self.store, await self._relationship(request)))

    async def export(self, request: web.Request) -> web.Response:
        """The mbox `relay archive export` writes, or its manifest
        (`?part=manifest`): made by the same exporter, in a private
        temporary folder, and sent as written."""
        relationship = await self._relationship(request)
        no_other_fields(dict(request.query), {"as", "part"})
        as_ = request.query.get("as", "raw")
        if as_ not in archive.AS_CHOICES:
            raise ApiError("invalid_field", f"as must be one of {', '.join(archive.AS_CHOICES)}", "as")
        part = request.query.get("part", "mbox")
        if part not in ("mbox", "manifest"):
            raise ApiError("invalid_field", "part must be mbox or manifest", "part")
        rows = [row async for row in self.store.conversation(relationship.id)]
        header = disputes.export_header(relationship, datetime.now(timezone.utc))
        try:
            mbox, manifest = await asyncio.to_thread(_export_mbox, rows, as_, header)
        except archive.ExportError as exc:
            raise ApiError("damaged", str(exc)) from None
        if part == "manifest":
            return web.Response(body=manifest, content_type="application/json")
        return web.Response(body=mbox, content_type="application/mbox",
                            headers={"Content-Disposition":
                                     f'attachment; filename="relationship-{relationship.id}-{as_}.mbox"'})

    async def verify_archive(self, request: web.Request) -> web.Response:
        no_other_fields(dict(request.query), {"head"})
        verifier, breaks, _ = await disputes.verify(self.store, request.query.get("head"))
        return json_response(disputes.verify_json(verifier, breaks))

    async def response_time_report(self, request: web.Request) -> web.Response:
        query = request.query
        no_other_fields(dict(query), {"since", "until", "seller"})
        since, until = _when(query, "since"), _when(query, "until", end_of_day=True)
        now = archive.parse_iso(until) if until else datetime.now(timezone.utc)
        try:
            sellers = await disputes.response_report(self.store, now, since=since, until=until,
                                                     seller=query.get("seller"))
        except LookupError as exc:
            raise ApiError("not_found", str(exc)) from None
        return json_response(archive.report_json(sellers, now, since))


VERDICTS = ("delivered", "rejected", "deferred", "failed")


def _number(text: str, field: str) -> int:
    if not text.isdigit() or len(text) > 18:
        raise ApiError("invalid_field", f"{field} must be a whole number", field)
    return int(text)


def _whole(query, name: str, default: int, low: int, high: int) -> int:
    if name not in query:
        return default
    value = _number(query[name], name)
    if not low <= value <= high:
        raise ApiError("invalid_field", f"{name} must be from {low} to {high}", name)
    return value


def _when(query, name: str, end_of_day: bool = False) -> str | None:
    if name not in query:
        return None
    try:
        return archive.parse_when(query[name], end_of_day)
    except ValueError as exc:
        raise ApiError("invalid_field", f"{name}: {exc}", name) from None


def _export_mbox(rows: list[dict], as_: str, header: dict) -> tuple[bytes, bytes]:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="relay-export-") as folder:
        out = Path(folder) / "export.mbox"
        exporter = archive.Exporter(out, "mbox", as_, header)
        try:
            for row in rows:
                exporter.add(row)
            exporter.finish()
        except BaseException:
            exporter.abort()
            raise
        return out.read_bytes(), exporter.manifest_path.read_bytes()


def _hold_json(row: dict) -> dict:
    # `relay archive holds --json`'s fields.
    return {name: row[name] for name in ("relationship", "seller", "buyer", "held_at", "reason")}


async def _hash_password(password: str) -> str:
    # scrypt: CPU seconds' worth, off the loop.
    return await asyncio.to_thread(auth.hash_password, password)


class ApiServer:
    """The API on its endpoint, in the running event loop."""

    def __init__(self, api: Api, endpoint):
        self.api, self.endpoint = api, endpoint
        self._runner: web.AppRunner | None = None
        self.address: tuple[str, int] | None = None

    async def start(self) -> None:
        self._runner = web.AppRunner(self.api.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.endpoint.host, self.endpoint.port)
        await site.start()
        self.address = site._server.sockets[0].getsockname()[:2]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

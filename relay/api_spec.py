"""The OpenAPI 3.1 document of the HTTP API (relay/api.py), served at
/api/openapi.json. tests/integration/test_api.py checks every answer the
tests get against the schema this document gives for its route and status,
so the document cannot drift from what the relay answers."""

from __future__ import annotations

from relay import __version__


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


ERROR = _json(_ref("Error"), "an error; `code` says which (see the Error schema)")
ERRORS = {"400": ERROR, "401": ERROR, "403": ERROR, "404": ERROR, "409": ERROR, "413": ERROR, "500": ERROR,
          "503": ERROR}

ADDRESS = {"type": "string", "format": "email", "maxLength": 254}
TIME = {"type": "string", "description": "UTC, ISO 8601 (2026-12-07T10:00:00.000000Z)"}
NULLABLE_TIME = {"type": ["string", "null"], "description": TIME["description"]}
SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
VERDICT = {"type": "string", "enum": ["delivered", "rejected", "deferred", "failed"]}
DIRECTION = {"type": ["string", "null"], "enum": ["buyer_to_seller", "seller_to_buyer", None]}
COUNT = {"type": ["integer", "null"], "minimum": 0}


def _object(properties: dict, optional: tuple = ()) -> dict:
    """An object with exactly these fields (all required but `optional`)."""
    return {"type": "object", "additionalProperties": False, "properties": properties,
            "required": [name for name in properties if name not in optional]}


# The archive's answers use the field names of the CLI's --json (docs/cli.md).
ARCHIVE_ROW = {"archive_id": {"type": "integer"}, "received_at": TIME, "relationship": {"type": ["integer", "null"]},
               "seller": {"type": ["string", "null"]}, "buyer": {"type": ["string", "null"]},
               "direction": DIRECTION, "verdict": VERDICT, "reply": {"type": ["string", "null"]}, "bytes": COUNT,
               "delivered_bytes": COUNT, "purged_at": NULLABLE_TIME}
ARCHIVE_MESSAGE = {
    "archive_id": {"type": "integer"}, "received_at": TIME, "relationship": {"type": ["integer", "null"]},
    "seller": {"type": ["string", "null"]}, "buyer": {"type": ["string", "null"]}, "direction": DIRECTION,
    "client_address": {"type": ["string", "null"]}, "mail_from": {"type": ["string", "null"]},
    "rcpt_to": {"type": ["array", "null"], "items": {"type": "string"}}, "verdict": VERDICT,
    "reply": {"type": ["string", "null"]},
    "changes": {"type": ["array", "null"], "items": {"type": "string"},
                "description": "what the rules did, or the refusal's reasons"},
    "bytes": COUNT, "delivered_bytes": COUNT, "raw_sha256": SHA256, "delivered_sha256": {"type": ["string", "null"]},
    "prev_sha256": SHA256, "row_sha256": SHA256, "auto_reply": {"type": ["boolean", "null"]},
    "purged_at": NULLABLE_TIME, "decode_error": {"type": ["string", "null"]},
    "bounces": {"type": "array", "items": _object({
        "bounce_id": {"type": "integer"}, "received_at": TIME, "action": {"type": "string"},
        "status": {"type": ["string", "null"]}, "detector": {"type": ["string", "null"]},
        "notified": {"type": "boolean"}})},
}

SELLER_FIELDS = {"seller_name": {"type": "string", "maxLength": 200},
                 "password": {"type": "string", "minLength": 8,
                              "description": "for submission (SMTP AUTH); stored as a scrypt hash"},
                 "daily_orders_override": {"type": ["integer", "null"], "minimum": 0}}
BUYER_FIELDS = {"buyer_name": {"type": "string", "maxLength": 200}, "opted_out": {"type": "boolean"}}
RELATIONSHIP = {"relationship": {"type": "integer"}, "seller": ADDRESS, "buyer": ADDRESS,
                "seller_alias": {**ADDRESS, "description": "the buyer writes here"},
                "buyer_alias": {**ADDRESS, "description": "the seller writes here"},
                "created_at": TIME}

SCHEMAS = {
    "Error": {
        "type": "object", "required": ["error"], "additionalProperties": False,
        "properties": {"error": {
            "type": "object", "required": ["code", "message"], "additionalProperties": False,
            "properties": {
                "code": {"type": "string", "enum": ["unauthorized", "forbidden", "not_found", "conflict",
                                                    "invalid_json", "invalid_field", "too_large", "unavailable",
                                                    "damaged"]},
                "message": {"type": "string"},
                "field": {"type": "string", "description": "the field (or header) that is wrong"},
            }}},
    },
    # Provisioning's answers are the CLI's --json (relay/provisioning.py, docs/cli.md).
    "Seller": _object({"party_id": {"type": "integer"}, "seller": ADDRESS, "seller_name": {"type": "string"},
                       "daily_orders_override": {"type": ["integer", "null"],
                                                 "description": "the orders the daily cap counts instead of the "
                                                                "real count; null: the real count"}}),
    "Buyer": _object({"party_id": {"type": "integer"}, "buyer": ADDRESS, "buyer_name": {"type": "string"},
                      "opted_out": {"type": "boolean",
                                    "description": "refuses messages a seller starts (replies still pass)"}}),
    "NewSeller": _object({"seller": ADDRESS, **SELLER_FIELDS}, optional=tuple(SELLER_FIELDS)),
    "SellerChange": _object(SELLER_FIELDS, optional=tuple(SELLER_FIELDS)),
    "NewBuyer": _object({"buyer": ADDRESS, **BUYER_FIELDS}, optional=tuple(BUYER_FIELDS)),
    "BuyerChange": _object(BUYER_FIELDS, optional=tuple(BUYER_FIELDS)),
    "Relationship": _object({
        **RELATIONSHIP, "seller_name": {"type": "string"}, "buyer_name": {"type": "string"},
        "orders": {"type": "integer", "minimum": 0},
        "messages": _object({"buyer_to_seller": {"type": "integer"}, "seller_to_buyer": {"type": "integer"}},),
        "last_message_at": NULLABLE_TIME}),
    "NewOrder": _object({"order": {"type": "string", "minLength": 1, "maxLength": 200,
                                   "description": "the marketplace's own order id"},
                         "seller": ADDRESS, "buyer": ADDRESS, "placed_at": {**TIME, "description": "default: now"}},
                        optional=("placed_at",)),
    "OrderCreated": _object({**RELATIONSHIP, "order": {"type": "string"},
                             "created": {"type": "boolean",
                                         "description": "this order made the relationship (false: it existed)"}}),
    "Hold": _object({"relationship": {"type": "integer"}, "seller": ADDRESS, "buyer": ADDRESS, "held_at": TIME,
                     "reason": {"type": "string"}}),
    "HoldPlaced": {
        "type": "object", "required": ["placed", "hold"], "additionalProperties": False,
        "properties": {"placed": {"type": "boolean", "description": "false: it was held already"},
                       "hold": _ref("Hold")},
    },
    "ArchivePage": _object({"messages": {"type": "array", "items": _object(ARCHIVE_ROW)},
                            "next_page": {"type": ["integer", "null"],
                                          "description": "the next page's number, or null: this was the last"}}),
    "ArchiveMessage": _object({
        **ARCHIVE_MESSAGE,
        "headers_removed": {"type": "array", "items": {"type": "string"}},
        "headers_added": {"type": "array", "items": {"type": "string"}},
        "attachments": {"type": "array", "items": _object({
            "filename": {"type": ["string", "null"]}, "content_type": {"type": "string"},
            "bytes": COUNT})}}),
    "Thread": _object({"relationship": {"type": "integer"}, "seller": ADDRESS, "buyer": ADDRESS,
                       "seller_alias": ADDRESS, "buyer_alias": ADDRESS,
                       "messages": {"type": "array", "items": _object(ARCHIVE_MESSAGE)}}),
    "Verification": _object({"ok": {"type": "boolean"}, "rows": {"type": "integer"},
                             "purged": {"type": "integer"}, "head": {"type": ["string", "null"]},
                             "breaks": {"type": "array", "items": _object({
                                 "archive_id": {"type": "integer"}, "kind": {"type": "string"},
                                 "detail": {"type": "string"}})}}),
    "ExportManifest": {"type": "object", "required": ["relationship", "format", "as", "messages", "omitted",
                                                      "exported_at", "note"],
                       "description": "as `relay archive export` writes it beside the mbox"},
    "ResponseTimeReport": {"type": "object", "required": ["as_of", "since", "answer_within_hours", "sellers"],
                           "properties": {"sellers": {"type": "array", "items": {"type": "object"}}},
                           "description": "as `relay report response-time --json` prints it"},
    "Holds": {
        "type": "object", "required": ["holds"], "additionalProperties": False,
        "properties": {"holds": {"type": "array", "items": _ref("Hold")}},
    },
}

ADDRESS_PARAMETER = {"name": "address", "in": "path", "required": True, "schema": ADDRESS}
ID_PARAMETER = {"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}
ARCHIVE_ID_PARAMETER = {"name": "archive_id", "in": "path", "required": True, "schema": {"type": "integer"}}
RFC822 = {"description": "the bytes (Relay-SHA256 gives their hash)",
          "content": {"message/rfc822": {"schema": {"type": "string", "contentMediaType": "message/rfc822"}}}}


def _operation(summary: str, roles: str, responses: dict, *, body: str | None = None,
               parameters: list | None = None, headers: list | None = None) -> dict:
    operation = {"summary": summary, "description": f"Roles: {roles}.", "responses": {**responses, **ERRORS}}
    if body:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(body)}}}
    if parameters or headers:
        operation["parameters"] = (parameters or []) + (headers or [])
    return operation


PATHS = {
    "/api/v1/sellers": {"post": _operation("Register a seller", "provisioning, admin",
                                           {"201": _json(_ref("Seller"), "registered")}, body="NewSeller")},
    "/api/v1/sellers/{address}": {
        "get": _operation("A seller", "provisioning, admin", {"200": _json(_ref("Seller"), "the seller")},
                          parameters=[ADDRESS_PARAMETER]),
        "patch": _operation("Change a seller (only the fields given)", "provisioning, admin",
                            {"200": _json(_ref("Seller"), "changed")}, body="SellerChange",
                            parameters=[ADDRESS_PARAMETER]),
    },
    "/api/v1/buyers": {"post": _operation("Register a buyer", "provisioning, admin",
                                          {"201": _json(_ref("Buyer"), "registered")}, body="NewBuyer")},
    "/api/v1/buyers/{address}": {
        "get": _operation("A buyer", "provisioning, admin", {"200": _json(_ref("Buyer"), "the buyer")},
                          parameters=[ADDRESS_PARAMETER]),
        "patch": _operation("Change a buyer (only the fields given)", "provisioning, admin",
                            {"200": _json(_ref("Buyer"), "changed")}, body="BuyerChange",
                            parameters=[ADDRESS_PARAMETER]),
    },
    "/api/v1/buyers/{address}/opt-out": {"post": _operation(
        "The buyer refuses messages a seller starts", "provisioning, admin",
        {"200": _json(_ref("Buyer"), "opted out")}, parameters=[ADDRESS_PARAMETER])},
    "/api/v1/buyers/{address}/opt-in": {"post": _operation(
        "The buyer takes messages a seller starts again", "provisioning, admin",
        {"200": _json(_ref("Buyer"), "opted in")}, parameters=[ADDRESS_PARAMETER])},
    "/api/v1/orders": {"post": _operation(
        "Record an order; the pair's relationship (with both aliases) is made on its first order",
        "provisioning, admin", {"201": {**_json(_ref("OrderCreated"), "recorded (or, with a known "
                                                                       "Idempotency-Key, the first answer again)"),
                                        "headers": {"Idempotent-Replayed": {"schema": {"enum": ["true", "false"]}}}}},
        body="NewOrder",
        headers=[{"name": "Idempotency-Key", "in": "header", "required": False,
                  "schema": {"type": "string", "minLength": 1, "maxLength": 200},
                  "description": "a retry with the same key and body gets the first answer, never a second "
                                 "order; the same key with another body is a 409"}])},
    "/api/v1/relationships": {"get": _operation(
        "Look a relationship up: by alias, by order, or by seller and buyer", "provisioning, admin",
        {"200": _json(_ref("Relationship"), "the relationship")},
        parameters=[{"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
                    for name in ("alias", "order", "seller", "buyer")])},
    "/api/v1/relationships/{id}": {"get": _operation(
        "A relationship by id", "provisioning, disputes, admin",
        {"200": _json(_ref("Relationship"), "the relationship")}, parameters=[ID_PARAMETER])},
    "/api/v1/relationships/{id}/hold": {
        "put": _operation("Keep the relationship's archive from purge (a dispute)", "disputes, admin",
                          {"201": _json(_ref("HoldPlaced"), "held now"),
                           "200": _json(_ref("HoldPlaced"), "it was held already")},
                          parameters=[ID_PARAMETER]),
        "delete": _operation("End the hold", "disputes, admin", {"204": {"description": "released"}},
                             parameters=[ID_PARAMETER]),
    },
    "/api/v1/relationships/{id}/thread": {"get": _operation(
        "The relationship's messages in order, both directions, with what the relay did to each",
        "disputes, admin", {"200": _json(_ref("Thread"), "the thread")}, parameters=[ID_PARAMETER])},
    "/api/v1/relationships/{id}/export": {"get": _operation(
        "The export `relay archive export --format mbox` writes: the mbox, or (part=manifest) its manifest",
        "disputes, admin",
        {"200": {"description": "the mbox (mboxrd), or the manifest",
                 "content": {"application/mbox": {"schema": {"type": "string", "contentMediaType": "application/mbox"}},
                             "application/json": {"schema": _ref("ExportManifest")}}}},
        parameters=[ID_PARAMETER,
                    {"name": "as", "in": "query", "required": False, "schema": {"enum": ["raw", "delivered"]}},
                    {"name": "part", "in": "query", "required": False, "schema": {"enum": ["mbox", "manifest"]}}])},
    "/api/v1/archive": {"get": _operation(
        "Search the archive, newest first: by relationship (id, alias or order), party, time, verdict",
        "disputes, admin", {"200": _json(_ref("ArchivePage"), "one page")},
        parameters=[{"name": name, "in": "query", "required": False, "schema": schema, "description": text}
                    for name, schema, text in (
                        ("relationship", {"type": "integer"}, "a relationship id"),
                        ("alias", {"type": "string"}, "either alias of the relationship"),
                        ("order", {"type": "string"}, "an order of the relationship (the marketplace's id)"),
                        ("seller", ADDRESS, "the seller's real address"),
                        ("buyer", ADDRESS, "the buyer's real address"),
                        ("since", {"type": "string"}, "a date or date-time (UTC unless zoned), inclusive"),
                        ("until", {"type": "string"}, "a date (its whole day) or date-time, exclusive"),
                        ("verdict", VERDICT, ""),
                        ("limit", {"type": "integer", "minimum": 1, "maximum": 500}, "default 50"),
                        ("page", {"type": "integer", "minimum": 1}, "default 1"))])},
    "/api/v1/archive/verify": {"get": _operation(
        "Verify the archive's hash chain (`relay archive verify`); ok is false if any row was changed",
        "disputes, admin", {"200": _json(_ref("Verification"), "the verification")},
        parameters=[{"name": "head", "in": "query", "required": False, "schema": SHA256,
                     "description": "a head noted earlier: is it still in the chain?"}])},
    "/api/v1/archive/{archive_id}": {"get": _operation(
        "One archived message: envelope, verdict and reply, every change or refusal reason, the header "
        "changes, attachments, delivery reports and hashes", "disputes, admin",
        {"200": _json(_ref("ArchiveMessage"), "the message")}, parameters=[ARCHIVE_ID_PARAMETER])},
    "/api/v1/archive/{archive_id}/raw": {"get": _operation(
        "The message as received, byte for byte (checked against its hash)", "disputes, admin",
        {"200": RFC822}, parameters=[ARCHIVE_ID_PARAMETER])},
    "/api/v1/archive/{archive_id}/delivered": {"get": _operation(
        "The message as delivered, byte for byte (checked against its hash)", "disputes, admin",
        {"200": RFC822}, parameters=[ARCHIVE_ID_PARAMETER])},
    "/api/v1/reports/response-time": {"get": _operation(
        "The response-time report (`relay report response-time --json`)", "disputes, admin",
        {"200": _json(_ref("ResponseTimeReport"), "the report")},
        parameters=[{"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
                    for name in ("since", "until", "seller")])},
    "/api/v1/holds": {"get": _operation("Relationships on hold", "disputes, admin",
                                        {"200": _json(_ref("Holds"), "the holds")})},
}


def openapi_document() -> dict:
    return {
        "openapi": "3.1.0",
        "info": {"title": "relay HTTP API", "version": __version__,
                 "description": "Provisioning and disputes for an aliasing mail relay. Every call needs "
                                "`Authorization: Bearer <token>` (`relay api-token add NAME --role ROLE`)."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}, "schemas": SCHEMAS},
        "paths": PATHS,
    }

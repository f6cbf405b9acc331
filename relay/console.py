"""The dispute console: server-rendered pages for the dispute team, on the
API's listener under /console (relay/api.py mounts it), over the same
store and the same answers as the API (relay/disputes.py).

A person logs in with a `disputes` (or `admin`) API token. The console
keeps a session in memory (a restart logs everyone out): the cookie is a
random id, `HttpOnly`, `SameSite=Strict`, path /console; every form carries
the session's CSRF token and a POST must come from the console's own
origin. The token is checked against the store on every request, so
revoking it ends its sessions. Failed logins are throttled per client
address like submission AUTH (auth.Throttle): a growing delay, then 429.

Archived mail is hostile input. A message's HTML is shown only inside
`<iframe sandbox>` from its own URL, served with `Content-Security-Policy:
sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src data:`: no
script runs and nothing is fetched from anywhere. The raw message is shown
as escaped text only. The pages themselves run one script of their own
(times in the viewer's zone) and load nothing from elsewhere.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import hmac
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import jinja2
from aiohttp import web

from relay import archive, disputes

COOKIE = "relay_console"
SESSION_SECONDS = 8 * 3600
CONSOLE_ROLES = ("admin", "disputes")
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-src 'self'; "
            "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
MESSAGE_CSP = "sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"
STATIC = Path(__file__).with_name("console_files")
MAX_SHOWN_RAW = 512 * 1024  # the raw text shown on a page; the rest is in the download


@dataclass
class Session:
    token_sha256: str
    token_name: str
    role: str
    csrf: str
    expires: float


def _templates() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(STATIC / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["arrow"] = lambda d: {"buyer_to_seller": "buyer → seller",
                                      "seller_to_buyer": "seller → buyer"}.get(d, "—")
    return env


class Console:
    """The console's routes (`app()`), its sessions and its login throttle."""

    def __init__(self, store, throttle, token_sha256, clock=time.monotonic):
        self.store = store
        self.throttle = throttle
        self.token_sha256 = token_sha256
        self.clock = clock
        self.sessions: dict[str, Session] = {}
        self.env = _templates()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._headers])
        app.router.add_get("", self.home)
        app.router.add_get("/", self.home)
        app.router.add_get("/login", self.login_page)
        app.router.add_post("/login", self.login)
        app.router.add_post("/logout", self.logout)
        app.router.add_get("/search", self.search)
        app.router.add_get("/relationships/{id}", self.thread)
        app.router.add_post("/relationships/{id}/hold", self.hold)
        app.router.add_get("/messages/{archive_id}", self.message)
        app.router.add_get("/messages/{archive_id}/body", self.message_body)
        app.router.add_get("/verify", self.verify)
        app.router.add_get("/report", self.report)
        app.router.add_get("/static/{name}", self.static)
        return app

    @web.middleware
    async def _headers(self, request: web.Request, handler):
        response = await handler(request)
        response.headers.setdefault("Content-Security-Policy", PAGE_CSP)
        response.headers["X-Content-Type-Options"] = "nosniff"
        # same-origin, not no-referrer: with no-referrer a browser sends `Origin: null`
        # on its own forms, and the origin check could not tell them from a forgery.
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["Cache-Control"] = "no-store"
        return response

    # --- sessions ---------------------------------------------------------------

    async def _session(self, request: web.Request) -> Session:
        """The caller's live session, or a redirect to the login page."""
        sid = request.cookies.get(COOKIE, "")
        session = self.sessions.get(sid)
        if session is not None and session.expires > self.clock():
            token = await self.store.api_token(session.token_sha256)
            if token is not None and token["role"] in CONSOLE_ROLES:
                return session
        self.sessions.pop(sid, None)
        raise web.HTTPSeeOther("/console/login")

    async def _form(self, request: web.Request, session: Session | None) -> dict:
        """A POST's fields, after the same-origin and CSRF checks."""
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"{request.scheme}://{request.host}":
            raise web.HTTPForbidden(text="cross-origin form refused")
        form = await request.post()
        if session is not None and not hmac.compare_digest(str(form.get("csrf", "")), session.csrf):
            raise web.HTTPForbidden(text="the form's CSRF token is missing or stale; reload the page")
        return form

    def _page(self, name: str, status: int = 200, **values) -> web.Response:
        text = self.env.get_template(name).render(**values)
        return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")

    # --- pages --------------------------------------------------------------------

    async def home(self, request):
        await self._session(request)
        raise web.HTTPSeeOther("/console/search")

    async def login_page(self, request, error: str | None = None, status: int = 200):
        return self._page("login.html", status, error=error, session=None)

    async def login(self, request: web.Request):
        peer = request.remote or "-"
        if self.throttle.blocked(peer):
            return await self.login_page(request, "Too many failed logins from here; wait and try again.", 429)
        form = await self._form(request, None)
        token = str(form.get("token", "")).strip()
        row = await self.store.api_token(self.token_sha256(token)) if token else None
        if row is None or row["role"] not in CONSOLE_ROLES:
            await asyncio.sleep(self.throttle.failure("console", peer))
            return await self.login_page(request, "That is not a live disputes or admin token.", 401)
        self.throttle.success("console", peer)
        sid = secrets.token_urlsafe(32)
        self.sessions = {k: v for k, v in self.sessions.items() if v.expires > self.clock()}
        self.sessions[sid] = Session(self.token_sha256(token), row["name"], row["role"], secrets.token_urlsafe(32),
                                     self.clock() + SESSION_SECONDS)
        response = web.HTTPSeeOther("/console/search")
        response.set_cookie(COOKIE, sid, httponly=True, samesite="Strict", path="/console",
                            secure=request.secure, max_age=SESSION_SECONDS)
        raise response

    async def logout(self, request):
        session = await self._session(request)
        await self._form(request, session)
        self.sessions.pop(request.cookies.get(COOKIE, ""), None)
        response = web.HTTPSeeOther("/console/login")
        response.del_cookie(COOKIE, path="/console")
        raise response

    async def search(self, request: web.Request):
        session = await self._session(request)
        query = {name: request.query.get(name, "").strip() for name in ("q", "since", "until", "verdict")}
        rows, error, relationship = [], None, None
        if any(query.values()):
            try:
                relationship_id = None
                q = query["q"]
                if q:
                    relationship = await disputes.find_relationship(self.store, q)
                    if relationship is None:
                        raise LookupError(f"No relationship has the order, alias or id “{q}”.")
                    relationship_id = relationship.id
                since = archive.parse_when(query["since"]) if query["since"] else None
                until = archive.parse_when(query["until"], True) if query["until"] else None
                rows = await disputes.search(self.store, relationship_id=relationship_id, since=since, until=until,
                                             verdict=query["verdict"] or None, limit=200)
            except (LookupError, ValueError) as exc:
                error = str(exc)
        return self._page("search.html", session=session, query=query, rows=rows, error=error,
                          relationship=relationship, searched=any(query.values()))

    async def _relationship(self, request):
        relationship_id = _path_id(request, "id")
        relationship = await self.store.relationship_by_id(relationship_id) if relationship_id else None
        if relationship is None:
            raise web.HTTPNotFound(text="no such relationship")
        return relationship

    async def thread(self, request: web.Request):
        session = await self._session(request)
        relationship = await self._relationship(request)
        thread = await disputes.thread(self.store, relationship)
        hold = next((h for h in await self.store.holds() if h["relationship"] == relationship.id), None)
        return self._page("thread.html", session=session, thread=thread, hold=hold)

    async def hold(self, request: web.Request):
        session = await self._session(request)
        form = await self._form(request, session)
        relationship = await self._relationship(request)
        if form.get("action") == "release":
            await self.store.release(relationship.id)
        else:
            reason = str(form.get("reason", "")).strip()[:500]
            await self.store.hold(relationship.id, f"{reason} (console: {session.token_name})".strip())
        raise web.HTTPSeeOther(f"/console/relationships/{relationship.id}")

    async def _row(self, request):
        archive_id = _path_id(request, "archive_id")
        found = await disputes.message(self.store, archive_id) if archive_id else None
        if found is None:
            raise web.HTTPNotFound(text="no such archived message")
        return found

    async def message(self, request: web.Request):
        session = await self._session(request)
        row, summary, relationship = await self._row(request)
        shown = disputes.changes(row)
        readable = not row["purged_at"] and not row["decode_error"]
        raw = row["raw"] if readable else None
        attachments = await asyncio.to_thread(disputes.attachments, row)
        which = "delivered" if readable and row["delivered"] is not None else "raw"
        # Parsed off the loop, as the frame's own route does.
        has_html = readable and await asyncio.to_thread(_html_part, row[which]) is not None
        raw_text = raw[:MAX_SHOWN_RAW].decode("utf-8", "replace") if raw is not None else None
        return self._page("message.html", session=session, m=summary, shown=shown, attachments=attachments,
                          which=which, has_html=has_html, raw_text=raw_text,
                          raw_cut=raw is not None and len(raw) > MAX_SHOWN_RAW)

    async def message_body(self, request: web.Request):
        """The message's HTML for the sandboxed iframe, under its own CSP."""
        await self._session(request)
        row, _, _ = await self._row(request)
        which = "raw" if request.query.get("as") == "raw" or row["delivered"] is None else "delivered"
        try:
            data = disputes.body_bytes(row, which)
        except (LookupError, ValueError) as exc:
            raise web.HTTPNotFound(text=str(exc)) from None
        html = await asyncio.to_thread(_html_part, data)
        response = web.Response(text=html or "", content_type="text/html", charset="utf-8")
        response.headers["Content-Security-Policy"] = MESSAGE_CSP
        return response

    async def verify(self, request: web.Request):
        session = await self._session(request)
        verifier, breaks, _ = await disputes.verify(self.store)
        return self._page("verify.html", session=session, result=disputes.verify_json(verifier, breaks))

    async def report(self, request: web.Request):
        session = await self._session(request)
        now = datetime.now(timezone.utc)
        sellers = await disputes.response_report(self.store, now)
        charts = [(seller, jinja2.utils.markupsafe.Markup(archive.svg_chart(seller))) for seller in sellers]
        return self._page("report.html", session=session, charts=charts, as_of=archive.iso(now))

    async def static(self, request: web.Request):
        name = request.match_info["name"]
        kinds = {"console.css": "text/css", "console.js": "text/javascript"}
        if name not in kinds:
            raise web.HTTPNotFound()
        return web.Response(body=(STATIC / name).read_bytes(), content_type=kinds[name])


def _path_id(request: web.Request, name: str) -> int | None:
    """A numeric id from the URL, or None (the page is then a 404)."""
    text = request.match_info[name]
    return int(text) if text.isdigit() and len(text) < 18 else None


def _html_part(data: bytes | None) -> str | None:
    """The first text/html part of a message, decoded, or None."""
    if not data:
        return None
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    for part in parsed.walk():
        if part.get_content_type() == "text/html" and part.get_content_disposition() != "attachment":
            try:
                return part.get_content()
            except (LookupError, ValueError):
                return part.get_payload(decode=True).decode("utf-8", "replace")
    return None

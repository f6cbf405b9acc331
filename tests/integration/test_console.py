"""The dispute console (relay/console.py) in a real browser: Debian's
chromium, driven by Playwright, against a real relay that carried real
mail (a delivered message with an attachment, the seller's answer, and a
refused message full of hostile HTML aimed at a tracker on loopback).

The person logs in with a disputes token, searches an order, opens the
thread, places a hold, opens the hostile message (no script runs, no
request leaves for the tracker), checks the chain and the response-time
chart. Screenshots of each page land in the test's folder, or in
$RELAY_CONSOLE_SCREENSHOTS (how docs/console/ was made)."""

from __future__ import annotations

import http.server
import os
import shutil
import threading
from dataclasses import replace
from email.message import EmailMessage
from pathlib import Path

import pytest

from archive_support import send
from relay import api
from relay.config import ApiConfig, Endpoint
from support import RunningRelay, make_config, message, upstream_url
from test_api import make_token

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        raise RuntimeError("CI must install Debian's chromium for the console tests (.ci/run)")
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)

from playwright.sync_api import expect, sync_playwright  # noqa: E402

# As the machine's own probe starts it: no sandbox as root, nothing of Google's.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class Tracker:
    """An HTTP server on loopback that records every request it gets:
    the hostile message aims its script, image and style sheet here."""

    def __init__(self):
        hits = self.hits = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hits.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def hostile_html(sender: str, to: str, tracker: int) -> bytes:
    mail = EmailMessage()
    mail["From"], mail["To"], mail["Subject"] = sender, to, "Cheap pills"
    mail.set_content("Buy now.\n")
    origin = f"http://127.0.0.1:{tracker}"
    mail.add_alternative(
        f'<html><head><link rel="stylesheet" href="{origin}/style.css"></head><body>'
        f'<h1 id="lure">Buy now</h1><img src="{origin}/pixel.gif">'
        f'<script>fetch("{origin}/script-ran"); parent.document.title = "pwned";</script>'
        f'<form action="{origin}/form"><button>ok</button></form>'
        f'<iframe src="{origin}/frame"></iframe></body></html>', subtype="html")
    return bytes(mail)


@pytest.fixture
def console_world(tmp_path, upstream):
    tracker = Tracker()
    config = make_config(tmp_path, upstream_url(upstream),
                         submission={"failure_delay": 0.01, "max_failure_delay": 0.05, "max_failures": 4})
    relay = RunningRelay(replace(config, api=ApiConfig(listen=Endpoint("127.0.0.1", 0))))
    try:
        pair = relay.pair()
        mail = EmailMessage()
        mail["From"], mail["To"], mail["Subject"] = pair.buyer, pair.seller_alias, "The mug"
        mail["Message-ID"] = "<mug-1@mail.example>"
        mail.set_content("It arrived broken.\n")
        mail.add_alternative("<p>It arrived <b>broken</b>. <a href='https://evil.example/'>see</a></p>",
                             subtype="html")
        mail.add_attachment(b"%PDF-1.4\n" + b"0" * 2000 + b"\n%%EOF\n", maintype="application", subtype="pdf",
                            filename="photo-of-mug.pdf")
        assert send(relay, pair.buyer, pair.seller_alias, bytes(mail))[0] == 250
        assert send(relay, pair.seller, pair.buyer_alias,
                    message(pair.seller, pair.buyer_alias, subject="Re: The mug", body="A new one is coming.\n",
                            headers={"In-Reply-To": "<mug-1@mail.example>"}))[0] == 250
        # The buyer's envelope, someone else's From: refused after DATA, archived raw.
        assert send(relay, pair.buyer, pair.seller_alias,
                    hostile_html("stranger@else.example", pair.seller_alias, tracker.port))[0] == 550
        upstream.wait_for(2)
        tokens = {role: make_token(relay, f"{role}-desk", role) for role in api.ROLES}
        yield relay, pair, tokens, tracker
    finally:
        relay.stop()
        tracker.stop()


@pytest.fixture
def browser():
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def shots_folder(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("RELAY_CONSOLE_SCREENSHOTS") or tmp_path / "shots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def shoot(page, folder: Path, name: str) -> None:
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 5000  # a rendered page, not a blank one


def log_in(page, base: str, token: str) -> None:
    page.goto(f"{base}/console/login")
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Log in").click()


def test_the_dispute_team_works_a_case_in_the_browser(console_world, browser, tmp_path):
    relay, pair, tokens, tracker = console_world
    host, port = relay.threaded.server.api_address
    base = f"http://{host}:{port}"
    shots = shots_folder(tmp_path)
    context = browser.new_context(viewport={"width": 1280, "height": 800}, timezone_id="Europe/Berlin")
    page = context.new_page()
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    blocked = []
    page.on("requestfailed", lambda request: blocked.append((request.url, request.failure)))

    # Without a session every page sends the person to the login page.
    page.goto(f"{base}/console/search?q=ORDER-1")
    assert page.url == f"{base}/console/login"
    shoot(page, shots, "login")
    # A wrong token, and a provisioning token, are refused.
    log_in(page, base, "rly_not-a-token")
    expect(page.get_by_role("alert")).to_contain_text("not a live disputes or admin token")
    log_in(page, base, tokens["provisioning"])
    expect(page.get_by_role("alert")).to_contain_text("not a live disputes or admin token")
    log_in(page, base, tokens["disputes"])
    assert page.url == f"{base}/console/search"
    [cookie] = context.cookies()
    assert (cookie["name"], cookie["httpOnly"], cookie["sameSite"], cookie["path"]) == (
        "relay_console", True, "Strict", "/console")
    expect(page.locator("p.empty")).to_contain_text("Enter an order id")

    # Search the order: three messages, newest first.
    page.get_by_label("Order id, alias or relationship id").fill("ORDER-1")
    page.get_by_role("button", name="Search").click()
    rows = page.locator("table tbody tr")
    expect(rows).to_have_count(3)
    expect(rows.nth(0)).to_contain_text("rejected")
    expect(rows.nth(2)).to_contain_text("delivered")
    # Times in UTC, and in the viewer's zone beside them (the page's own script).
    expect(rows.nth(0).locator("time")).to_contain_text("UTC")
    expect(rows.nth(0).locator("time .local")).to_contain_text("your time")
    shoot(page, shots, "search")
    page.get_by_label("Order id, alias or relationship id").fill("NO-SUCH-ORDER")
    page.keyboard.press("Enter")
    expect(page.get_by_role("alert")).to_contain_text("No relationship has the order")

    # The thread, as a timeline; place a hold.
    page.goto(f"{base}/console/relationships/{pair.relationship_id}")
    timeline = page.locator("ol.timeline > li")
    expect(timeline).to_have_count(3)
    expect(timeline.nth(0)).to_contain_text("buyer wrote")
    expect(timeline.nth(1)).to_contain_text("seller wrote")
    expect(timeline.nth(2)).to_contain_text("Refused: 550")
    page.get_by_label("Reason").fill("case 2026-118")
    page.get_by_role("button", name="Place a hold").click()
    expect(page.locator("#hold-state")).to_contain_text("on hold since")
    expect(page.locator("#hold-state")).to_contain_text("case 2026-118")
    [hold] = relay.call(relay.store.holds())
    assert hold["relationship"] == pair.relationship_id and "case 2026-118" in hold["reason"]
    shoot(page, shots, "thread")
    # A form without the session's CSRF token, or from another origin, is refused.
    forged = context.request.post(f"{base}/console/relationships/{pair.relationship_id}/hold",
                                  form={"action": "release"})
    assert forged.status == 403
    cross = context.request.post(f"{base}/console/relationships/{pair.relationship_id}/hold",
                                 form={"action": "release", "csrf": "x"}, headers={"Origin": "http://evil.example"})
    assert cross.status == 403
    assert len(relay.call(relay.store.holds())) == 1

    # The delivered message: what the relay changed, the attachment.
    ids = relay.call(relay.store.archive_ids())
    page.goto(f"{base}/console/messages/{ids[0]}")
    expect(page.locator("ul.changes")).to_be_visible()
    expect(page.locator("#attachments li")).to_have_text("photo-of-mug.pdf — application/pdf, 2016 bytes")
    frame = page.frame_locator("iframe.mail")
    expect(frame.locator("b")).to_have_text("broken")

    # The hostile message: shown, sandboxed; nothing runs, nothing leaves.
    page.goto(f"{base}/console/messages/{ids[2]}")
    iframe = page.locator("iframe.mail")
    assert iframe.get_attribute("sandbox") == ""
    expect(page.frame_locator("iframe.mail").locator("#lure")).to_have_text("Buy now")
    expect(page.locator("pre.raw")).to_contain_text("<script>fetch(")  # the raw message as text only
    page.wait_for_timeout(500)  # give a script that could run the chance to
    assert page.title().startswith("Message") and "pwned" not in page.title()
    shoot(page, shots, "message")
    assert tracker.hits == []
    # Chromium names the loads it refused: the CSP stopped each one before the network.
    aimed = [url for url in requests if f":{tracker.port}" in url]
    assert aimed and {url for url, _ in blocked} >= set(aimed), (aimed, blocked)
    assert all(reason == "csp" for url, reason in blocked if url in aimed), blocked
    # Everything else the pages loaded came from the console itself.
    assert all(url.startswith(f"{base}/console") for url in requests if url not in aimed), requests

    # The chain and the response-time chart.
    page.get_by_role("link", name="Archive chain").click()
    expect(page.locator("#chain-state")).to_contain_text("Verified: 3 row(s)")
    page.get_by_role("link", name="Response times").click()
    expect(page.locator("section.seller h2")).to_contain_text(pair.seller)
    expect(page.locator("section.seller svg")).to_be_visible()
    shoot(page, shots, "report")

    # Revoking the token ends the session.
    assert relay.call(relay.store.revoke_api_token("disputes-desk"))
    page.goto(f"{base}/console/search")
    assert page.url == f"{base}/console/login"
    context.close()


def test_the_login_is_throttled_and_the_session_is_keyboard_usable(console_world, browser):
    relay, pair, tokens, _ = console_world
    host, port = relay.threaded.server.api_address
    base = f"http://{host}:{port}"
    page = browser.new_page()
    statuses = []
    page.on("response", lambda response: statuses.append(response.status)
            if response.url.endswith("/console/login") and response.request.method == "POST" else None)
    for _ in range(5):
        log_in(page, base, "rly_wrong")
    assert statuses == [401, 401, 401, 401, 429]
    expect(page.get_by_role("alert")).to_contain_text("Too many failed logins")
    # Even the right token waits out the window from this address.
    log_in(page, base, tokens["admin"])
    assert statuses[-1] == 429
    # From the keyboard alone (another address's throttle is its own; here the
    # window is cleared by hand, as time would).
    relay.threaded.server.api_server.api.console.throttle._addresses.clear()
    page.goto(f"{base}/console/login")
    for _ in range(4):  # Tab to the token field, past the skip link
        if page.evaluate("document.activeElement.id") == "token":
            break
        page.keyboard.press("Tab")
    page.keyboard.type(tokens["admin"])
    page.keyboard.press("Enter")
    page.wait_for_url(f"{base}/console/search")
    assert page.url == f"{base}/console/search"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    page.close()

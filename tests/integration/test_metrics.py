"""The metrics endpoint, scraped over HTTP after real traffic."""

from __future__ import annotations

import smtplib
import socket
import urllib.error
import urllib.request

from relay.config import Endpoint, MetricsConfig
from support import closed_port, message, upstream_url


def scrape(relay, path="/metrics"):
    host, port = relay.threaded.server.metrics_address
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not in metrics:\n{text}")


def test_metrics_after_real_traffic(start_relay, upstream):
    relay = start_relay(upstream_url(upstream), metrics=MetricsConfig(Endpoint("127.0.0.1", 0)))
    pair = relay.pair()
    with smtplib.SMTP(relay.host, relay.port) as client:
        for n in range(3):
            client.sendmail(pair.buyer, [pair.seller_alias], message(pair.buyer, pair.seller_alias,
                                                                     message_id=f"<m{n}@x>"))
        client.mail(pair.buyer)
        assert client.rcpt("stranger@elsewhere.example")[0] == 550
        client.rset()
        client.mail(pair.buyer)
        client.rcpt(pair.seller_alias)
        assert client.data(message("eve@evil.example", pair.seller_alias))[0] == 550
        status, text = scrape(relay)
        assert status == 200
        assert value(text, 'relay_open_connections{listener="inbound"}') == 1
    assert value(text, 'relay_messages_total{direction="buyer_to_seller",verdict="delivered"}') == 3
    assert value(text, 'relay_messages_total{direction="buyer_to_seller",verdict="rejected"}') == 1
    assert value(text, 'relay_rejections_total{code="550",enhanced="5.1.1",stage="rcpt"}') == 1
    assert value(text, 'relay_rejections_total{code="550",enhanced="5.7.1",stage="data"}') == 1
    assert value(text, "relay_upstream_seconds_count") == 3
    assert value(text, "relay_archive_rows") == 4
    assert value(text, "relay_archive_bytes") > 0
    assert value(text, "relay_messages_in_flight") == 0


def test_healthz(start_relay, upstream):
    relay = start_relay(upstream_url(upstream), metrics=MetricsConfig(Endpoint("127.0.0.1", 0)))
    assert scrape(relay, "/healthz") == (200, "ok\n")
    assert scrape(relay, "/nope")[0] == 404


def test_healthz_reports_a_dead_upstream(start_relay):
    relay = start_relay(f"smtp://127.0.0.1:{closed_port()}", metrics=MetricsConfig(Endpoint("127.0.0.1", 0)))
    status, text = scrape(relay, "/healthz")
    assert status == 503
    assert text.startswith("upstream: ")
    assert "store" not in text

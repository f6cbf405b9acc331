"""The link rule's host reading end to end, through SMTP: IDNA look-alikes
of an allowed domain (issue 18) leave neither in the HTML href nor in the
text part, the genuine domain stays, and a bare IPv4 address in the text
and the Subject is no link (issue 14)."""

from __future__ import annotations

import email
import smtplib
from email import policy
from email.message import EmailMessage

from support import upstream_url

from relay.config import PolicyConfig

# What a browser would open elsewhere (or refuse), each written as it may
# stand in a message: sharp s, final sigma, the joiners, the sharp s in
# capitals with a full-width dot; in an href also a percent-encoded sharp s
# (in text, linkify-it ends a URL at a "%" that starts no escape of ASCII).
LOOK_ALIKES = ["cla\u00dfifieds.example", "cla\u03c2sifieds.example", "clas\u200dsifieds.example",
               "clas\u200csifieds.example", "CLA\u00dfIFIEDS\uff0eexample"]
HREF_LOOK_ALIKES = LOOK_ALIKES + ["cla%C3%9Fifieds.example", "cla&#xdf;ifieds.example"]
# What a browser opens as the allowed domain.
GENUINE = ["classifieds.example", "shop.classifieds.example", "CLASSIFIEDS.EXAMPLE",
           "classifieds\u3002example", "classifieds.example."]


def look_alike_message(sender: str, to: str) -> bytes:
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"], msg["To"] = sender, to
    msg["Subject"] = "server 10.0.0.1 is down, see version 1.2.3.4"
    lines = [f"bad {i}: https://{host}/deal" for i, host in enumerate(LOOK_ALIKES)]
    lines += [f"good {i}: https://{host}/deal" for i, host in enumerate(GENUINE)]
    lines += ["the printer at 192.168.1.20 is fine; http://10.0.0.1/admin is not"]
    msg.set_content("\n".join(lines) + "\n")
    anchors = [f'<p><a href="https://{host}/deal">bad {i}</a></p>' for i, host in enumerate(HREF_LOOK_ALIKES)]
    anchors += [f'<p><a href="https://{host}/deal">good {i}</a></p>' for i, host in enumerate(GENUINE)]
    anchors += ['<p>ping 10.0.0.1 or <a href="http://10.0.0.1/admin">the router</a></p>']
    msg.add_alternative("<html><body>" + "\n".join(anchors) + "</body></html>", subtype="html")
    return msg.as_bytes()


def test_look_alike_hosts_are_removed_and_bare_ipv4_kept(start_relay, upstream):
    relay = start_relay(upstream_url(upstream),
                        policy=PolicyConfig(allowed_link_domains=("classifieds.example",)))
    pair = relay.pair()
    with smtplib.SMTP(relay.host, relay.port, timeout=60) as client:
        assert client.sendmail(pair.buyer, [pair.seller_alias], look_alike_message(pair.buyer, pair.seller_alias)) == {}
    [got] = upstream.wait_for(1)
    out = email.message_from_bytes(got.data, policy=policy.default)
    assert out["Subject"] == "server 10.0.0.1 is down, see version 1.2.3.4"

    text = out.get_body(("plain",)).get_content().splitlines()
    assert text == ([f"bad {i}: [link removed]" for i in range(len(LOOK_ALIKES))]
                    + [f"good {i}: https://{host}/deal" for i, host in enumerate(GENUINE)]
                    + ["the printer at 192.168.1.20 is fine; [link removed] is not"])

    html = out.get_body(("html",)).get_content()
    for i in range(len(HREF_LOOK_ALIKES)):
        assert f"<p><a>bad {i}</a></p>" in html  # the link goes, its text stays
    for i, host in enumerate(GENUINE):
        assert f'<p><a href="https://{host}/deal">good {i}</a></p>' in html
    assert "<p>ping 10.0.0.1 or <a>the router</a></p>" in html

    decoded = "".join(part.get_content() for part in out.walk() if part.get_content_maintype() == "text")
    for trace in ("\u00df", "\u03c2", "\u200d", "\u200c", "%C3%9F", "\uff0e", "10.0.0.1/admin"):
        assert trace not in decoded, trace
    assert "links-removed=" in out["X-Relay-Policy"]
    [row] = relay.archive_rows()
    assert any("removed" in change for change in row["changes"])

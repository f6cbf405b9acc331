"""When /healthz calls the upstream failing: a table of delivery outcomes
(seconds after the first, what happened) and the verdict afterwards."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from relay import replies
from relay.forward import DeliveryError, DeliveryRecord

T0 = datetime(2026, 11, 26, 10, 0, tzinfo=timezone.utc)
DEFERRED = replies.UPSTREAM_DEFERRED
DOWN = replies.UPSTREAM_UNAVAILABLE
REJECTED = replies.UPSTREAM_REJECTED
NO_MAILBOX = replies.UPSTREAM_NO_MAILBOX
OK = None

CASES = [
    # (outcomes as (second, reply or OK), asked at second, problem or None)
    ("nothing sent", [], 60, None),
    ("two failures", [(0, DOWN), (60, DOWN)], 90, None),
    ("three within 30 s", [(0, DOWN), (5, DOWN), (10, DOWN)], 29, None),
    ("three, asked 30 s after the first", [(0, DOWN), (5, DOWN), (10, DOWN)], 30,
     "the last 3 deliveries over 30 s all failed, none accepted since "
     "(last: 451 4.4.1 Upstream mail server unavailable, try again later)"),
    ("mixed failures name the last", [(0, DOWN), (10, DEFERRED), (40, REJECTED)], 40,
     "the last 3 deliveries over 40 s all failed, none accepted since "
     "(last: 554 5.0.0 Upstream mail server rejected the message)"),
    ("a success in between", [(0, DOWN), (10, DOWN), (20, OK), (30, DOWN), (40, DOWN)], 60, None),
    ("a success at the end", [(0, DOWN), (10, DOWN), (20, DOWN), (50, OK)], 60, None),
    ("unknown mailboxes are the recipients' problem", [(0, NO_MAILBOX), (10, NO_MAILBOX), (40, NO_MAILBOX)], 60,
     None),
    ("... and do not break a run", [(0, DOWN), (10, NO_MAILBOX), (20, DOWN), (35, DOWN)], 40,
     "the last 3 deliveries over 40 s all failed, none accepted since "
     "(last: 451 4.4.1 Upstream mail server unavailable, try again later)"),
    ("null MX and DNS trouble are one domain's", [(0, replies.MX_NO_MAIL), (10, replies.MX_DNS_TEMPORARY),
                                                   (40, replies.MX_NO_MAIL)], 60, None),
]


@pytest.mark.parametrize("outcomes, asked, expected", [case[1:] for case in CASES], ids=[c[0] for c in CASES])
def test_delivery_record(outcomes, asked, expected):
    now = [T0]
    record = DeliveryRecord(lambda: now[0])
    for second, reply in outcomes:
        now[0] = T0 + timedelta(seconds=second)
        if reply is OK:
            record.succeeded()
        else:
            record.failed(DeliveryError(reply, "for the log"))
    now[0] = T0 + timedelta(seconds=asked)
    assert record.problem() == expected

"""The frames on a worker's pipe (relay/frames.py): big byte strings cross
beside the pickle and come back as the buffers they were read into; every
other value pickles as it always did."""

from __future__ import annotations

import random
import socket
import threading
from dataclasses import dataclass
from typing import NamedTuple

import pytest

from relay import frames
from relay.pipeline import Processed, Result
from relay.pipeline.changes import ChangeLog
from relay.store.common import prepare_bodies

BIG = random.Random(1).randbytes(256 * 1024)  # does not compress


class Pair(NamedTuple):
    first: bytes
    second: bytes | None


@dataclass(frozen=True)
class Opaque:
    """Pickles its own way (and would fail field by field)."""
    value: bytes

    def __reduce__(self):
        return Opaque, (b"rebuilt",)


def round_trip(value):
    left, right = socket.socketpair()
    try:
        sender = threading.Thread(target=frames.send_blocking, args=(left, value))
        sender.start()
        got = frames.recv_blocking(right)
        sender.join()
        return got
    finally:
        left.close()
        right.close()


def test_big_fields_cross_out_of_band_as_buffers():
    raw, delivered = BIG, BIG + b"tail"
    processed = Processed(Result(delivered, "<id@x>", ["changed"], "clean"), None, ChangeLog(["a"]),
                          prepare_bodies(raw, delivered))
    head, pickled, *buffers = frames.encode(processed)
    # delivered and the compressed raw are big; the compressed delivered is not.
    assert len(buffers) == 2 and pickled.nbytes < 2000
    got = round_trip(processed)
    assert isinstance(got.result.delivered, bytearray) and got.result.delivered == delivered
    assert got.result.changes == ["changed"] and got.changes == ["a"]
    assert got.bodies == processed.bodies and type(got.bodies) is type(processed.bodies)
    assert isinstance(got.bodies.delivered_blob, bytes)


def test_sending_lets_go_of_each_frame_once_written():
    """A worker's answer is freed piece by piece as it is written, not held
    whole until the parent holds it whole too (worker_process.py)."""
    value = Pair(BIG, BIG + b"tail")
    out = frames.encode(value)
    views = [frame for frame in out if isinstance(frame, memoryview)]
    assert len(views) == 3  # the pickle and the two big fields
    left, right = socket.socketpair()
    try:
        received = []
        reader = threading.Thread(target=lambda: received.append(frames.recv_blocking(right)))
        reader.start()
        frames.send_frames(left, out)
        reader.join(10)
    finally:
        left.close()
        right.close()
    assert received == [value] and out == []
    for view in views:
        with pytest.raises(ValueError, match="released"):
            view.nbytes


def test_call_arguments_and_plain_values():
    job = ("relay.pipeline.runner:begin", (frames.big(BIG), frames.big(b"small")))
    function, args = round_trip(job)
    args = tuple(frames.unwrapped(arg) for arg in args)
    assert function == job[0] and args == (BIG, b"small")
    assert isinstance(args[0], bytearray) and isinstance(args[1], bytes)
    for value in (None, ("ready", None), ["a", 1, {"b": BIG}], Pair(b"x", None), Pair(BIG, b"y")):
        assert round_trip(value) == value
    # An object with its own pickling keeps it, big fields or not.
    assert round_trip(Opaque(b"v")) == Opaque(b"rebuilt")
    assert round_trip(Opaque(BIG)) == Opaque(b"rebuilt")


def test_a_closed_pipe_is_eof():
    left, right = socket.socketpair()
    left.close()
    try:
        frames.recv_blocking(right)
    except EOFError:
        pass
    else:
        raise AssertionError("no EOFError")
    finally:
        right.close()

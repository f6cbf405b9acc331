"""The frames on a worker's pipe: a pickle, with its big byte strings beside it.

Both ends of the pipe (relay/workers.py and relay/worker_process.py) speak
this, and only this module knows its layout. A value is pickled with
protocol 5, and every byte string of at least OUT_OF_BAND_OCTETS in a call's
arguments or in the fields of a dataclass or named tuple (the message going
to a worker, the bytes to deliver and the archive's compressed bodies
coming back) travels out of band: written from the object itself, read
into a buffer of its own, and handed back as that buffer (a `bytearray`),
never copied once more. In one pickle they were copied into the pickle on
one side and out of it on the other, both copies held at once: twice the
message while it crossed.

On the wire: a 12-octet header (the pickle's length, the number of
buffers), each buffer's length (8 octets), the pickle, the buffers.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import struct

OUT_OF_BAND_OCTETS = 64 * 1024
_HEADER = struct.Struct("!QI")
_LENGTH = struct.Struct("!Q")


def big(value):
    """`value` marked to travel out of band if it is a big byte string."""
    if type(value) is bytes and len(value) >= OUT_OF_BAND_OCTETS:
        return pickle.PickleBuffer(value)
    return value


def unwrapped(value):
    """An out-of-band value as the buffer it was read into."""
    return value.obj if isinstance(value, memoryview) else value


def _dataclass(cls, state: dict):
    obj = cls.__new__(cls)
    obj.__dict__.update({name: unwrapped(value) for name, value in state.items()})
    return obj


def _named_tuple(cls, values: tuple):
    return cls(*(unwrapped(value) for value in values))


class _Pickler(pickle.Pickler):
    # Exact bytes never reach reducer_override (the pickler saves them
    # itself), so the objects that hold them mark them.
    # Only an object holding such a string is pickled field by field; any
    # other keeps its own way of pickling.
    def reducer_override(self, obj):
        if not _default_pickling(type(obj)):
            return NotImplemented
        if isinstance(obj, tuple) and hasattr(type(obj), "_fields"):
            if any(_is_big(value) for value in obj):
                return _named_tuple, (type(obj), tuple(big(value) for value in obj))
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type) and hasattr(obj, "__dict__"):
            state = vars(obj)
            if any(_is_big(value) for value in state.values()):
                return _dataclass, (type(obj), {name: big(value) for name, value in state.items()})
        return NotImplemented


def _default_pickling(cls) -> bool:
    return (cls.__reduce_ex__ is object.__reduce_ex__ and cls.__reduce__ is object.__reduce__
            and getattr(cls, "__getstate__", object.__getstate__) is object.__getstate__)


def _is_big(value) -> bool:
    return type(value) is bytes and len(value) >= OUT_OF_BAND_OCTETS


def encode(value) -> list:
    """The frames to write for `value`, in order."""
    buffers: list[pickle.PickleBuffer] = []
    out = io.BytesIO()
    _Pickler(out, protocol=5, buffer_callback=buffers.append).dump(value)
    views = [buffer.raw() for buffer in buffers]
    head = _HEADER.pack(out.getbuffer().nbytes, len(views)) + b"".join(_LENGTH.pack(v.nbytes) for v in views)
    return [head, out.getbuffer(), *views]


def header(data: bytes) -> tuple[int, int]:
    """(the pickle's length, the number of buffers) from the first octets."""
    return _HEADER.unpack(data)


HEADER_OCTETS = _HEADER.size
LENGTH_OCTETS = _LENGTH.size


def lengths(data: bytes) -> list[int]:
    return [length for (length,) in _LENGTH.iter_unpack(data)]


def decode(pickled: bytes | bytearray, buffers: list[bytearray]):
    return pickle.loads(pickled, buffers=buffers)


def recv_blocking(sock):
    """The next value from a blocking socket; EOFError once it is closed."""
    def exactly(count: int) -> bytearray:
        buffer, got = bytearray(count), 0
        view = memoryview(buffer)
        while got < count:
            received = sock.recv_into(view[got:])
            if not received:
                raise EOFError
            got += received
        return buffer

    size, count = header(exactly(HEADER_OCTETS))
    sizes = lengths(exactly(LENGTH_OCTETS * count)) if count else []
    pickled = exactly(size)
    return decode(pickled, [exactly(length) for length in sizes])


def send_blocking(sock, value) -> None:
    send_frames(sock, encode(value))


def send_frames(sock, frames: list) -> None:
    """Write `frames` (from encode()) in order, letting go of each once it
    is written: when nothing else holds a big answer (a worker's delivered
    message and its archive form), its memory is freed piece by piece while
    the other side reads it, not held whole until the other side holds it
    whole too."""
    frames.reverse()
    while frames:
        frame = frames.pop()
        sock.sendall(frame)
        if isinstance(frame, memoryview):
            frame.release()
        del frame

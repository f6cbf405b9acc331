"""The life of one worker process (see relay/workers.py, the pool).

`python -P -m relay.worker_process FD LIMIT` is a worker: its pipe to the
relay is the socket FD, its address space is capped at LIMIT bytes (0: no
cap). It takes the relay's `sys.path`, imports the pipeline, runs
`READY_CHECK` through its first step and says "ready", then answers calls
(a function, or its "module:name", and the arguments; relay/frames.py) until
the pipe closes or it is told to stop. This module imports nothing of the
pool's event-loop side (no asyncio): what a worker does not need, it does
not hold in memory.
"""

from __future__ import annotations

import importlib
import signal
import socket
import sys
import traceback

from relay import frames

# What a new worker runs before it says it is ready: the first step of every
# message, so a worker that cannot import the pipeline or has no memory to
# parse a message under its limit fails here, not on a sender's message.
READY_CHECK = b"From: check@relay.invalid\r\nSubject: ready?\r\n\r\nready\r\n"


def named(reference: str):
    """The function a "module:name" reference names, its module imported
    here: the relay's own process need not import what only a worker runs."""
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


class _Conn:
    """The worker's end of its pipe (relay/frames.py)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def recv(self):
        return frames.recv_blocking(self.sock)

    def send(self, value) -> None:
        frames.send_blocking(self.sock, value)


def main(conn: _Conn, memory_limit_bytes: int) -> None:
    """A worker's life: take the relay's sys.path, start, then answer calls
    until the pipe closes."""
    try:
        sys.path[:] = conn.recv()
    except (EOFError, OSError):
        return
    if memory_limit_bytes:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))
    # Ctrl-C at a terminal reaches the whole process group; the parent
    # decides when workers stop, by closing their pipes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        from relay.pipeline import runner

        runner.begin(READY_CHECK)
    except BaseException as error:  # noqa: BLE001 - the parent reports why this worker cannot start
        conn.send(("broken", f"{type(error).__name__}: {error}".strip().rstrip(":")))
        return
    conn.send(("ready", None))
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        except MemoryError:
            # The arguments alone did not fit: say so, then start afresh.
            conn.send(("memory", ""))
            return
        if job is None:  # the parent is stopping
            return
        function, args = job
        args = tuple(frames.unwrapped(arg) for arg in args)
        try:
            if isinstance(function, str):
                function = named(function)
            answer = ("ok", function(*args))
        except MemoryError:
            answer = None
        except BaseException as error:  # noqa: BLE001 - reported to the parent, which decides
            answer = ("error", (type(error).__name__, traceback.format_exc()))
        del job, args
        if answer is None:
            # Memory is exhausted or fragmented: answer, then exit and let
            # the parent start a clean worker.
            conn.send(("memory", ""))
            return
        try:
            out = frames.encode(answer)
        except MemoryError:
            conn.send(("memory", ""))
            return
        except Exception as error:  # an unpicklable result: a bug, reported as such
            out = frames.encode(("error", (type(error).__name__, traceback.format_exc())))
        # The frames alone hold the answer now, so each big piece of it (a
        # delivered 10 MB message, its archive form) is freed as soon as it
        # is written, and nothing stays while the next call is awaited.
        del answer
        frames.send_frames(conn.sock, out)


if __name__ == "__main__":
    main(_Conn(socket.socket(fileno=int(sys.argv[1]))), int(sys.argv[2]))

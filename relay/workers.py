"""Worker processes for the CPU-bound middle of the relay.

Parsing, rewriting, sanitizing and signing a message is pure computation
on hostile input. It runs here, in a small pool of processes, for three
reasons: the relay uses every core (the event loop's process has one GIL);
a message gets a time limit that can really be enforced (a thread cannot be
stopped, a process can be killed); and a memory limit (each worker's
address space is capped with RLIMIT_AS, so a message that would need more
gets MemoryError in its worker instead of starving the machine).

`WorkerPool.run(function, *args)` sends a picklable call to an idle worker
(`function` a module-level function, or its "module:name" for one the
relay's own process should not have to import) and awaits the answer;
`WorkerPool.lease()` holds one worker for several calls about one message
(the parsed message stays in the worker between them). A call that
overruns `time_limit` gets its worker killed and replaced and raises
`LimitExceeded` (CPU time: see `Lease`), as does one that ran out of
memory; a worker that died for any other reason is replaced and the call
raises `WorkerLost`. Waiting for an idle worker longer than `wait_timeout`
raises `PoolBusy`. The event loop never blocks: a call's pipe I/O is the
loop's own non-blocking socket I/O (no thread per call: each hand-off to
a thread and back cost the loop's process CPU and the message latency).

Each worker is a fresh Python process (`python -P -m relay.worker_process`), not a
fork: it inherits none of the event loop's threads, sockets or memory, and
the relay needs no fork server and no multiprocessing resource tracker
beside it (together 56 MB of idle memory when it had them). Its pipe is a
socket pair handed over as a file descriptor; both ends speak the frames
of relay/frames.py (the relay's end is `_Pipe`), in which the message and
the delivered bytes cross without a pickled copy. The worker takes the relay's `sys.path` as its first
message (as multiprocessing's spawn does), so it imports the functions it is
sent from where the relay found them. `-P` (safe path) keeps the working
directory off its path: a folder named `relay` where `relay serve` was
started must not be imported in place of the installed package. Starting
one costs about 0.3 s of CPU (importing the pipeline), spent only when
messages wait for a worker (below) or one died or was killed over a limit.

With `max_idle`, the pool is elastic, as postfix's daemons are (its
`max_idle` is the same idea): one worker runs while the relay is idle;
when a message finds no idle worker, one more is started (up to `size`,
one start at a time), and a worker beyond the first that has had no
message for `max_idle` seconds is told to exit. Idle workers are handed
out most recently used first, so under light load the extra ones age out
instead of taking turns. Without `max_idle` (0), all `size` workers run
from the start.

A worker counts as started only once it has said so: it runs a tiny
message through `pipeline.runner.begin` under its memory limit and answers
"ready". One that dies or fails before that is a start-up failure: the
pool keeps trying to start workers (backing off up to `START_RETRY_MAX`
seconds), `problem` says what went wrong until one starts again (for
/healthz), and while no worker runs a message gets `PoolBusy` at once
rather than waiting for a worker that cannot come.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass

from relay import frames

log = logging.getLogger("relay.workers")

# How long a new worker may take to say it is ready, and the longest pause
# between two attempts to start workers while they cannot start.
START_TIMEOUT = 30.0
START_RETRY_MAX = 30.0



class WorkerError(Exception):
    """The function raised in the worker; `detail` is its traceback."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind} in a worker process")
        self.kind = kind
        self.detail = detail


class LimitExceeded(Exception):
    """The call ran over the time limit or out of memory; its worker was replaced."""


class WorkerLost(Exception):
    """The worker died under the call (killed, crashed); it was replaced."""


class PoolBusy(Exception):
    """No worker became free in time (or none can start)."""


class WorkerStartFailed(Exception):
    """A new worker died or failed before it was ready."""


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int | None) -> float | None:
    """CPU time (user + system) a process has used, from /proc; None where
    there is no /proc or the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the command name: state is field 3, utime and stime 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _TICKS


class _Pipe:
    """The relay's end of a worker's socket pair, in the frames of
    relay/frames.py (the worker's end speaks them too). Blocking while a
    worker starts and stops (in a thread); on the event loop for a call, so
    a call costs no thread hand-off."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def send_blocking(self, value, timeout: float | None) -> None:
        self.sock.settimeout(timeout)
        frames.send_blocking(self.sock, value)

    def recv_blocking(self, timeout: float | None):
        """The next value; TimeoutError after `timeout` seconds of silence,
        EOFError when the worker closed its end."""
        self.sock.settimeout(timeout)
        return frames.recv_blocking(self.sock)

    async def send(self, value) -> None:
        loop = asyncio.get_running_loop()
        if self.sock.gettimeout() != 0:
            self.sock.setblocking(False)
        for frame in frames.encode(value):
            await loop.sock_sendall(self.sock, frame)

    async def recv(self):
        loop = asyncio.get_running_loop()
        if self.sock.gettimeout() != 0:
            self.sock.setblocking(False)

        async def exactly(count: int) -> bytearray:
            buffer, got = bytearray(count), 0
            view = memoryview(buffer)
            while got < count:
                received = await loop.sock_recv_into(self.sock, view[got:])
                if not received:
                    raise EOFError
                got += received
            return buffer

        size, count = frames.header(await exactly(frames.HEADER_OCTETS))
        sizes = frames.lengths(await exactly(frames.LENGTH_OCTETS * count)) if count else []
        pickled = await exactly(size)
        return frames.decode(pickled, [await exactly(length) for length in sizes])

    def close(self) -> None:
        self.sock.close()


# glibc raises its mmap threshold to the size of each big block freed (up
# to 32 MB), after which blocks that size come from the heap and stay in
# the process once freed: a worker that parsed one big message kept the
# memory of it. Fixed at 128 KiB, every big buffer is mapped on its own and
# returned when freed. (Other C libraries ignore the variable.)
WORKER_MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=131072"


def return_big_blocks() -> bool:
    """The same for the process that calls it (the relay's event loop,
    from `relay serve`), with mallopt: True if the C library took it."""
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no C library of that kind
        return False
    m_mmap_threshold = -3  # malloc.h
    return mallopt(m_mmap_threshold, 131072) == 1


def worker_environment() -> dict[str, str]:
    env = dict(os.environ)
    tunables = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.mmap_threshold" not in tunables:
        env["GLIBC_TUNABLES"] = ":".join(filter(None, (tunables, WORKER_MALLOC_TUNABLES)))
    return env


class _Process(subprocess.Popen):
    """A worker's process, with the few names of multiprocessing's Process
    that the pool uses."""

    def is_alive(self) -> bool:
        return self.poll() is None

    def join(self, timeout: float | None = None) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.wait(timeout)

    @property
    def exitcode(self) -> int | None:
        return self.poll()  # negative: killed by that signal, as multiprocessing says


@dataclass(eq=False)
class _Worker:
    process: _Process
    pipe: _Pipe
    calls: int = 0
    idle_since: float = 0.0  # the event loop's clock when it last became idle


class WorkerPool:
    def __init__(self, size: int, time_limit: float, memory_limit_mb: int = 0, wait_timeout: float = 60.0,
                 max_idle: float = 0.0):
        self.size = max(1, size)
        self.max_idle = max_idle
        # The workers kept running however idle the relay is.
        self.minimum = 1 if max_idle else self.size
        self.time_limit = time_limit
        self.memory_limit_bytes = memory_limit_mb * 1024 * 1024
        self.wait_timeout = wait_timeout
        self._idle: asyncio.LifoQueue[_Worker] | None = None
        self._all: set[_Worker] = set()
        self.replaced = 0  # workers started to replace one that died or was killed
        self.closed = False
        # Why the last attempt to start a worker failed; None once one started.
        self.start_failure: str | None = None
        self._refill: asyncio.Task | None = None
        self._starting = 0  # workers being started, not yet in _all
        self._waiting = 0  # leases waiting for an idle worker
        self._growth: asyncio.Future | None = None  # the start of one more worker for a waiting message
        self._reaper: asyncio.Task | None = None

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._all if w.process.pid is not None]

    @property
    def problem(self) -> str | None:
        """What keeps the pool from working, for /healthz; None when it works."""
        if self.closed or self.start_failure is None:
            return None
        return f"{self.start_failure}; {len(self._all)} of {self.size} running"

    async def start(self) -> None:
        """Start the workers. One that cannot start does not stop the relay
        (the cause may pass, e.g. memory pressure); it is logged, reported
        by `problem` and tried again in the background."""
        self._idle = asyncio.LifoQueue()
        for _ in range(self.minimum):
            if not await self._start_one():
                break
        log.info("%d worker process(es) started, up to %d (time limit %g s, memory limit %s%s)", len(self._all),
                 self.size, self.time_limit,
                 f"{self.memory_limit_bytes >> 20} MB" if self.memory_limit_bytes else "none",
                 f", more started on demand, idle ones exit after {self.max_idle:g} s"
                 if self.minimum < self.size else "")
        if self.minimum < self.size:
            self._reaper = asyncio.ensure_future(self._dismiss_idle())

    def _spawn(self) -> _Worker:
        """In a thread: start one worker and wait for its "ready"."""
        parent_socket, child_socket = socket.socketpair()
        try:
            # Its standard input is not the relay's (a terminal, a pipe from
            # a supervisor); its output and errors go where the relay's go.
            process = _Process([sys.executable, "-P", "-m", "relay.worker_process", str(child_socket.fileno()),
                                str(self.memory_limit_bytes)], pass_fds=(child_socket.fileno(),),
                               stdin=subprocess.DEVNULL, env=worker_environment())
        except OSError as error:
            parent_socket.close()
            raise WorkerStartFailed(f"a worker could not be started ({error})") from None
        finally:
            child_socket.close()
        pipe = _Pipe(parent_socket)
        try:
            pipe.send_blocking(sys.path, START_TIMEOUT)
            status, detail = pipe.recv_blocking(START_TIMEOUT)
        except TimeoutError:
            status, detail = "silent", f"no answer within {START_TIMEOUT:g} s"
        except (EOFError, OSError):
            # Died before our code ran (e.g. the worker could not import the
            # relay): its traceback went to the relay's standard error.
            process.join(timeout=5)
            status, detail = "died", f"exit code {process.exitcode}, see the log"
        if status != "ready":
            if process.is_alive():
                process.kill()
            process.join(timeout=5)
            pipe.close()
            raise WorkerStartFailed(f"a worker died at start-up ({detail})")
        worker = _Worker(process, pipe)
        self._all.add(worker)
        return worker

    async def _start_one(self) -> bool:
        """Start a worker and make it idle; False (and the refill task
        started) when it could not start."""
        self._starting += 1
        try:
            worker = await asyncio.get_running_loop().run_in_executor(None, self._spawn)
        except WorkerStartFailed as failure:
            if str(failure) != self.start_failure:  # once per cause, not once per retry
                log.error("%s; the pool keeps trying to start workers", failure)
            self.start_failure = str(failure)
            if self._refill is None or self._refill.done():
                self._refill = asyncio.ensure_future(self._refill_pool())
            return False
        finally:
            self._starting -= 1
        if self.start_failure is not None:
            log.info("a worker started again after: %s", self.start_failure)
            self.start_failure = None
        if self.closed:
            await asyncio.get_running_loop().run_in_executor(None, self._retire, worker)
        else:
            worker.idle_since = asyncio.get_running_loop().time()
            self._idle.put_nowait(worker)
        return True

    async def _refill_pool(self) -> None:
        """While workers cannot start: try again, backing off, until one has
        started and the workers kept running are back. Until then the pool
        does not grow, and `problem` says why, so the retries must go on
        even while enough workers run (an extra one that failed to start)."""
        delay = 0.5
        while not self.closed:
            if len(self._all) + self._starting >= self.size:
                self.start_failure = None  # a full pool has nothing left to start
                return
            if self.start_failure is None and len(self._all) >= self.minimum:
                return
            await asyncio.sleep(delay)
            if self.closed:
                return
            delay = 0.5 if await self._start_one() else min(delay * 2, START_RETRY_MAX)

    def _grow(self) -> None:
        """Leases are waiting for more workers than are idle: start more, one
        after the other, while that lasts and the pool may have more."""
        if self._growth is None or self._growth.done():
            self._growth = asyncio.ensure_future(self._grow_while_waited_for())

    def _may_grow(self) -> bool:
        return (not self.closed and self.start_failure is None and self._waiting > self._idle.qsize()
                and len(self._all) + self._starting < self.size)

    async def _grow_while_waited_for(self) -> None:
        while self._may_grow():
            log.debug("%d message(s) waiting for a worker; starting one more", self._waiting)
            if not await self._start_one():
                return

    async def _dismiss_idle(self) -> None:
        """Every few seconds: tell the workers beyond `minimum` that have
        been idle for `max_idle` seconds to exit."""
        loop = asyncio.get_running_loop()
        while not self.closed:
            await asyncio.sleep(max(min(self.max_idle / 4, 10.0), 0.05))
            now = loop.time()
            idle = [self._idle.get_nowait() for _ in range(self._idle.qsize())]
            dismissed = []
            for worker in sorted(idle, key=lambda w: w.idle_since):  # the longest idle first
                if len(self._all) > self.minimum and now - worker.idle_since >= self.max_idle:
                    self._all.discard(worker)
                    dismissed.append(worker)
                else:
                    self._idle.put_nowait(worker)  # the most recently used ends on top again
            for worker in dismissed:
                log.debug("worker %s idle for %.0f s; told to exit (%d running)", worker.process.pid,
                          now - worker.idle_since, len(self._all))
            if dismissed:
                # One thread call for all: cancelled (by close()), it still
                # stops every one of them; they are in no list any more.
                await loop.run_in_executor(None, lambda: [self._stop(worker) for worker in dismissed])

    @staticmethod
    def _stop(worker: _Worker) -> None:
        """In a thread: ask `worker` to exit (its loop ends when told so),
        kill it if it does not, and close its pipe."""
        with contextlib.suppress(OSError):
            worker.pipe.send_blocking(None, 2)
        worker.process.join(timeout=2)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join(timeout=5)
        worker.pipe.close()

    def _retire(self, worker: _Worker) -> None:
        """Kill `worker` (if still alive) and forget it."""
        self._all.discard(worker)
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join(timeout=5)
        worker.pipe.close()

    async def _replace(self, worker: _Worker) -> None:
        loop = asyncio.get_running_loop()
        # Out of the count and its replacement in it at once, on the loop:
        # a lease arriving while the dead one is reaped must not start
        # another in its place too (the pool would outgrow `size`).
        self._all.discard(worker)
        self._starting += 1
        try:
            await loop.run_in_executor(None, self._retire, worker)
        finally:
            self._starting -= 1
        if self.closed:
            return
        self.replaced += 1
        if self._refill is not None and not self._refill.done():
            return  # workers cannot start just now: the refill task starts this one too
        await self._start_one()

    @staticmethod
    async def _round_trip(worker: _Worker, function, args):
        """The call and its answer over the pipe."""
        try:
            await worker.pipe.send((function, tuple(frames.big(arg) for arg in args)))
        except (BrokenPipeError, ConnectionResetError) as error:
            # A worker that could not hold the arguments says so and exits
            # before reading them all: its answer is still in the pipe.
            try:
                return await asyncio.wait_for(worker.pipe.recv(), 1)
            except (asyncio.TimeoutError, EOFError, OSError):
                raise error from None
        return await worker.pipe.recv()

    @contextlib.asynccontextmanager
    async def lease(self):
        """Hold one worker for several calls about the same message (state
        kept in the worker between them); the time limit covers them all."""
        if self._idle is None or self.closed:
            raise PoolBusy("the worker pool is not running")
        deadline = asyncio.get_running_loop().time() + self.wait_timeout
        while True:
            if not self._all and self.start_failure is not None:
                # No worker runs and none could start: waiting would only
                # hold the client's connection open for nothing.
                raise PoolBusy(f"no worker running: {self.start_failure}")
            self._waiting += 1
            try:
                if self._may_grow():
                    self._grow()
                worker = await asyncio.wait_for(self._idle.get(),
                                                max(deadline - asyncio.get_running_loop().time(), 0))
            except asyncio.TimeoutError:
                raise PoolBusy(f"no worker free within {self.wait_timeout:g} s") from None
            finally:
                self._waiting -= 1
            if worker.process.is_alive():
                break
            # Died while idle (killed by an operator, the OOM killer): not a
            # reason to fail the message that would have been sent to it.
            log.error("worker %s died while idle (exit code %s); replacing it", worker.process.pid,
                      worker.process.exitcode)
            await self._replace(worker)
        lease = Lease(self, worker)
        try:
            yield lease
        finally:
            lease.end()

    async def run(self, function, *args):
        """`function(*args)` in a worker; see the module docstring for errors."""
        async with self.lease() as lease:
            return await lease.call(function, *args)

    def _put_back(self, worker: _Worker) -> None:
        if self.closed or worker not in self._all:
            return
        if worker.process.is_alive():
            worker.idle_since = asyncio.get_running_loop().time()
            self._idle.put_nowait(worker)
        else:
            asyncio.ensure_future(self._replace(worker))

    async def close(self) -> None:
        """Stop every worker: closing its pipe ends its loop; the stragglers are killed."""
        self.closed = True
        for task in (self._refill, self._reaper):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._growth is not None:
            # Not cancelled: its worker is being started in a thread, and a
            # worker that arrives after close() is stopped by _start_one.
            await asyncio.gather(self._growth, return_exceptions=True)

        idle = [self._idle.get_nowait() for _ in range(self._idle.qsize())] if self._idle is not None else []
        busy = [worker for worker in self._all if worker not in idle]

        def stop_all():
            for worker in idle:
                with contextlib.suppress(OSError):
                    worker.pipe.send_blocking(None, 2)  # all told first, so they exit side by side
            for worker in idle:
                self._stop(worker)
            # A worker still in a call (the drain gave up on its message):
            # its pipe is the event loop's until the call ends, so it is
            # killed, not written to; the call sees the pipe close (451) and
            # its lease retires it.
            for worker in busy:
                if worker.process.is_alive():
                    worker.process.kill()

        self._all.difference_update(idle)
        await asyncio.get_running_loop().run_in_executor(None, stop_all)



class Lease:
    """One worker, held by one message; see `WorkerPool.lease`.

    The time limit counts the worker's CPU time, not the clock: a worker
    that is merely not getting a core (a stopped process, a starved host)
    must not turn an ordinary message into a permanent refusal. Only a
    message that really burned `time_limit` seconds of CPU is `LimitExceeded`
    (554); a worker that has not answered after `backstop` seconds of wall
    time without having used its budget is killed as unresponsive
    (`WorkerLost`, 451: the client tries again later)."""

    def __init__(self, pool: WorkerPool, worker: _Worker):
        self.pool = pool
        self.worker: _Worker | None = worker
        # CPU the worker spent on this lease: at most this (the wall time of
        # its calls, or a reading of /proc plus the wall time since). One
        # process on one thread cannot spend more CPU than wall time, so
        # /proc is read only when the budget might be used up, not twice a
        # call (that was 2 % of the event loop's CPU under load).
        self.cpu_used = 0.0
        self._cpu_base: float | None = None  # the worker's CPU time when the lease began
        self._pending: asyncio.Future | None = None

    async def call(self, function, *args):
        pool, worker = self.pool, self.worker
        if worker is None:
            raise WorkerLost("the worker was replaced")
        loop = asyncio.get_running_loop()
        pid = worker.process.pid
        if self._cpu_base is None:
            self._cpu_base = cpu_seconds(pid)
        wall_start = bound_at = loop.time()
        backstop = wall_start + pool.time_limit * 3 + 5
        pending = self._pending = asyncio.ensure_future(pool._round_trip(worker, function, args))

        def used() -> float:
            """The CPU the lease really used so far (from /proc)."""
            now = cpu_seconds(pid)
            if now is None or self._cpu_base is None:  # no /proc: the clock is all there is
                return self.cpu_used + loop.time() - bound_at
            return now - self._cpu_base

        wait = max(pool.time_limit - self.cpu_used, 0.01)
        try:
            while True:
                try:
                    status, value = await asyncio.wait_for(asyncio.shield(pending), wait)
                    break
                except asyncio.TimeoutError:
                    spent = used()
                    if spent >= pool.time_limit:
                        log.warning("worker %s used %.1f s of CPU, over the time limit of %g s; replacing it",
                                    pid, spent, pool.time_limit)
                        await self._lose(pending)
                        raise LimitExceeded(f"over the time limit of {pool.time_limit:g} s") from None
                    if loop.time() >= backstop:
                        log.error("worker %s unresponsive (%.1f s of CPU in %.0f s); replacing it",
                                  pid, spent, loop.time() - wall_start)
                        await self._lose(pending)
                        raise WorkerLost("the worker stopped answering") from None
                    self.cpu_used, bound_at = spent, loop.time()
                    wait = max(min(pool.time_limit - spent, backstop - loop.time()), 0.05)
        except (EOFError, OSError) as error:
            log.error("worker %s died (exit code %s, %s); replacing it", pid,
                      worker.process.exitcode, type(error).__name__)
            await self._lose()
            raise WorkerLost(f"worker exit code {worker.process.exitcode}") from None
        self._pending = None
        self.cpu_used += loop.time() - bound_at
        worker.calls += 1
        if status == "memory":
            log.warning("worker %s ran out of memory (limit %d MB); replacing it", pid,
                        pool.memory_limit_bytes >> 20)
            await self._lose()
            raise LimitExceeded(f"over the memory limit of {pool.memory_limit_bytes >> 20} MB")
        if status == "error":
            raise WorkerError(*value)
        return value

    async def _lose(self, pending: asyncio.Future | None = None) -> None:
        worker, self.worker = self.worker, None
        if pending is not None:
            # Off the pipe before the pipe is closed: the loop must not watch
            # a descriptor that is gone (or has been reused).
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        await self.pool._replace(worker)

    def end(self) -> None:
        """Give the worker back; if a call is still running (the holder was
        cancelled), once that call is over."""
        worker, self.worker = self.worker, None
        if worker is None:
            return
        if self._pending is not None and not self._pending.done():
            self._pending.add_done_callback(lambda _: self.pool._put_back(worker))
        else:
            self.pool._put_back(worker)

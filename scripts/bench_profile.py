"""scripts/bench --profile: where the relay's CPU goes, per message.

Runs, in this process and without any server, what the relay does to each
message of the bench's mix (scripts/bench_messages.py) besides network and
database I/O:

- ``auth``: the inbound SPF/DKIM/DMARC check (relay.mailauth.authenticate)
  against the tests' DNS server, through the relay's caching resolver;
- ``parse``: parsing the raw bytes (relay.pipeline.begin when the relay has
  the two worker steps, else relay.pipeline.parse);
- ``process``: every pipeline stage, DKIM signing included
  (relay.pipeline.finish, else relay.pipeline.process);
- ``archive``: hashing and compressing both bodies for the archive row
  (relay.store.common.prepare_bodies, or relay.store.sqlite._prepare_bodies before it), when the relay has it.

First a pass that times each step (and each pipeline stage) with the
thread's CPU clock (no profiler: these are the numbers to quote); then one
message with a 10 MB attachment through the same steps under tracemalloc,
for the peak of Python allocations in each step; then a pass under
cProfile, whose top functions by own time are printed. Pickling messages to and from worker
processes, the SMTP sessions, the upstream delivery and SQLite are not in
it: they are what separates this CPU budget from the measured rate.
"""

from __future__ import annotations

import cProfile
import dataclasses
import json
import os
import pstats
import sys
import sysconfig
import time
import tracemalloc
from datetime import datetime, timezone

import bench_messages as mix
from dnsserver import DNSServer

TOP = 15
HELO = "client.mail.example"


class Steps:
    """The relay's per-message work, through whichever API this relay has."""

    def __init__(self, resolver, relay_key):
        from relay import addresses, mailauth, pipeline
        from relay.config import PolicyConfig
        from relay.store import Party

        self.mailauth = mailauth
        self.pipeline = pipeline
        self.resolver = resolver
        self.relay_key = relay_key
        self.two_step = hasattr(pipeline, "begin") and hasattr(pipeline, "finish")
        try:
            from relay.store.common import prepare_bodies as _prepare_bodies
        except ImportError:
            try:
                from relay.store.sqlite import _prepare_bodies
            except ImportError:
                _prepare_bodies = None
        self.prepare_bodies = _prepare_bodies
        self.buyer = Party(1, "buyer", mix.BUYER, mix.BUYER_NAME)
        self.seller = Party(2, "seller", mix.SELLER, mix.SELLER_NAME)
        self.buyer_alias = f"{addresses.new_alias_token()}@{mix.MARKETPLACE}"
        self.seller_alias = f"{addresses.new_alias_token()}@{mix.MARKETPLACE}"
        self.policy = PolicyConfig()
        self.new_message_id = addresses.new_message_id
        self.names = ["auth", "parse", "process"] + (["archive"] if _prepare_bodies else [])
        self.api = ("relay.pipeline.begin/finish" if self.two_step else "relay.pipeline.parse/process")

    def context(self, auth_results: str, number: int):
        fields = {f.name for f in dataclasses.fields(self.pipeline.Context)}
        values = dict(
            domain=mix.MARKETPLACE, hostname=mix.MARKETPLACE, direction="buyer_to_seller",
            sender=self.buyer, recipient=self.seller, sender_alias=self.buyer_alias,
            recipient_alias=self.seller_alias, relay_message_id=self.new_message_id(mix.MARKETPLACE),
            received_at=datetime.now(timezone.utc), transaction_id=f"{number:012x}", thread_rows=(),
            protocol="ESMTP", max_hops=50, max_relay_hops=3, dkim_key=self.relay_key,
            auth_results=auth_results, policy=self.policy, authenticated=False, latest_order_at=None)
        return self.pipeline.Context(**{k: v for k, v in values.items() if k in fields})

    def run(self, raw: bytes, number: int, meter=None) -> dict[str, float]:
        """One message through every step. `meter()` is called before the
        first step and after each; what it returns after a step is that
        step's measure (see cpu_meter, memory_meter)."""
        spent = {}
        if meter:
            meter()

        def lap(name):
            if meter:
                spent[name] = meter()

        verdict = self.mailauth.authenticate(raw, "127.0.0.1", HELO, mix.BUYER, resolver=self.resolver,
                                             authserv_id=mix.MARKETPLACE)
        if verdict.dmarc != "pass":
            raise RuntimeError(f"the bench's message does not pass DMARC: {verdict.header}")
        auth_results = f"{mix.MARKETPLACE}; spf={verdict.spf}; dkim={verdict.dkim}; dmarc={verdict.dmarc}"
        lap("auth")
        if self.two_step:
            begun = self.pipeline.begin(raw)
            if begun.refusal is not None:
                raise RuntimeError(f"the relay refuses the bench's message: {begun.refusal}")
            lap("parse")
            processed = self.pipeline.finish(self.context(auth_results, number))
            if processed.refusal is not None:
                raise RuntimeError(f"the relay refuses the bench's message: {processed.refusal}")
            delivered = processed.result.delivered
            # Made in the worker's finish() since issue 16: already in "process".
            prepared_in_worker = getattr(processed, "bodies", None) is not None
        else:
            prepared_in_worker = False
            from relay.pipeline.changes import ChangeLog

            message = self.pipeline.parse(raw)
            lap("parse")
            delivered = self.pipeline.process(message, self.context(auth_results, number), ChangeLog()).delivered
        lap("process")
        if self.prepare_bodies and not prepared_in_worker:
            self.prepare_bodies(raw, delivered)
        if self.prepare_bodies:
            lap("archive")
        return spent


def cpu_meter():
    """Thread CPU seconds since the previous call."""
    last = time.thread_time()

    def meter() -> float:
        nonlocal last
        now = time.thread_time()
        spent, last = now - last, now
        return spent
    return meter


def memory_meter():
    """Peak bytes traced by tracemalloc since the previous call, that is
    during the step: what had been allocated since tracing began (after the
    raw message was made) at its highest, so what earlier steps still hold
    (the parsed message, during process) counts too."""
    def meter() -> float:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        return peak
    return meter


class StageClock:
    """Thread CPU time of each pipeline stage, of serializing and of DKIM
    signing, by wrapping them where relay.pipeline looks them up at call
    time (its STAGES tuple and its module globals) in this process only."""

    def __init__(self):
        from relay import dkim, pipeline

        try:  # where the steps look the stages up, since the stages moved there
            from relay.pipeline import runner as pipeline
        except ImportError:
            pass
        self.kind = "text"
        self.spent: dict[str, dict[str, float]] = {}
        self.names: list[str] = []
        self._undo = []
        stages = getattr(pipeline, "STAGES", None)
        if isinstance(stages, tuple):
            self._patch(pipeline, "STAGES", tuple(self._timed(f.__name__, f) for f in stages))
        if callable(getattr(pipeline, "serialize", None)):
            self._patch(pipeline, "serialize", self._timed("serialize", pipeline.serialize))
        if callable(getattr(pipeline, "prepare_bodies", None)):  # the archive's bodies, made in finish()
            self._patch(pipeline, "prepare_bodies", self._timed("archive_bodies", pipeline.prepare_bodies))
        if callable(getattr(dkim, "sign", None)):
            self._patch(dkim, "sign", self._timed("dkim_sign", dkim.sign))

    def _patch(self, owner, name, value) -> None:
        self._undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def _timed(self, name, function):
        self.names.append(name)

        def timed(*args, **kwargs):
            started = time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                table = self.spent.setdefault(self.kind, {})
                table[name] = table.get(name, 0.0) + time.thread_time() - started
        return timed

    def restore(self) -> None:
        for owner, name, value in reversed(self._undo):
            setattr(owner, name, value)
        self._undo.clear()


def short(filename: str) -> str:
    """A function's file without this machine's paths."""
    if filename == "~":
        return ""
    for marker in ("site-packages/", "/relay/", "/scripts/"):
        if marker in filename:
            tail = filename.split(marker, 1)[1]
            return tail if marker == "site-packages/" else marker.strip("/") + "/" + tail
    stdlib = sysconfig.get_paths()["stdlib"]
    if filename.startswith(stdlib):
        return "stdlib" + filename[len(stdlib):]
    return os.path.basename(filename)


def label(key) -> str:
    filename, line, name = key
    where = short(filename)
    return f"{where}:{line}({name})" if where else name


def main(args) -> int:
    from relay import dkim
    from relay import dns as relay_dns

    count = args.messages
    private_pem = mix.TEST_KEY.read_bytes()
    with DNSServer([mix.buyer_zone(private_pem)]) as dns_server:
        resolver = relay_dns.make_resolver([dns_server.address])
        relay_dns.install(resolver)
        relay_key = dkim.DkimKey("relay", mix.MARKETPLACE, dkim.generate_private_pem())
        steps = Steps(resolver, relay_key)
        variants = mix.build_variants(steps.seller_alias, args.seed, private_pem)
        order = mix.sequence(variants, count, args.seed)

        def raw(position: int) -> bytes:
            return b"Message-ID: <profile-%d@%s>\r\n" % (position, mix.BUYER_DOMAIN.encode()) \
                + variants[order[position]].data

        for number, variant in enumerate(variants):  # warm-up: imports, caches, DNS
            steps.run(b"Message-ID: <warm-%d@x.example>\r\n" % number + variant.data, number)

        cpu: dict[str, dict[str, float]] = {kind: {name: 0.0 for name in steps.names} for kind in mix.KINDS}
        counts = {kind: 0 for kind in mix.KINDS}
        clock = StageClock()
        started = time.perf_counter()
        try:
            for position in range(count):
                kind = clock.kind = variants[order[position]].kind
                counts[kind] += 1
                for name, seconds in steps.run(raw(position), position, meter=cpu_meter()).items():
                    cpu[kind][name] += seconds
        finally:
            clock.restore()
        timed_wall = time.perf_counter() - started

        # One message with a 10 MB attachment, under tracemalloc: the peak
        # of Python allocations in each step.
        big = mix.big_message(steps.seller_alias, args.seed + 3, private_pem)
        big_raw = b"Message-ID: <profile-big@%s>\r\n" % mix.BUYER_DOMAIN.encode() + big.data
        tracemalloc.start()
        try:
            big_peaks = steps.run(big_raw, count, meter=memory_meter())
        finally:
            tracemalloc.stop()
        big_wire = len(big.payload())

        profiler = cProfile.Profile()
        profiler.enable()
        for position in range(count):
            steps.run(raw(position), position)
        profiler.disable()

    per_kind = {}
    for kind in mix.KINDS:
        if counts[kind]:
            ms = {name: cpu[kind][name] * 1000 / counts[kind] for name in steps.names}
            ms["total"] = sum(ms.values())
            per_kind[kind] = {"messages": counts[kind], **{k: round(v, 2) for k, v in ms.items()}}
    mix_total = {name: sum(cpu[kind][name] for kind in mix.KINDS) * 1000 / count for name in steps.names}
    mix_total["total"] = sum(mix_total.values())
    per_kind["mix"] = {"messages": count, **{k: round(v, 2) for k, v in mix_total.items()}}

    stage_ms = {}
    for name in clock.names:
        row = {kind: clock.spent.get(kind, {}).get(name, 0.0) * 1000 / counts[kind]
               for kind in mix.KINDS if counts[kind]}
        row["mix"] = sum(clock.spent.get(kind, {}).get(name, 0.0) for kind in mix.KINDS) * 1000 / count
        stage_ms[name] = {k: round(v, 2) for k, v in row.items()}

    stats = pstats.Stats(profiler)
    rows = []
    for key, (primitive, calls, own, cumulative, _) in stats.stats.items():
        rows.append({"function": label(key), "calls": calls, "own_ms": own * 1000,
                     "own_ms_per_msg": own * 1000 / count, "cum_ms_per_msg": cumulative * 1000 / count})
    rows.sort(key=lambda r: r["own_ms"], reverse=True)
    profiled_total = sum(r["own_ms"] for r in rows)
    top = rows[:TOP]

    report = {
        "api": steps.api,
        "messages": count,
        "mix": counts,
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "cpu_ms_per_message": per_kind,
        "process_ms_by_stage": stage_ms,
        "big_message_wire_mb": round(big_wire / 2**20, 2),
        "big_message_peak_traced_mb_by_step": {k: round(v / 2**20, 1) for k, v in big_peaks.items()},
        "cpu_bound_msgs_per_s_per_core": round(1000 / mix_total["total"], 1) if mix_total["total"] else None,
        "timed_pass_wall_s": round(timed_wall, 2),
        "profiled_total_ms": round(profiled_total, 1),
        "top_own_time": [{**r, "own_ms": round(r["own_ms"], 1), "own_ms_per_msg": round(r["own_ms_per_msg"], 3),
                          "cum_ms_per_msg": round(r["cum_ms_per_msg"], 3),
                          "share": round(r["own_ms"] / profiled_total, 3) if profiled_total else 0}
                         for r in top],
    }
    if args.json:
        print(json.dumps(report))
        return 0
    names = steps.names + ["total"]
    print(f"relay per-message CPU ({steps.api}), {count} messages of the mix "
          f"({counts['text']} text, {counts['html']} html, {counts['pdf']} pdf), thread CPU time, no profiler")
    print(f"{'kind':<8}{'msgs':>6}" + "".join(f"{n + ' ms':>12}" for n in names))
    for kind, values in per_kind.items():
        print(f"{kind:<8}{values['messages']:>6}" + "".join(f"{values[n]:>12.2f}" for n in names))
    print(f"one core at {mix_total['total']:.1f} CPU ms per message of the mix: at most "
          f"{report['cpu_bound_msgs_per_s_per_core']} msg/s per core for this work alone")
    if stage_ms:
        print()
        kinds = [k for k in mix.KINDS if counts[k]] + ["mix"]
        print("process ms by stage (serialize and dkim_sign run inside the last steps of process)")
        print(f"{'stage':<22}" + "".join(f"{k:>10}" for k in kinds))
        for name, row in stage_ms.items():
            print(f"{name:<22}" + "".join(f"{row[k]:>10.2f}" for k in kinds))
    print()
    print(f"one 10 MB attachment ({big_wire / 2**20:.1f} MB on the wire): peak of Python allocations "
          f"(tracemalloc) during each step, beyond the raw message:")
    print("  " + ", ".join(f"{name} {peak / 2**20:.0f} MB ({peak / big_wire:.1f}x)"
                           for name, peak in big_peaks.items()))
    print()
    print(f"top {TOP} functions by own time (cProfile; {profiled_total:.0f} ms profiled in all, "
          f"profiler overhead included)")
    print(f"{'own ms':>9}{'share':>7}{'own/msg':>9}{'cum/msg':>9}{'calls':>9}  function")
    for r in report["top_own_time"]:
        print(f"{r['own_ms']:>9.1f}{r['share'] * 100:>6.1f}%{r['own_ms_per_msg']:>9.3f}{r['cum_ms_per_msg']:>9.3f}"
              f"{r['calls']:>9}  {r['function']}")
    return 0

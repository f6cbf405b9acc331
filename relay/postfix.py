"""Postfix in front of the relay: the configuration postfix needs, generated
from the relay's own config so that the domain and the ports are written
down once (in relay.toml) and nowhere by hand.

Two modes (docs/postfix.md):

- ``transport`` (recommended): postfix accepts mail for the alias domain
  (``relay_domains``), refuses unknown aliases at RCPT from a generated
  ``relay_recipient_maps`` table, queues, and delivers through a dedicated
  smtp transport (``aliasrelay``: one recipient per delivery, XFORWARD on) to
  the relay's inbound listener. The relay's upstream is a loopback-only
  reinjection listener of postfix (no content filter) that queues and
  delivers the rewritten message.
- ``filter``: the same, plus an after-queue ``content_filter`` on the public
  smtpd service (FILTER_README style) for hosts that send everything they
  receive through a filter.

The generated settings also keep postfix within the relay's own limits:
``message_size_limit`` above the relay's SIZE (postfix's default is below
the base64 of a 10 MB attachment), and a cached connection to the relay
closed before it reaches ``[limits] command_call_limit`` or
``session_timeout``.

Everything here is pure (config in, text out) except `aliases_from_db`
(read-only SQLite), `write_atomically` and `run`/`main`.

`relay postfix-config` is `add_arguments` and `run` wired into cli.py
(`python -m relay.postfix` runs the same).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from relay import bounces
from relay.config import Config
from relay.store import all_aliases
from relay.store.url import is_postgres

MODES = ("transport", "filter")
HELP = "print (or write into --out DIR) the postfix configuration for this relay"

# Not "relay": stock master.cf already has a `relay` service (postfix's
# default transport for relay_domains); a second line of that name is a
# duplicate service, and changing the stock one would touch other
# relay_domains. A dedicated name keeps the per-transport limits ours.
TRANSPORT_NAME = "aliasrelay"
DEFAULT_MAP_DIR = "/etc/postfix/relay"

MAIN_CF = "main.cf"
MASTER_CF = "master.cf"
TRANSPORT_MAP = "transport"
RECIPIENT_MAP = "relay_recipients"
BOUNCE_MAP = "relay_bounces.regexp"


class PostfixConfigError(Exception):
    """The relay's config cannot be served by postfix as generated; the text
    names the key to change. `status` is the exit status of the command."""

    status = 2


class PostfixRuntimeError(PostfixConfigError):
    """A missing database or a failed postmap: exit status 1."""

    status = 1


@dataclass(frozen=True)
class Endpoints:
    relay_nexthop: str  # "[127.0.0.1]:2525": where postfix delivers to the relay
    reinject_service: str  # "127.0.0.1:10026": master.cf name of the reinjection listener
    reinject_networks: str  # who may relay through it: loopback only
    postfix_source: str  # the address postfix's smtp client connects to the relay from


def endpoints(config: Config) -> Endpoints:
    """The ports postfix needs, taken from relay.toml: the relay's inbound
    listener and the upstream (which must be postfix's reinjection listener
    on loopback)."""
    listen = config.inbound.listen
    host = listen.host
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise PostfixConfigError(
            f"inbound.listen: give an IP address for postfix to deliver to, not {host!r}") from None
    if address.is_unspecified:  # 0.0.0.0 / :: — postfix connects over loopback
        address = ipaddress.ip_address("::1" if address.version == 6 else "127.0.0.1")
    if listen.port == 0:
        raise PostfixConfigError("inbound.listen: port 0 picks a random port; give the port postfix delivers to")
    relay_nexthop = f"[{address}]:{listen.port}"

    upstream = config.upstream.url
    example = 'url = "smtp://127.0.0.1:10026"'
    if upstream.scheme != "smtp":
        raise PostfixConfigError(
            f"upstream.url: behind postfix the upstream is postfix's reinjection listener; set [upstream] "
            f"{example} (now {upstream})")
    try:
        reinject = ipaddress.ip_address(upstream.host)
    except ValueError:
        raise PostfixConfigError(
            f"upstream.url: give the reinjection listener as a loopback IP address, as in {example}") from None
    if not reinject.is_loopback:
        raise PostfixConfigError(
            f"upstream.url: the reinjection listener must be on loopback (it relays for its clients), "
            f"as in {example}; got {upstream.host}")
    if reinject.version == 6:
        return Endpoints(relay_nexthop, f"[{reinject}]:{upstream.port}", "[::1]/128", str(address))
    return Endpoints(relay_nexthop, f"{reinject}:{upstream.port}", "127.0.0.0/8", str(address))


def warnings_for(config: Config) -> list[str]:
    """Things that work but lose something; `run` prints them on stderr."""
    found = []
    source = endpoints(config).postfix_source
    if source not in config.inbound.xforward_hosts:
        found.append(f"inbound.xforward_hosts does not list {source}: the relay will refuse postfix's "
                     f"XFORWARD, and SPF and the archive will see {source} instead of the real client")
    if config.auth.inbound == "off":
        found.append("auth.inbound = \"off\": the relay checks no SPF/DKIM/DMARC; set \"dmarc\" for real mail")
    limit = message_size_limit(config)
    if limit > POSTFIX_MAILBOX_SIZE_LIMIT:
        found.append(f"message_size_limit = {limit} is over postfix's default mailbox_size_limit "
                     f"({POSTFIX_MAILBOX_SIZE_LIMIT}): raise mailbox_size_limit too if this host delivers locally")
    return found


# Postfix's smtp client sends XFORWARD twice per delivery (NAME/ADDR/PORT,
# then PROTO/HELO/IDENT/SOURCE: two states in smtp_proto.c), and each other
# command at most once (MAIL, RCPT with a recipient limit of 1, DATA, RSET
# before the session goes back to the cache). The relay counts each command
# per session (`[limits] command_call_limit`), so this is what one delivery
# takes of it.
COMMANDS_PER_DELIVERY = 2
# Postfix's default; local(8) refuses to run when it is below message_size_limit.
POSTFIX_MAILBOX_SIZE_LIMIT = 51200000
# Postfix's own default for smtp_connection_reuse_time_limit.
REUSE_SECONDS = 300
# What the relay's output may add to what it took in: trace headers, the
# DKIM signature, and the re-encoding of the text parts that SIZE leaves room
# for (two of `[policy] max_text_part_bytes`; quoted-printable of a part with
# over-long lines can double it), plus a megabyte for postfix's own Received:
# line and queue-file envelope, which message_size_limit counts too.
HEADER_HEADROOM = 1048576


def message_size_limit(config: Config) -> int:
    """postfix's message_size_limit for the relay: SIZE plus room for what the
    relay adds. One main.cf value serves both directions, the public smtpd
    (which must take whatever the relay would take, plus its own Received:
    line) and the reinjection listener (which must take the relay's output),
    so both are above the relay's own SIZE: a message over it is refused by
    the relay (552 5.3.4, a bounce from postfix) rather than by postfix's
    smaller default (10240000), which is below the base64 of a 10 MB
    attachment."""
    return config.size_limit + 2 * config.policy.max_text_part_bytes + HEADER_HEADROOM


@dataclass(frozen=True)
class Reuse:
    """How postfix may reuse one connection to the relay."""

    count_limit: int  # smtp_connection_reuse_count_limit; 0: no caching at all
    time_limit: int  # smtp_connection_reuse_time_limit, seconds


def connection_reuse(config: Config) -> Reuse:
    """Keep a cached connection under the relay's per-session limits: at most
    count_limit + 1 deliveries of COMMANDS_PER_DELIVERY each, one delivery
    spare, within `[limits] command_call_limit`; and reused only in the first
    half of `[limits] session_timeout`, so the last delivery has the other
    half. (Over either, the relay says 421 mid-queue and postfix defers.)"""
    limits = config.limits
    count = limits.command_call_limit // COMMANDS_PER_DELIVERY - 2
    seconds = min(REUSE_SECONDS, int(limits.session_timeout // 2))
    if count < 1 or seconds < 1:
        return Reuse(0, 0)
    return Reuse(count, seconds)


def _header(config: Config, mode: str, what: str) -> str:
    return (f"# {what} for the relay of {config.domain} ({mode} mode).\n"
            f"# Generated by `relay postfix-config --mode {mode}`; regenerate rather than edit.\n")


def render_main_cf(config: Config, mode: str = "transport", map_dir: str = DEFAULT_MAP_DIR) -> str:
    """Lines to add to main.cf. If main.cf already sets relay_domains,
    relay_recipient_maps or transport_maps, merge the values by hand."""
    _check_mode(mode)
    endpoints(config)  # validate the ports now, not at the first message
    d = map_dir.rstrip("/")
    return _header(config, mode, "main.cf settings") + "\n".join([
        f"relay_domains = {config.domain}",
        "# Unknown aliases are refused at RCPT, before anything is queued; regenerate",
        f"# {d}/{RECIPIENT_MAP} when relationships are added (docs/postfix.md).",
        f"relay_recipient_maps = hash:{d}/{RECIPIENT_MAP}, regexp:{d}/{BOUNCE_MAP}",
        "# Mail for the alias domain goes to the relay"
        + (" (filter mode: also bounces and local mail, which bypass the smtpd filter)." if mode == "filter"
           else "."),
        f"transport_maps = hash:{d}/{TRANSPORT_MAP}",
        "# The relay takes one relationship per transaction (452 4.5.3 for the others).",
        f"{TRANSPORT_NAME}_destination_recipient_limit = 1",
        f"# The relay's SIZE is {config.size_limit} (a {config.policy.max_attachment_bytes}-byte attachment "
        "base64-encoded,",
        "# two text parts, headers); postfix must take that and what the relay adds to it.",
        f"message_size_limit = {message_size_limit(config)}",
        "",
    ])


def render_master_cf(config: Config, mode: str = "transport", smtpd_service: str = "smtp") -> str:
    """Lines to add to master.cf. In filter mode the first entry replaces the
    public smtpd service line (`smtpd_service`, normally `smtp`): keep your
    own -o options on it and add the content_filter one."""
    _check_mode(mode)
    ep = endpoints(config)
    lines = [_header(config, mode, "master.cf services").rstrip("\n")]
    if mode == "filter":
        lines += [
            "# The public smtpd: everything it accepts passes the relay after queueing.",
            f"{smtpd_service} inet n - n - - smtpd",
            f"  -o content_filter={TRANSPORT_NAME}:{ep.relay_nexthop}",
        ]
    reuse = connection_reuse(config)
    if reuse.count_limit:
        # Postfix caches connections when there is a backlog; each delivery
        # counts against the relay's per-session limits.
        cache_note = [
            f"# A cached connection closes before the relay's [limits] command_call_limit "
            f"({config.limits.command_call_limit}) or",
            "# session_timeout would end it with 421.",
        ]
        cache_options = [f"  -o smtp_connection_reuse_count_limit={reuse.count_limit}",
                         f"  -o smtp_connection_reuse_time_limit={reuse.time_limit}s"]
    else:
        cache_note = ["# [limits] command_call_limit or session_timeout leave no room for a second",
                      "# delivery on one connection: no connection caching."]
        cache_options = ["  -o smtp_connection_cache_on_demand=no", "  -o smtp_connection_cache_destinations="]
    lines += [
        "# Delivery to the relay: XFORWARD tells it the real client (SPF, archive);",
        "# its 4xx keep the message queued, its 5xx bounce it.",
        *cache_note,
        f"{TRANSPORT_NAME} unix - - n - - smtp",
        f"  -o syslog_name=postfix/{TRANSPORT_NAME}",
        "  -o smtp_send_xforward_command=yes",
        "  -o disable_mime_output_conversion=yes",
        "  -o smtp_tls_security_level=none",
        "  -o smtp_generic_maps=",
        *cache_options,
    ]
    lines += [
        "# Reinjection: the relay's upstream. Loopback only, no content filter (no loop).",
        f"{ep.reinject_service} inet n - n - - smtpd",
        "  -o syslog_name=postfix/relay-reinject",
        "  -o content_filter=",
        "  -o receive_override_options=no_unknown_recipient_checks,no_header_body_checks,no_milters",
        "  -o smtpd_milters=",
        "  -o smtpd_helo_restrictions=",
        "  -o smtpd_client_restrictions=",
        "  -o smtpd_sender_restrictions=",
        f"  -o mynetworks={ep.reinject_networks}",
        "  -o smtpd_relay_restrictions=permit_mynetworks,reject",
        "  -o smtpd_recipient_restrictions=permit_mynetworks,reject",
        "  -o smtpd_authorized_xforward_hosts=",
        "  -o smtpd_sasl_auth_enable=no",
        "",
    ]
    return "\n".join(lines)


def render_transport(config: Config) -> str:
    """The transport map (`postmap` it): the alias domain to the relay."""
    return (f"# transport_maps entry for the relay of {config.domain}; `postmap` after writing.\n"
            f"{config.domain} {TRANSPORT_NAME}:{endpoints(config).relay_nexthop}\n")


def bounce_pattern(domain: str) -> str:
    """A POSIX ERE for the relay's VERP return paths (bounces.make_address):
    they are signed and expiring, so they cannot be listed; the relay checks
    the signature itself at RCPT."""
    return (rf"^{re.escape(bounces.PREFIX)}[0-9a-f]{{32}}\.[0-9a-f]{{1,6}}\.[a-z2-7]{{16}}@"
            + re.escape(domain) + "$")


def render_bounce_map(config: Config) -> str:
    return (f"# Delivery reports to the relay's signed return paths (regexp table, no postmap).\n"
            f"/{bounce_pattern(config.domain)}/ OK\n")


def render_recipients(config: Config, aliases: Iterable[str]) -> str:
    """The relay_recipient_maps table (`postmap` it): one line per alias of
    the configured domain."""
    suffix = "@" + config.domain
    wanted = sorted({a.strip().lower() for a in aliases if a.strip().lower().endswith(suffix)})
    return (f"# Aliases of {config.domain}: {len(wanted)}. Generated by "
            f"`relay postfix-config --recipients-only`; `postmap` after writing.\n"
            + "".join(f"{alias} OK\n" for alias in wanted))


def render(config: Config, mode: str = "transport", *, map_dir: str = DEFAULT_MAP_DIR,
           smtpd_service: str = "smtp") -> dict[str, str]:
    """Every generated file but the recipient table, by file name."""
    return {
        MAIN_CF: render_main_cf(config, mode, map_dir),
        MASTER_CF: render_master_cf(config, mode, smtpd_service),
        TRANSPORT_MAP: render_transport(config),
        BOUNCE_MAP: render_bounce_map(config),
    }


# --- the alias table ----------------------------------------------------------

def aliases_from_db(path: str | os.PathLike) -> list[str]:
    """Every alias: from the SQLite file at `path` opened read-only (safe
    beside a running relay), or from the PostgreSQL database it names."""
    if is_postgres(str(path)):
        return all_aliases(str(path))
    path = Path(path)
    if not path.exists():
        raise PostfixRuntimeError(f"database: {path}: no such file (run `relay db upgrade` first)")
    return all_aliases(str(path))


# --- files ----------------------------------------------------------------

def write_atomically(path: str | os.PathLike, text: str, mode: int = 0o644) -> None:
    """Write `text` to `path` so that a reader (postmap, postfix) sees the old
    file or the new one, never half of it: a temporary file in the same
    folder, fsynced, then renamed over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def postmap(path: str | os.PathLike, postmap_command: str = "postmap",
            config_dir: str | os.PathLike | None = None) -> None:
    """Build the hash table of `path` (`path.db`), with postfix's config in
    `config_dir`; without it postmap itself looks at $MAIL_CONFIG (inherited),
    else postfix's default (/etc/postfix)."""
    command = [postmap_command] + (["-c", str(config_dir)] if config_dir else []) + [f"hash:{path}"]
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except FileNotFoundError:
        raise PostfixRuntimeError(f"--postmap: {postmap_command} not found (is postfix installed?)") from None
    if result.returncode != 0:
        # postmap's own text says which main.cf it could not read; say how to pick another.
        hint = "" if config_dir else " (another postfix config folder: --postfix-config-dir DIR or MAIL_CONFIG)"
        raise PostfixRuntimeError(
            f"postmap hash:{path} failed: {result.stderr.strip() or result.returncode}{hint}")


# --- the command ----------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=MODES, default="transport",
                        help="transport (recommended) or filter (after-queue content filter)")
    parser.add_argument("--out", metavar="DIR",
                        help="write the files into DIR (atomically) instead of printing them; "
                             "the maps are referenced from DIR unless --map-dir says otherwise")
    parser.add_argument("--map-dir", metavar="DIR",
                        help=f"where main.cf finds the maps (default: --out, else {DEFAULT_MAP_DIR})")
    parser.add_argument("--smtpd-service", metavar="NAME", default="smtp",
                        help="filter mode: the master.cf smtpd service that gets the content_filter")
    parser.add_argument("--recipients-only", action="store_true",
                        help="only the alias table from the database (for a timer or a provisioning hook)")
    parser.add_argument("--postmap", action="store_true",
                        help="with --out: run postmap on the hash tables written")
    parser.add_argument("--postfix-config-dir", metavar="DIR",
                        help="with --postmap: postfix's config folder for postmap (`postmap -c DIR`); "
                             "default: $MAIL_CONFIG, as for postfix's own commands, else /etc/postfix")


def run(args: argparse.Namespace, config: Config) -> int:
    """`relay postfix-config`: 0, or 2 (config unusable) / 1 (database,
    files, postmap) with one line on stderr."""
    try:
        return _run(args, config)
    except PostfixConfigError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return exc.status
    except (OSError, sqlite3.Error) as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1


def _run(args, config: Config) -> int:
    out = Path(args.out) if args.out else None
    if args.postmap and out is None:
        raise PostfixConfigError("--postmap needs --out DIR")
    if args.postfix_config_dir and not args.postmap:
        raise PostfixConfigError("--postfix-config-dir is for --postmap")
    map_dir = args.map_dir or (str(out.resolve()) if out else DEFAULT_MAP_DIR)
    if args.recipients_only:
        files = {}
    else:
        files = render(config, args.mode, map_dir=map_dir, smtpd_service=args.smtpd_service)
        for line in warnings_for(config):
            print(f"relay: warning: {line}", file=sys.stderr)
    if out is not None or args.recipients_only:
        files[RECIPIENT_MAP] = render_recipients(config, aliases_from_db(config.database))
    if out is None:
        for name, text in files.items():
            if len(files) > 1:
                print(f"# ==> {map_dir}/{name} <==" if name not in (MAIN_CF, MASTER_CF) else f"# ==> {name} <==")
            sys.stdout.write(text)
            if len(files) > 1:
                print()
        return 0
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        write_atomically(out / name, text)
    if args.postmap:
        for name in (TRANSPORT_MAP, RECIPIENT_MAP):
            if name in files:
                postmap(out / name, config_dir=args.postfix_config_dir)
    print(f"wrote {', '.join(sorted(files))} to {out}", file=sys.stderr)
    return 0


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise PostfixConfigError(f"--mode: expected one of {', '.join(MODES)}, got {mode!r}")


def main(argv: list[str] | None = None) -> int:
    """`python -m relay.postfix [--config PATH] …`, the same as `relay postfix-config`."""
    from relay import config as config_module

    parser = argparse.ArgumentParser(prog="relay postfix-config", description=HELP)
    parser.add_argument("--config", metavar="PATH", help="config file (default: $RELAY_CONFIG, else config/relay.toml)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    path = config_module.config_path(args.config)
    try:
        config = config_module.load(path)
    except config_module.ConfigError as exc:
        print(f"relay: {path}: {exc}", file=sys.stderr)
        return 2
    return run(args, config)


if __name__ == "__main__":
    sys.exit(main())

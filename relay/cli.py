"""The `relay` command: argparse subcommands, each a thin call into the
store or the server.

Errors are one line on stderr: exit status 2 for bad usage or a bad config,
1 for anything else (an unknown party, a duplicate order, a database that
cannot be opened). Listing commands take `--json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from relay import __version__, addresses, archive, auth, config as config_module, disputes, postfix, preflight
from relay import provisioning
from relay.config import Config, ConfigError
from relay.lock import DatabaseLock, Locked
from relay.progress import Progress
from relay.store import NotFound, StoreError, StoreUnavailable, iso, open_store
from relay.store.url import is_postgres, redact

EXIT_FAILURE = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad arguments: exit status 2."""


# Every --json flag says the same: the fields are documented in one place.
JSON_HELP = "print JSON instead (fields: docs/cli.md)"


class MissingCommand(Exception):
    """A command group given without its command (`relay`, `relay archive`):
    its usage and the list of its commands, on stderr, exit status 2 (like
    git alone)."""

    def __init__(self, help_text: str):
        super().__init__(help_text)
        self.help_text = help_text


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage dump
        commands = next((a for a in self._actions if isinstance(a, argparse._SubParsersAction)), None)
        required = "the following arguments are required: "
        if commands is not None and message.startswith(required) \
                and commands.metavar in message[len(required):].split(", "):
            raise MissingCommand(self.format_help())
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="relay", description="Aliasing mail proxy for marketplaces.")
    parser.add_argument("--config", metavar="PATH",
                        help="config file (default: $RELAY_CONFIG, else config/relay.toml)")
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    commands.add_parser("serve", help="run the listeners until SIGTERM/SIGINT")

    db_commands = _command_group(commands, "db", "database maintenance")
    db_commands.add_parser("upgrade", help="create or migrate the database")
    migrate = db_commands.add_parser(
        "migrate-to", help="copy this SQLite store into an empty PostgreSQL database, then verify the copy")
    migrate.add_argument("url", metavar="URL", help="postgresql://user@host:port/dbname (the password: PGPASSWORD)")
    migrate.add_argument("--json", action="store_true", help=JSON_HELP)

    check = commands.add_parser("check-config", help="validate the config and print the effective settings")
    check.add_argument("--json", action="store_true", help=JSON_HELP)

    for role in ("seller", "buyer"):
        sub = _command_group(commands, role, f"manage {role}s")
        add = sub.add_parser("add", help=f"register a {role}")
        add.add_argument("email", help=f"the {role}'s real address")
        add.add_argument("--name", default="", help="display name shown to the counterpart")
        add.add_argument("--json", action="store_true", help=JSON_HELP)
        if role == "seller":
            add.add_argument("--password-stdin", action="store_true",
                             help="read the submission password from standard input")
            add.add_argument("--daily-orders", type=int, metavar="N",
                             help="use N as the daily order volume of the sending cap")
            passwd = sub.add_parser("passwd", help="set the submission password (read from stdin)")
            passwd.add_argument("email", help="the seller's registered address")
            limits = sub.add_parser("set-daily-orders", help="override (or with 'auto', stop overriding) "
                                                             "the daily order volume of the cap")
            limits.add_argument("email", help="the seller's registered address")
            limits.add_argument("value", metavar="N|auto",
                                help="orders per day to count, or 'auto' for the seller's real orders")
            show = sub.add_parser("show", help="the seller's cap, its use and its buyers' opt-outs")
            show.add_argument("email", help="the seller's registered address")
            show.add_argument("--json", action="store_true", help=JSON_HELP)
        else:
            for verb, text in (("opt-out", "refuse seller-initiated messages"),
                               ("opt-in", "accept seller-initiated messages again")):
                choice = sub.add_parser(verb, help=text)
                choice.add_argument("email", help="the buyer's registered address")

    order_commands = _command_group(commands, "order", "record orders")
    order_add = order_commands.add_parser("add", help="record an order; creates the relationship on the first one")
    order_add.add_argument("order_id", help="the marketplace's own order id (once per order)")
    order_add.add_argument("--seller", required=True, metavar="EMAIL", help="the seller's registered address")
    order_add.add_argument("--buyer", required=True, metavar="EMAIL", help="the buyer's registered address")
    order_add.add_argument("--placed-at", metavar="ISO", help="when the order was placed (default: now)")
    order_add.add_argument("--json", action="store_true", help=JSON_HELP)

    rel_commands = _command_group(commands, "relationship", "inspect relationships")
    show = rel_commands.add_parser("show", help="a pair, its aliases and its counts")
    show.add_argument("--seller", metavar="EMAIL", help="the seller's address (with --buyer)")
    show.add_argument("--buyer", metavar="EMAIL", help="the buyer's address (with --seller)")
    show.add_argument("--alias", metavar="ADDRESS", help="either alias of the relationship")
    show.add_argument("--json", action="store_true", help=JSON_HELP)

    _add_dispute_commands(commands)
    return parser


VERDICTS = ("delivered", "rejected", "deferred", "failed")


def _add_dispute_commands(commands) -> None:
    """relay archive …, relay purge, relay report … (issue 6)."""
    sub = _command_group(commands, "archive", "dispute tools: find, show, export and verify messages")

    listing = sub.add_parser("list", help="archived messages, newest first")
    listing.add_argument("--relationship", metavar="R", help="relationship id or either alias")
    listing.add_argument("--seller", metavar="EMAIL", help="messages of this seller's relationships")
    listing.add_argument("--buyer", metavar="EMAIL", help="messages of this buyer's relationships")
    listing.add_argument("--since", metavar="D", help="received at or after D (ISO date or time, UTC)")
    listing.add_argument("--until", metavar="D", help="received before D (a date: up to its end)")
    listing.add_argument("--verdict", choices=VERDICTS, help="only messages with this outcome")
    listing.add_argument("--limit", type=int, default=50, metavar="N", help="rows per page (default 50)")
    listing.add_argument("--page", type=int, default=1, metavar="P", help="page number, from 1")
    listing.add_argument("--json", action="store_true", help=JSON_HELP)

    show = sub.add_parser("show", help="one archived message: a summary, or its bytes")
    show.add_argument("id", type=int, metavar="ID", help="the archive id (archive list, the 250 reply)")
    what = show.add_mutually_exclusive_group()
    what.add_argument("--raw", action="store_true", help="the bytes exactly as received")
    what.add_argument("--delivered", action="store_true", help="the bytes as delivered")
    what.add_argument("--changes", action="store_true", help="what the relay changed and why")
    show.add_argument("--json", action="store_true", help="the summary as JSON")

    export = sub.add_parser("export", help="a whole conversation, both directions, with a manifest")
    export.add_argument("--relationship", metavar="R", help="relationship id or either alias")
    export.add_argument("--seller", metavar="EMAIL", help="the seller's address (with --buyer)")
    export.add_argument("--buyer", metavar="EMAIL", help="the buyer's address (with --seller)")
    export.add_argument("--format", required=True, choices=archive.FORMATS,
                        help="one mbox file, or a folder of .eml files")
    export.add_argument("--as", dest="as_", choices=archive.AS_CHOICES, default="raw",
                        help="the bytes as received (default) or as delivered")
    export.add_argument("out", metavar="OUT", help="mbox: the file to write; eml-dir: the folder to create")
    export.add_argument("--json", action="store_true", help="print the manifest")

    verify = sub.add_parser("verify", help="check the hash chain; exit 1 at any break")
    verify.add_argument("--head", metavar="SHA256",
                        help="a head printed by an earlier verify: fail unless the chain still holds it")
    verify.add_argument("--json", action="store_true", help=JSON_HELP)

    hold = sub.add_parser("hold", help="keep a relationship's archive from purge (a dispute)")
    hold.add_argument("relationship", metavar="R", help="relationship id or either alias")
    hold.add_argument("--reason", default="", help="a note, e.g. the case number")
    release = sub.add_parser("release", help="end a hold")
    release.add_argument("relationship", metavar="R", help="relationship id or either alias")
    holds = sub.add_parser("holds", help="relationships on hold")
    holds.add_argument("--json", action="store_true", help=JSON_HELP)

    token_commands = _command_group(commands, "api-token", "tokens of the HTTP API ([api] listen)")
    token_add = token_commands.add_parser("add", help="make a token; it is printed once, stored hashed")
    token_add.add_argument("name", metavar="NAME", help="who uses it (logged with each call)")
    token_add.add_argument("--role", required=True, choices=("admin", "disputes", "provisioning"),
                           help="provisioning: parties, orders, aliases; disputes: archive, holds; admin: all")
    token_add.add_argument("--json", action="store_true", help=JSON_HELP)
    token_revoke = token_commands.add_parser("revoke", help="revoke the live token of that name")
    token_revoke.add_argument("name", metavar="NAME", help="the name it was made with")
    token_list = token_commands.add_parser("list", help="every token made, live or revoked (never the tokens)")
    token_list.add_argument("--json", action="store_true", help=JSON_HELP)

    hook_commands = _command_group(commands, "webhooks", "the events POSTed to the marketplace ([webhooks] url)")
    hook_list = hook_commands.add_parser("list", help="the latest events, newest first: sent, pending, given up")
    hook_list.add_argument("--unsent", action="store_true", help="only events not sent (pending or given up)")
    hook_list.add_argument("--limit", type=int, default=50, metavar="N", help="at most N events (default 50)")
    hook_list.add_argument("--json", action="store_true", help=JSON_HELP)
    hook_retry = hook_commands.add_parser(
        "retry", help="send an unsent event again now (after the marketplace's endpoint is fixed)")
    hook_retry.add_argument("event_id", type=int, metavar="EVENT_ID", help="as `relay webhooks list` shows it")

    purge = commands.add_parser("purge", help="purge archive rows past [archive] retention_days")
    purge.add_argument("--dry-run", action="store_true", help="count, change nothing")
    purge.add_argument("--json", action="store_true", help=JSON_HELP)

    postfix.add_arguments(commands.add_parser("postfix-config", help=postfix.HELP))

    dkim_commands = _command_group(commands, "dkim", "DKIM signing keys")
    keygen = dkim_commands.add_parser("keygen", help="write a new RSA key and print the DNS record to publish")
    keygen.add_argument("--out", required=True, metavar="FILE", help="where to write the private key (PEM)")
    keygen.add_argument("--bits", type=int, default=2048, choices=(1024, 2048, 3072, 4096),
                        help="RSA key size (default 2048)")
    keygen.add_argument("--force", action="store_true", help="replace an existing file")
    keygen.add_argument("--json", action="store_true",
                        help="the record as JSON: its value, its TXT strings and the zone-file form")

    reports = _command_group(commands, "report", "reports", metavar="REPORT")
    response = reports.add_parser("response-time", help="share of buyer messages answered within 24 h, per seller")
    response.add_argument("--seller", metavar="EMAIL", help="this seller only")
    response.add_argument("--since", metavar="D", help="buyer messages received at or after D")
    response.add_argument("--until", metavar="D", help="the report as of D (default: now)")
    response.add_argument("--json", action="store_true", help="same as --format json")
    response.add_argument("--format", choices=("text", "json", "html"),
                          help="a table (default), JSON, or an HTML page with a chart")
    response.add_argument("--out", metavar="FILE", help="write the report here instead of to stdout")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except MissingCommand as exc:
        print(exc.help_text, end="", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    path = config_module.config_path(args.config)
    try:
        config = config_module.load(path)
    except ConfigError as exc:
        print(f"relay: {path}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(
        level=config.log.level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # aiosmtpd logs every command line at INFO, AUTH included: keep it to
    # warnings unless the operator asks for debug output.
    if config.log.level != "debug":
        logging.getLogger("mail.log").setLevel(logging.WARNING)
    try:
        return COMMANDS[_command_name(args)](args, config)
    except UsageError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except preflight.FileProblems as exc:  # a bad key, certificate or secret file: a bad config
        for problem in exc.problems:
            print(f"relay: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except (StoreError, StoreUnavailable) as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE


def _command_group(commands, name: str, help: str, metavar: str = "COMMAND"):
    """A command with subcommands (`relay db upgrade`): the subparsers, whose
    choice `_command_name` finds under the dest named after the command."""
    group = commands.add_parser(name, help=help)
    sub = group.add_subparsers(title="commands", dest=_group_dest(name), metavar=metavar, parser_class=_Parser)
    sub.required = True
    return sub


def _group_dest(command: str) -> str:
    return f"{command.replace('-', '_')}_command"


def _command_name(args) -> str:
    sub = getattr(args, _group_dest(args.command), None)
    return f"{args.command} {sub}" if sub else args.command


def _print_json(value) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


async def _with_store(config: Config, work):
    store = await open_store(config.database)
    try:
        await store.upgrade()
        return await work(store)
    finally:
        await store.close()


# --- commands -------------------------------------------------------------------

def cmd_serve(args, config: Config) -> int:
    from relay import private, workers
    from relay.server import serve

    private.warn_exposed(secret_files(config))
    workers.return_big_blocks()
    try:
        asyncio.run(serve(config))
    except Locked as exc:
        print(f"relay: database {config.database} is being copied by `relay db migrate-to` "
              f"(it holds {exc}); start the relay once the copy is done", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def secret_files(config: Config) -> list[Path]:
    """The files of this config that no one but the relay's user should
    read: the SQLite database (every archived message) with its -wal and
    -shm, the DKIM key, the bounce secret and the submission TLS key."""
    from relay import bounces, dkim, tls

    paths = [] if is_postgres(config.database) else [Path(config.database + s) for s in ("", "-wal", "-shm")]
    paths += [dkim.key_path(config), bounces.secret_path(config)]
    if config.webhooks.url:
        from relay import webhooks

        paths.append(webhooks.secret_path(config))
    paths.append(Path(config.submission.tls_key) if config.submission.tls_key
                 else tls.self_signed_paths(config.state_dir / "tls")[1])
    return paths


def cmd_db_upgrade(args, config: Config) -> int:
    async def work():
        store = await open_store(config.database)
        try:
            return await store.upgrade(), await store.schema_version()
        finally:
            await store.close()

    applied, version = asyncio.run(work())
    database = redact(config.database)
    if applied:
        print(f"database {database}: applied migration(s) {', '.join(map(str, applied))};"
              f" now at version {version}")
    else:
        print(f"database {database}: up to date at version {version}")
    return 0


def cmd_db_migrate_to(args, config: Config) -> int:
    """Copy the configured SQLite store into an empty PostgreSQL database,
    then check the copy as `relay archive verify` does."""
    if is_postgres(config.database):
        raise UsageError(f"the configured database is PostgreSQL already ({redact(config.database)}); "
                         "migrate-to copies a SQLite store")
    if not is_postgres(args.url):
        raise UsageError(f"not a postgresql:// URL: {redact(args.url)!r}")
    if not Path(config.database).is_file():
        raise NotFound(f"database {config.database}: no such file")
    # Refuse while a relay serves the source: what it accepts after the
    # snapshot would be left behind. Held until the copy is verified, so a
    # relay started meanwhile refuses too (relay/lock.py).
    try:
        lock = DatabaseLock(config.database).acquire(exclusive=True)
    except Locked as exc:
        print(f"relay: a relay is running on {config.database} (it holds {exc}); stop every "
              "`relay serve` on it first, so that nothing it accepts is left out of the copy", file=sys.stderr)
        return EXIT_FAILURE

    async def work():
        from relay.store.migrate import copy_store

        source = await open_store(config.database)
        try:
            target = await open_store(args.url)
            try:
                with Progress("copying", quiet=args.json) as progress:
                    done: dict[str, int] = {}

                    def copying(table: str, rows: int) -> None:
                        done[table] = rows
                        progress.update(sum(done.values()), table)

                    copied = await copy_store(source, target, progress=copying)
                    progress.update(sum(copied.counts.values()))  # the last line: all tables
                return copied, await _verify_archive(target, quiet=args.json, label="verifying the copy")
            finally:
                await target.close()
        finally:
            await source.close()

    with lock:
        copied, (verifier, breaks, _) = asyncio.run(work())
    if copied.source_head is not None and verifier.head != copied.source_head:
        breaks.append(archive.ChainBreak(0, "head", f"the copy's head {verifier.head} is not the source's "
                                                     f"{copied.source_head}"))
    if args.json:
        _print_json({"ok": not breaks, "source": config.database, "target": redact(args.url),
                     "schema_version": copied.schema_version, "rows": copied.counts,
                     "archive": {"rows": verifier.rows, "purged": verifier.purged, "head": verifier.head},
                     "breaks": [{"archive_id": b.archive_id, "kind": b.kind, "detail": b.detail} for b in breaks]})
        return EXIT_FAILURE if breaks else 0
    print(f"copied {config.database} into {redact(args.url)} (schema version {copied.schema_version}):")
    width = max(len(table) for table in copied.counts)
    for table, count in copied.counts.items():
        print(f"  {table:<{width}}  {count:>9} row(s)")
    if breaks:
        first = breaks[0]
        text = first.line() if first.kind != "head" else f"archive chain broken: {first.detail}"
        more = f" (and {len(breaks) - 1} more)" if len(breaks) > 1 else ""
        print(f"relay: the copy does not verify: {text}{more}; "
              f"run `relay archive verify` on {config.database}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"copy: {verifier.summary()}")
    return 0


def cmd_check_config(args, config: Config) -> int:
    problems, warnings = preflight.check(config)
    for problem in problems:
        print(f"relay: {problem}", file=sys.stderr)
    for warning in warnings:
        print(f"relay: warning: {warning}", file=sys.stderr)
    if problems:
        return EXIT_USAGE
    settings = config_module.effective(config)
    if args.json:
        _print_json(settings)
        return 0
    import tomli_w

    # TOML that tomllib reads back to these very values (the check-config test).
    print(tomli_w.dumps(settings), end="")
    return 0


def _read_password() -> str:
    """The password from stdin: the first line, without its line end (so
    `echo secret | relay seller passwd …` and a here-string both work)."""
    password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < 8:
        raise UsageError("the password must have at least 8 characters")
    if len(password.encode()) > auth.MAX_PASSWORD_BYTES:
        raise UsageError(f"the password must have at most {auth.MAX_PASSWORD_BYTES} bytes")
    return password


def _add_party(role: str):
    def command(args, config: Config) -> int:
        if not addresses.is_valid(args.email):
            raise UsageError(f"not an email address: {args.email!r}")
        if addresses.split(args.email)[1] == config.domain:
            raise UsageError(f"{args.email} is in the relay's own domain; give the {role}'s real address")
        password_hash = None
        if getattr(args, "password_stdin", False):
            password_hash = auth.hash_password(_read_password())
        daily_orders = getattr(args, "daily_orders", None)
        if daily_orders is not None and daily_orders < 0:
            raise UsageError("--daily-orders must not be negative")

        async def work(store):
            party = await store.add_party(role, args.email, args.name)
            if password_hash:
                party = await store.set_password_hash(party.address, password_hash)
            if daily_orders is not None:
                party = await store.set_daily_orders(party.address, daily_orders)
            return party

        party = asyncio.run(_with_store(config, work))
        if args.json:
            _print_json(provisioning.party_json(party))
        else:
            print(f"{role} {party.address} registered")
        return 0
    return command


def cmd_seller_passwd(args, config: Config) -> int:
    password_hash = auth.hash_password(_read_password())
    party = asyncio.run(_with_store(config, lambda store: store.set_password_hash(args.email, password_hash)))
    print(f"password set for seller {party.address}")
    return 0


def cmd_seller_set_daily_orders(args, config: Config) -> int:
    if args.value == "auto":
        value = None
    elif args.value.isdigit():
        value = int(args.value)
    else:
        raise UsageError(f"expected a number of orders or 'auto', got {args.value!r}")
    party = asyncio.run(_with_store(config, lambda store: store.set_daily_orders(args.email, value)))
    print(f"seller {party.address}: daily order volume "
          + ("from the orders of the last days" if value is None else f"set to {value}"))
    return 0


def cmd_seller_show(args, config: Config) -> int:
    policy = config.policy

    async def work(store):
        seller = await store.get_party("seller", args.email)
        if seller is None:
            return None
        now = datetime.now(timezone.utc)
        orders = await store.seller_orders_since(seller.id, iso(now - timedelta(days=policy.order_window_days)))
        sent, oldest = await store.seller_sends_since(seller.id, iso(now - timedelta(hours=policy.daily_window_hours)))
        relationships = await store.seller_relationships(seller.address)
        has_password = await store.password_hash(seller.address) is not None
        return seller, orders, sent, oldest, relationships, has_password

    found = asyncio.run(_with_store(config, work))
    if found is None:
        print(f"relay: no seller {addresses.normalize(args.email)}", file=sys.stderr)
        return EXIT_FAILURE
    seller, orders, sent, oldest, relationships, has_password = found
    from relay.handler import daily_cap  # the handler pulls in the whole pipeline: only here

    cap = daily_cap(policy, orders, seller.daily_orders)
    data = {
        "seller": seller.address,
        "seller_name": seller.display_name,
        "submission_password": has_password,
        "daily_cap": cap,
        "daily_orders_override": seller.daily_orders,
        "orders_in_window": orders,
        "sent_in_window": sent,
        "window_hours": policy.daily_window_hours,
        "oldest_in_window": oldest,
        "buyers": [{"buyer": r.buyer.address, "buyer_alias": r.buyer_alias, "relationship": r.id,
                    "opted_out": r.buyer.opted_out} for r in relationships],
    }
    if args.json:
        _print_json(data)
        return 0
    print(f"seller {seller.address} ({seller.display_name or 'no name'})"
          f"{'' if has_password else ', no submission password'}")
    volume = (f"override {seller.daily_orders}" if seller.daily_orders is not None
              else f"{orders} order(s) in {policy.order_window_days} days")
    print(f"daily cap: {cap} ({volume}); sent in the last {policy.daily_window_hours} h: {sent}")
    for buyer in data["buyers"]:
        print(f"  buyer {buyer['buyer']}  alias {buyer['buyer_alias']}"
              + ("  OPTED OUT" if buyer["opted_out"] else ""))
    return 0


def _opt(opted_out: bool):
    def command(args, config: Config) -> int:
        party = asyncio.run(_with_store(config, lambda store: store.set_opted_out(args.email, opted_out)))
        print(f"buyer {party.address} " + ("refuses" if opted_out else "accepts")
              + " seller-initiated messages")
        return 0
    return command


def _placed_at(value: str | None) -> str:
    if value is None:
        moment = datetime.now(timezone.utc)
    else:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise UsageError(f"--placed-at: not an ISO 8601 date or time: {value!r}") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
    return iso(moment)


def cmd_order_add(args, config: Config) -> int:
    placed_at = _placed_at(args.placed_at)
    order_id = args.order_id.strip()
    if not order_id:
        raise UsageError("ORDER_ID must not be empty")
    relationship, created = asyncio.run(_with_store(
        config, lambda store: store.add_order(order_id, args.seller, args.buyer, placed_at, config.domain)))
    if args.json:
        _print_json(provisioning.order_json(relationship, order_id, created))
    else:
        print(f"order {order_id} recorded for relationship {relationship.id}"
              + (" (new)" if created else ""))
        print(f"seller alias: {relationship.seller_alias}   (the buyer writes here)")
        print(f"buyer alias:  {relationship.buyer_alias}   (the seller writes here)")
    return 0


def cmd_relationship_show(args, config: Config) -> int:
    if args.alias and (args.seller or args.buyer):
        raise UsageError("give either --alias or --seller and --buyer")
    if not args.alias and not (args.seller and args.buyer):
        raise UsageError("give --alias, or both --seller and --buyer")

    async def work(store):
        if args.alias:
            relationship = await store.relationship_by_alias(args.alias)
        else:
            relationship = await store.relationship_for_pair(args.seller, args.buyer)
        if relationship is None:
            return None
        return await provisioning.relationship_json(store, relationship)

    data = asyncio.run(_with_store(config, work))
    if data is None:
        print("relay: no such relationship", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        _print_json(data)
    else:
        messages = data["messages"]
        print(f"relationship {data['relationship']} (since {data['created_at']})")
        print(f"seller: {data['seller']}  alias {data['seller_alias']}")
        print(f"buyer:  {data['buyer']}  alias {data['buyer_alias']}")
        print(f"orders: {data['orders']}")
        print(f"messages delivered: buyer→seller {messages['buyer_to_seller']}, "
              f"seller→buyer {messages['seller_to_buyer']}")
    return 0


# --- dispute tools -------------------------------------------------------------------

def _when(value: str | None, option: str, end_of_day: bool = False) -> str | None:
    if value is None:
        return None
    try:
        return archive.parse_when(value, end_of_day)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None


async def _relationship_of(store, value: str | None, seller: str | None = None, buyer: str | None = None):
    """The relationship named by --relationship (id or alias) or by --seller and --buyer."""
    if value is not None:
        value = value.strip()
        if value.isdigit():
            found = await store.relationship_by_id(int(value))
        elif "@" in value:
            found = await store.relationship_by_alias(value)
        else:
            raise UsageError(f"--relationship: expected a relationship id or an alias, got {value!r}")
    else:
        found = await store.relationship_for_pair(seller, buyer)
        value = f"between seller {addresses.normalize(seller)} and buyer {addresses.normalize(buyer)}"
    if found is None:
        raise NotFound(f"no relationship {value}")
    return found


_ARROWS = {"buyer_to_seller": "buyer→seller", "seller_to_buyer": "seller→buyer", None: "-"}


def cmd_archive_list(args, config: Config) -> int:
    if args.limit < 1 or args.page < 1:
        raise UsageError("--limit and --page must be at least 1")
    if args.relationship and (args.seller or args.buyer):
        raise UsageError("give either --relationship, or --seller and/or --buyer")
    since, until = _when(args.since, "--since"), _when(args.until, "--until", end_of_day=True)

    async def work(store):
        relationship_id = None
        if args.relationship:
            relationship_id = (await _relationship_of(store, args.relationship)).id
        return await disputes.search(
            store, relationship_id=relationship_id, seller=args.seller, buyer=args.buyer, since=since, until=until,
            verdict=args.verdict, limit=args.limit + 1, offset=(args.page - 1) * args.limit)

    rows = asyncio.run(_with_store(config, work))
    more, rows = len(rows) > args.limit, rows[:args.limit]
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print("no archived messages match" if args.page == 1 else f"no archived messages on page {args.page}")
        return 0
    print(f"{'id':>8}  {'received (UTC)':<27}  {'rel':>5}  {'direction':<12}  {'verdict':<9}  {'bytes':>9}  reply")
    for row in rows:
        size = "purged" if row["purged_at"] else str(row["bytes"])
        print(f"{row['archive_id']:>8}  {row['received_at']:<27}  {row['relationship'] or '-':>5}  "
              f"{_ARROWS.get(row['direction'], row['direction']):<12}  {row['verdict']:<9}  {size:>9}  "
              f"{(row['reply'] or '')[:60]}")
    if more:
        print(f"more: --page {args.page + 1}")
    return 0


def cmd_archive_show(args, config: Config) -> int:
    found = asyncio.run(_with_store(config, lambda store: disputes.message(store, args.id)))
    if found is None:
        raise NotFound(f"no archive row {args.id}")
    row, summary, relationship = found
    if args.raw or args.delivered:
        try:
            data = disputes.body_bytes(row, "raw" if args.raw else "delivered")
        except LookupError as exc:
            raise NotFound(str(exc)) from None
        except ValueError as exc:
            raise StoreError(str(exc)) from None
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return 0
    if args.changes:
        shown = disputes.changes(row)
        removed, added = shown["headers_removed"], shown["headers_added"]
        if args.json:
            _print_json(shown)
            return 0
        print(f"archive row {row['id']}: {row['verdict']} — {row['reply']}")
        print("what the relay did:" if row["changes"] else "what the relay did: nothing recorded")
        for change in row["changes"]:
            print(f"  - {change}")
        if row["purged_at"]:
            print(f"(purged at {row['purged_at']}: the bytes and the list of changes are gone)")
        elif row["delivered"] is None:
            print("nothing was delivered, so there is no header comparison")
        else:
            print("headers, as received (-) and as delivered (+):")
            for line in removed:
                print(f"  - {line}")
            for line in added:
                print(f"  + {line}")
        return 0
    if args.json:
        _print_json(summary)
        return 0
    print(f"archive row {row['id']}")
    print(f"received:     {row['received_at']}")
    if relationship:
        print(f"relationship: {relationship.id} (seller {relationship.seller.address}, "
              f"buyer {relationship.buyer.address})")
    print(f"direction:    {_ARROWS.get(row['direction'], row['direction'])}")
    print(f"verdict:      {row['verdict']}")
    if row["purged_at"]:
        print(f"purged:       {row['purged_at']} — bodies, envelope and changes removed past retention;"
              " the hashes stay in the chain")
    else:
        print(f"client:       {row['client_address']}")
        print(f"envelope:     MAIL FROM <{row['mail_from']}> RCPT TO {', '.join(row['rcpt_to'])}")
        print(f"reply:        {row['reply']}")
        if row["decode_error"]:
            print(f"bodies:       CANNOT BE READ: {row['decode_error']}")
        else:
            print(f"raw:          {summary['bytes']} bytes, sha256 {row['raw_sha256']}   (--raw)")
            if row["delivered"] is not None:
                print(f"delivered:    {summary['delivered_bytes']} bytes, sha256 {row['delivered_sha256']}"
                      "   (--delivered)")
        print(f"changes:      {len(row['changes'])}   (--changes)")
    for report in summary["bounces"]:
        print(f"bounce:       {report['received_at']} {report['action']}"
              f" (status {report['status'] or 'not given'}, read by {report['detector'] or 'no detector'}"
              f"{', sender notified' if report['notified'] else ', sender not notified'})")
    print(f"chain:        prev {row['prev_sha256']}")
    print(f"              row  {row['row_sha256']}")
    return 0


def cmd_archive_export(args, config: Config) -> int:
    if args.relationship and (args.seller or args.buyer):
        raise UsageError("give either --relationship, or --seller and --buyer")
    if not args.relationship and not (args.seller and args.buyer):
        raise UsageError("give --relationship, or both --seller and --buyer")

    async def work(store):
        relationship = await _relationship_of(store, args.relationship, args.seller, args.buyer)
        header = disputes.export_header(relationship, datetime.now(timezone.utc))
        try:
            exporter = archive.Exporter(Path(args.out), args.format, args.as_, header)
        except archive.ExportError as exc:
            raise StoreError(str(exc)) from None
        try:
            async for row in store.conversation(relationship.id):
                exporter.add(row)
            return exporter.finish()
        except archive.ExportError as exc:
            exporter.abort()
            raise StoreError(str(exc)) from None
        except BaseException:
            exporter.abort()
            raise

    manifest = asyncio.run(_with_store(config, work))
    if args.json:
        _print_json(manifest)
        return 0
    where = Path(args.out) / "manifest.json" if args.format == "eml-dir" else Path(args.out + ".manifest.json")
    omitted = f"; {len(manifest['omitted'])} omitted (see the manifest)" if manifest["omitted"] else ""
    print(f"exported {len(manifest['messages'])} message(s) of relationship {manifest['relationship']}"
          f" ({args.as_}, {args.format}) to {args.out}; manifest {where}{omitted}")
    return 0


async def _verify_archive(store, head: str | None = None, *, quiet: bool = True, label: str = "verifying"):
    """disputes.verify, with progress on a terminal unless `quiet`."""
    with Progress(label, quiet=quiet) as progress:
        return await disputes.verify(store, head, progress=progress.add)


def cmd_archive_verify(args, config: Config) -> int:
    verifier, breaks, head_found = asyncio.run(_with_store(
        config, lambda store: _verify_archive(store, args.head, quiet=args.json)))
    if args.json:
        _print_json(disputes.verify_json(verifier, breaks))
        return EXIT_FAILURE if breaks else 0
    if breaks:
        first = breaks[0]
        text = first.line() if first.kind != "head" else f"archive chain broken: {first.detail}"
        more = f" (and {len(breaks) - 1} more; --json lists them)" if len(breaks) > 1 else ""
        print(f"relay: {text}{more}", file=sys.stderr)
        return EXIT_FAILURE
    print(verifier.summary())
    return 0


def _hold(args, config: Config, on: bool) -> int:
    async def work(store):
        relationship = await _relationship_of(store, args.relationship)
        if on:
            return relationship, await store.hold(relationship.id, args.reason)
        return relationship, await store.release(relationship.id)

    relationship, changed = asyncio.run(_with_store(config, work))
    if on:
        print(f"relationship {relationship.id} is on hold: purge keeps its archive"
              + ("" if changed else " (it already was)"))
    elif changed:
        print(f"relationship {relationship.id} released: its archive is purged past retention again")
    else:
        print(f"relationship {relationship.id} was not on hold")
    return 0


def cmd_archive_hold(args, config: Config) -> int:
    return _hold(args, config, True)


def cmd_archive_release(args, config: Config) -> int:
    return _hold(args, config, False)


def cmd_archive_holds(args, config: Config) -> int:
    holds = asyncio.run(_with_store(config, lambda store: store.holds()))
    if args.json:
        _print_json(holds)
        return 0
    if not holds:
        print("no relationship is on hold")
    for hold in holds:
        print(f"relationship {hold['relationship']} ({hold['seller']} / {hold['buyer']}) on hold since "
              f"{hold['held_at']}" + (f": {hold['reason']}" if hold["reason"] else ""))
    return 0


def cmd_purge(args, config: Config) -> int:
    cutoff = archive.retention_cutoff(datetime.now(timezone.utc), config.archive.retention_days)
    with Progress("counting" if args.dry_run else "purging", quiet=args.json,
                  unit="row(s) past retention") as progress:
        counts = asyncio.run(_with_store(config, lambda store: store.purge(cutoff, dry_run=args.dry_run,
                                                                           progress=progress.add)))
    if args.json:
        _print_json(counts.to_json())
    else:
        print(archive.purge_summary(counts))
    if counts.damaged:
        print(f"relay: {counts.damaged} archive row(s) past retention fail their hashes and were kept;"
              " run `relay archive verify`", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def cmd_report_response_time(args, config: Config) -> int:
    if args.json and args.format not in (None, "json"):
        raise UsageError("--json is --format json; give one of them")
    fmt = "json" if args.json else (args.format or "text")
    since = _when(args.since, "--since")
    until = _when(args.until, "--until", end_of_day=True)
    now = archive.parse_iso(until) if until else datetime.now(timezone.utc)

    async def work(store):
        try:
            return await disputes.response_report(store, now, since=since, until=until, seller=args.seller)
        except LookupError as exc:
            raise NotFound(str(exc)) from None

    sellers = asyncio.run(_with_store(config, work))
    if fmt == "json":
        text = json.dumps(archive.report_json(sellers, now, since), indent=2, sort_keys=True) + "\n"
    elif fmt == "html":
        text = archive.render_html(sellers, now, since)
    else:
        text = archive.render_text(sellers, now, since)
    if args.out:
        archive.write_atomically(Path(args.out), text.encode("utf-8"))
        print(f"response-time report ({fmt}) written to {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_dkim_keygen(args, config: Config) -> int:
    from pathlib import Path

    from relay import dkim

    path = Path(args.out)
    if path.exists() and not args.force:
        raise UsageError(f"{path} exists; give --force to replace it")
    pem = dkim.generate_private_pem(args.bits)
    dkim.write_key(path, pem)
    name = dkim.record_name(config.dkim.selector, config.domain)
    value = dkim.dns_record(pem)
    if args.json:
        _print_json({"key_file": str(path), "bits": args.bits, "selector": config.dkim.selector,
                     "domain": config.domain, "record_name": name, "value": value, "strings": dkim.txt_strings(value),
                     "zone": dkim.zone_record(name, value)})
        return 0
    # A zone-file comment, then the record: the whole output can be pasted
    # into (or appended to) the domain's zone as it is.
    print(f"; wrote {path}; set [dkim] key_file = {json.dumps(str(path))} and publish this TXT record:")
    print(dkim.zone_record(name, value))
    return 0


def cmd_api_token_add(args, config: Config) -> int:
    from relay import api

    name = args.name.strip()
    if not name or len(name) > 100 or any(ord(c) < 32 for c in name):
        raise UsageError("NAME must be 1 to 100 printable characters")
    token = api.new_token()
    token_id = asyncio.run(_with_store(config, lambda store: store.add_api_token(name, args.role,
                                                                               api.token_sha256(token))))
    if args.json:
        _print_json({"token_id": token_id, "token_name": name, "role": args.role, "token": token})
    else:
        print(f"API token {name!r} ({args.role}); it is shown only now:")
        print(token)
    return 0


def cmd_api_token_revoke(args, config: Config) -> int:
    if not asyncio.run(_with_store(config, lambda store: store.revoke_api_token(args.name))):
        print(f"relay: no live API token named {args.name!r}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"API token {args.name!r} revoked")
    return 0


def cmd_api_token_list(args, config: Config) -> int:
    tokens = asyncio.run(_with_store(config, lambda store: store.api_tokens()))
    if args.json:
        _print_json([{"token_id": t["id"], "token_name": t["name"], "role": t["role"], "created_at": t["created_at"],
                      "revoked_at": t["revoked_at"]} for t in tokens])
        return 0
    if not tokens:
        print("no API tokens; make one with `relay api-token add NAME --role ROLE`")
    for t in tokens:
        state = f"revoked {t['revoked_at']}" if t["revoked_at"] else "live"
        print(f"{t['name']:<24} {t['role']:<13} made {t['created_at']}  {state}")
    return 0


def _webhook_state(event: dict) -> str:
    if event["sent_at"]:
        return "sent"
    return "pending" if event["next_attempt_at"] else "given_up"


def cmd_webhooks_list(args, config: Config) -> int:
    if args.limit < 1:
        raise UsageError("--limit must be at least 1")
    found = asyncio.run(_with_store(config, lambda store: store.webhook_events(args.limit, unsent=args.unsent)))
    events = [{"event_id": e["id"], "event_type": e["event"], "archive_id": e["archive_id"],
               "state": _webhook_state(e), "created_at": e["created_at"], "attempts": e["attempts"],
               "next_attempt_at": e["next_attempt_at"], "sent_at": e["sent_at"], "last_error": e["last_error"]}
              for e in found]
    if args.json:
        _print_json(events)
        return 0
    if not events:
        print("no webhook events" + (" unsent" if args.unsent else "")
              + ("" if config.webhooks.url else "; [webhooks] url is not set"))
    for e in events:
        when = {"sent": f"sent {e['sent_at']}", "pending": f"next attempt {e['next_attempt_at']}",
                "given_up": "given up"}[e["state"]]
        print(f"{e['event_id']:>6} {e['event_type']:<18} archive {e['archive_id'] or '-':<6} "
              f"attempts {e['attempts']:<3} {when}" + (f"  ({e['last_error']})" if e["last_error"] else ""))
    return 0


def cmd_webhooks_retry(args, config: Config) -> int:
    now = iso(datetime.now(timezone.utc))
    if not asyncio.run(_with_store(config, lambda store: store.retry_webhook_event(args.event_id, now))):
        print(f"relay: no unsent webhook event {args.event_id}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"webhook event {args.event_id} is due now; a running relay sends it within seconds")
    return 0


COMMANDS = {
    "serve": cmd_serve,
    "db upgrade": cmd_db_upgrade,
    "db migrate-to": cmd_db_migrate_to,
    "check-config": cmd_check_config,
    "seller add": _add_party("seller"),
    "buyer add": _add_party("buyer"),
    "seller passwd": cmd_seller_passwd,
    "seller set-daily-orders": cmd_seller_set_daily_orders,
    "seller show": cmd_seller_show,
    "buyer opt-out": _opt(True),
    "buyer opt-in": _opt(False),
    "order add": cmd_order_add,
    "relationship show": cmd_relationship_show,
    "archive list": cmd_archive_list,
    "archive show": cmd_archive_show,
    "archive export": cmd_archive_export,
    "archive verify": cmd_archive_verify,
    "archive hold": cmd_archive_hold,
    "archive release": cmd_archive_release,
    "archive holds": cmd_archive_holds,
    "purge": cmd_purge,
    "api-token add": cmd_api_token_add,
    "api-token revoke": cmd_api_token_revoke,
    "api-token list": cmd_api_token_list,
    "webhooks list": cmd_webhooks_list,
    "webhooks retry": cmd_webhooks_retry,
    "dkim keygen": cmd_dkim_keygen,
    "postfix-config": postfix.run,
    "report response-time": cmd_report_response_time,
}

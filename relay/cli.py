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

from relay import __version__, addresses, auth, config as config_module
from relay.config import Config, ConfigError
from relay.handler import daily_cap
from relay.store import StoreError, StoreUnavailable, iso, open_store

EXIT_FAILURE = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad arguments: exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage dump
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="relay", description="Aliasing mail proxy for marketplaces.")
    parser.add_argument("--config", metavar="PATH",
                        help="config file (default: $RELAY_CONFIG, else config/relay.toml)")
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    commands.add_parser("serve", help="run the listeners until SIGTERM/SIGINT")

    db = commands.add_parser("db", help="database maintenance")
    db_commands = db.add_subparsers(dest="db_command", metavar="COMMAND", parser_class=_Parser)
    db_commands.required = True
    db_commands.add_parser("upgrade", help="create or migrate the database")

    check = commands.add_parser("check-config", help="validate the config and print the effective settings")
    check.add_argument("--json", action="store_true")

    for role in ("seller", "buyer"):
        group = commands.add_parser(role, help=f"manage {role}s")
        sub = group.add_subparsers(dest=f"{role}_command", metavar="COMMAND", parser_class=_Parser)
        sub.required = True
        add = sub.add_parser("add", help=f"register a {role}")
        add.add_argument("email")
        add.add_argument("--name", default="", help="display name shown to the counterpart")
        add.add_argument("--json", action="store_true")
        if role == "seller":
            add.add_argument("--password-stdin", action="store_true",
                             help="read the submission password from standard input")
            add.add_argument("--daily-orders", type=int, metavar="N",
                             help="use N as the daily order volume of the sending cap")
            passwd = sub.add_parser("passwd", help="set the submission password (read from stdin)")
            passwd.add_argument("email")
            limits = sub.add_parser("set-daily-orders", help="override (or with 'auto', stop overriding) "
                                                             "the daily order volume of the cap")
            limits.add_argument("email")
            limits.add_argument("value", metavar="N|auto")
            show = sub.add_parser("show", help="the seller's cap, its use and its buyers' opt-outs")
            show.add_argument("email")
            show.add_argument("--json", action="store_true")
        else:
            for verb, text in (("opt-out", "refuse seller-initiated messages"),
                               ("opt-in", "accept seller-initiated messages again")):
                choice = sub.add_parser(verb, help=text)
                choice.add_argument("email")

    order = commands.add_parser("order", help="record orders")
    order_commands = order.add_subparsers(dest="order_command", metavar="COMMAND", parser_class=_Parser)
    order_commands.required = True
    order_add = order_commands.add_parser("add", help="record an order; creates the relationship on the first one")
    order_add.add_argument("order_id")
    order_add.add_argument("--seller", required=True, metavar="EMAIL")
    order_add.add_argument("--buyer", required=True, metavar="EMAIL")
    order_add.add_argument("--placed-at", metavar="ISO", help="when the order was placed (default: now)")
    order_add.add_argument("--json", action="store_true")

    relationship = commands.add_parser("relationship", help="inspect relationships")
    rel_commands = relationship.add_subparsers(dest="relationship_command", metavar="COMMAND",
                                               parser_class=_Parser)
    rel_commands.required = True
    show = rel_commands.add_parser("show", help="a pair, its aliases and its counts")
    show.add_argument("--seller", metavar="EMAIL")
    show.add_argument("--buyer", metavar="EMAIL")
    show.add_argument("--alias", metavar="ADDRESS")
    show.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
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
    except (StoreError, StoreUnavailable) as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE


def _command_name(args) -> str:
    sub = getattr(args, f"{args.command.replace('-', '_')}_command", None)
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
    from relay.server import serve

    asyncio.run(serve(config))
    return 0


def cmd_db_upgrade(args, config: Config) -> int:
    async def work():
        store = await open_store(config.database)
        try:
            return await store.upgrade(), await store.schema_version()
        finally:
            await store.close()

    applied, version = asyncio.run(work())
    if applied:
        print(f"database {config.database}: applied migration(s) {', '.join(map(str, applied))};"
              f" now at version {version}")
    else:
        print(f"database {config.database}: up to date at version {version}")
    return 0


def cmd_check_config(args, config: Config) -> int:
    settings = config_module.effective(config)
    if args.json:
        _print_json(settings)
        return 0
    for key, value in settings.items():
        if not isinstance(value, dict):
            print(f"{key} = {json.dumps(value)}")
    for section, values in settings.items():
        if isinstance(values, dict):
            print(f"\n[{section}]")
            for key, value in values.items():
                print(f"{key} = {json.dumps(value)}")
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
            _print_json({"id": party.id, "role": role, "address": party.address, "name": party.display_name})
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
    cap = daily_cap(policy, orders, seller.daily_orders)
    data = {
        "seller": seller.address,
        "name": seller.display_name,
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
        _print_json({**relationship.to_json(), "order": order_id, "created": created})
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
            return None, None
        return relationship, await store.relationship_stats(relationship.id)

    relationship, stats = asyncio.run(_with_store(config, work))
    if relationship is None:
        print("relay: no such relationship", file=sys.stderr)
        return EXIT_FAILURE
    data = {
        **relationship.to_json(),
        "seller_name": relationship.seller.display_name,
        "buyer_name": relationship.buyer.display_name,
        "orders": stats.orders,
        "messages": {"buyer_to_seller": stats.buyer_to_seller, "seller_to_buyer": stats.seller_to_buyer},
        "last_message_at": stats.last_message_at,
    }
    if args.json:
        _print_json(data)
    else:
        print(f"relationship {relationship.id} (since {relationship.created_at})")
        print(f"seller: {relationship.seller.address}  alias {relationship.seller_alias}")
        print(f"buyer:  {relationship.buyer.address}  alias {relationship.buyer_alias}")
        print(f"orders: {stats.orders}")
        print(f"messages delivered: buyer→seller {stats.buyer_to_seller}, seller→buyer {stats.seller_to_buyer}")
    return 0


COMMANDS = {
    "serve": cmd_serve,
    "db upgrade": cmd_db_upgrade,
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
}

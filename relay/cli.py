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
from datetime import datetime, timezone

from relay import __version__, addresses, config as config_module
from relay.config import Config, ConfigError
from relay.store import StoreError, StoreUnavailable, open_store

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


def _add_party(role: str):
    def command(args, config: Config) -> int:
        if not addresses.is_valid(args.email):
            raise UsageError(f"not an email address: {args.email!r}")
        if addresses.split(args.email)[1] == config.domain:
            raise UsageError(f"{args.email} is in the relay's own domain; give the {role}'s real address")
        party = asyncio.run(_with_store(config, lambda store: store.add_party(role, args.email, args.name)))
        if args.json:
            _print_json({"id": party.id, "role": role, "address": party.address, "name": party.display_name})
        else:
            print(f"{role} {party.address} registered")
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
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


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
    "order add": cmd_order_add,
    "relationship show": cmd_relationship_show,
}

"""Provisioning's answers, made once for the `relay` CLI's `--json` and the
HTTP API (relay/api.py) alike, in docs/cli.md's field names: a party, an
order, a relationship. The dispute side's are in relay/disputes.py.

A party appears under its role (`seller` is the seller's address,
`seller_name` its display name), so the JSON of a seller and a buyer never
shares a key that means two things; `party_id` is its number in the store.
"""

from __future__ import annotations


def party_json(party) -> dict:
    """`relay seller add`/`buyer add --json`, and the API's party answers."""
    out = {"party_id": party.id, party.role: party.address, f"{party.role}_name": party.display_name}
    if party.role == "seller":
        out["daily_orders_override"] = party.daily_orders
    else:
        out["opted_out"] = party.opted_out
    return out


def order_json(relationship, order: str, created: bool) -> dict:
    """`relay order add --json`, and the API's answer to an order: the
    relationship the order belongs to, with both aliases; `created` says
    whether the order made that relationship."""
    return {**relationship.to_json(), "order": order, "created": created}


async def relationship_json(store, relationship) -> dict:
    """`relay relationship show --json`, and the API's relationship answers:
    the pair, its aliases, and what it has carried."""
    stats = await store.relationship_stats(relationship.id)
    return {
        **relationship.to_json(),
        "seller_name": relationship.seller.display_name,
        "buyer_name": relationship.buyer.display_name,
        "orders": stats.orders,
        "messages": {"buyer_to_seller": stats.buyer_to_seller, "seller_to_buyer": stats.seller_to_buyer},
        "last_message_at": stats.last_message_at,
    }

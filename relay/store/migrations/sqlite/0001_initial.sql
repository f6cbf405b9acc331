-- The parties, their orders and relationships, the Message-ID map and the
-- archive. Addresses are stored normalised (lower-case, no brackets).

CREATE TABLE parties (
    id           INTEGER PRIMARY KEY,
    role         TEXT NOT NULL CHECK (role IN ('seller', 'buyer')),
    address      TEXT NOT NULL,
    display_name TEXT NOT NULL DEFAULT '',
    created_at   TEXT NOT NULL,
    UNIQUE (role, address)
);

CREATE TABLE relationships (
    id           INTEGER PRIMARY KEY,
    seller_id    INTEGER NOT NULL REFERENCES parties (id),
    buyer_id     INTEGER NOT NULL REFERENCES parties (id),
    seller_alias TEXT NOT NULL UNIQUE,   -- the buyer writes here
    buyer_alias  TEXT NOT NULL UNIQUE,   -- the seller writes here
    created_at   TEXT NOT NULL,
    UNIQUE (seller_id, buyer_id)
);

CREATE TABLE orders (
    id              INTEGER PRIMARY KEY,
    order_ref       TEXT NOT NULL UNIQUE,
    relationship_id INTEGER NOT NULL REFERENCES relationships (id),
    placed_at       TEXT NOT NULL,
    created_at      TEXT NOT NULL
);
CREATE INDEX orders_by_relationship ON orders (relationship_id, placed_at);

-- Append-only. row_sha256 covers the metadata, both body hashes and
-- prev_sha256 (the previous row's row_sha256), so an edited, deleted or
-- reordered row breaks the chain.
CREATE TABLE archive (
    id               INTEGER PRIMARY KEY,
    received_at      TEXT NOT NULL,
    relationship_id  INTEGER REFERENCES relationships (id),
    direction        TEXT CHECK (direction IN ('buyer_to_seller', 'seller_to_buyer')),
    client_address   TEXT NOT NULL,
    mail_from        TEXT NOT NULL,
    rcpt_to          TEXT NOT NULL,       -- JSON list, as the client gave it
    verdict          TEXT NOT NULL CHECK (verdict IN ('delivered', 'rejected', 'deferred', 'failed')),
    reply            TEXT NOT NULL,       -- the reply line the client saw
    changes          TEXT NOT NULL,       -- JSON list of what the relay changed and why
    raw              BLOB NOT NULL,
    delivered        BLOB,
    raw_sha256       TEXT NOT NULL,
    delivered_sha256 TEXT,
    prev_sha256      TEXT NOT NULL,
    row_sha256       TEXT NOT NULL
);
CREATE INDEX archive_by_relationship ON archive (relationship_id, id);

-- The relay's fresh Message-IDs and the ids the sender's client gave, kept
-- as long as the archive so that both sides thread.
CREATE TABLE message_ids (
    id              INTEGER PRIMARY KEY,
    relationship_id INTEGER NOT NULL REFERENCES relationships (id),
    sender_id       INTEGER NOT NULL REFERENCES parties (id),
    original_id     TEXT,
    relay_id        TEXT NOT NULL UNIQUE,
    archive_id      INTEGER NOT NULL REFERENCES archive (id),
    created_at      TEXT NOT NULL
);
CREATE INDEX message_ids_by_original ON message_ids (relationship_id, original_id);

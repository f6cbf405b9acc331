-- A store as relay's main (commit 1a9b79b) made it, frozen for the upgrade
-- test of issue 15 (tests/integration/test_store_upgrade.py): main's own
-- migration SQL for sqlite, versions 1 to 3, then its rows. Never edit.

CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL);
-- migration 1
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
INSERT INTO schema_migrations VALUES (1, '2024-01-01T00:00:00.000000Z');
-- migration 2
-- Sellers' submission passwords, the daily-cap override, buyers' opt-out,
-- and the log of seller messages that the daily cap counts.

ALTER TABLE parties ADD COLUMN password_hash TEXT;      -- scrypt, sellers only
ALTER TABLE parties ADD COLUMN daily_orders INTEGER;    -- overrides the order count for the cap
ALTER TABLE parties ADD COLUMN opted_out INTEGER NOT NULL DEFAULT 0;  -- buyers only

-- One row per seller message delivered; the cap counts rows in its window.
CREATE TABLE seller_sends (
    id         INTEGER PRIMARY KEY,
    seller_id  INTEGER NOT NULL REFERENCES parties (id),
    archive_id INTEGER NOT NULL REFERENCES archive (id),
    sent_at    TEXT NOT NULL
);
CREATE INDEX seller_sends_by_seller ON seller_sends (seller_id, sent_at);
CREATE INDEX orders_by_placed_at ON orders (placed_at);
INSERT INTO schema_migrations VALUES (2, '2024-01-01T00:00:00.000000Z');
-- migration 3
-- Dispute tools (issue 6): compressed bodies kept beside the chain,
-- retention by tombstones, holds, and the indexes `relay archive list` needs
-- at a million rows. docs/archive.md explains each choice.

-- Each purge run: when it ran and its cutoff. A tombstone names its run, so
-- `relay archive verify` can tell a purged row from one emptied by hand.
CREATE TABLE archive_purges (
    id      INTEGER PRIMARY KEY,
    ran_at  TEXT NOT NULL,
    cutoff  TEXT NOT NULL,           -- rows received before this were purged
    rows    INTEGER NOT NULL DEFAULT 0
);

-- How the row keeps its bodies: 'identity' (rows written before this
-- migration: raw/delivered inline, as received) or 'zstd' (in
-- archive_bodies, compressed; raw/delivered here are empty).
ALTER TABLE archive ADD COLUMN body_encoding TEXT NOT NULL DEFAULT 'identity'
    CHECK (body_encoding IN ('identity', 'zstd'));
ALTER TABLE archive ADD COLUMN raw_size INTEGER;          -- uncompressed; NULL: length(raw)
ALTER TABLE archive ADD COLUMN delivered_size INTEGER;    -- uncompressed; NULL: length(delivered)
-- The raw headers say Auto-Submitted (not "no") or Precedence bulk/junk/list:
-- such a message neither asks for nor gives an answer in the response-time
-- report. NULL: not yet known (rows written before this migration).
ALTER TABLE archive ADD COLUMN auto_reply INTEGER;
-- A tombstone: bodies and personal metadata cleared, hashes kept.
ALTER TABLE archive ADD COLUMN purged_at TEXT;
ALTER TABLE archive ADD COLUMN purge_id INTEGER REFERENCES archive_purges (id);

CREATE TABLE archive_bodies (
    archive_id INTEGER PRIMARY KEY REFERENCES archive (id),
    raw        BLOB NOT NULL,
    delivered  BLOB
);

-- Relationships under dispute: purge skips their rows until released.
CREATE TABLE archive_holds (
    relationship_id INTEGER PRIMARY KEY REFERENCES relationships (id),
    held_at         TEXT NOT NULL,
    reason          TEXT NOT NULL DEFAULT ''
);

-- `archive list --since/--until` and the response-time report.
CREATE INDEX archive_by_received_at ON archive (received_at);
-- `archive list --verdict V`, newest first, without a full scan or a sort.
CREATE INDEX archive_by_verdict ON archive (verdict, received_at);
-- The daily purge walks only live rows past retention, never the tombstones.
CREATE INDEX archive_live_by_received_at ON archive (received_at) WHERE purged_at IS NULL;
-- Purge removes a purged row's Message-ID map entry by archive id.
CREATE INDEX message_ids_by_archive ON message_ids (archive_id);
INSERT INTO schema_migrations VALUES (3, '2024-01-01T00:00:00.000000Z');
-- rows
INSERT INTO parties (id, role, address, display_name, created_at, password_hash, daily_orders, opted_out) VALUES (1, 'seller', 'sam@shop.example', 'Sam''s Shop', '2026-12-07T06:56:54.685424Z', 'scrypt$fixture', 7, 0);
INSERT INTO parties (id, role, address, display_name, created_at, password_hash, daily_orders, opted_out) VALUES (2, 'buyer', 'bea@mail.example', 'Bea', '2026-12-07T06:56:54.686108Z', NULL, NULL, 0);
INSERT INTO parties (id, role, address, display_name, created_at, password_hash, daily_orders, opted_out) VALUES (3, 'buyer', 'bob@mail.example', 'Bob', '2026-12-07T06:56:54.686714Z', NULL, NULL, 1);
INSERT INTO relationships (id, seller_id, buyer_id, seller_alias, buyer_alias, created_at) VALUES (1, 1, 2, '2236zxqpp46ixed6@marketplace.example', '2uhhn4jtf3uhkcnq@marketplace.example', '2026-12-07T06:56:54.688742Z');
INSERT INTO relationships (id, seller_id, buyer_id, seller_alias, buyer_alias, created_at) VALUES (2, 1, 3, 'jl7twokrebbhshr6@marketplace.example', 'fmcsqgwpkbaw6txf@marketplace.example', '2026-12-07T06:56:54.690578Z');
INSERT INTO orders (id, order_ref, relationship_id, placed_at, created_at) VALUES (1, 'O-1', 1, '2020-01-01T00:00:00.000000Z', '2026-12-07T06:56:54.688914Z');
INSERT INTO orders (id, order_ref, relationship_id, placed_at, created_at) VALUES (2, 'O-2', 2, '2020-01-02T00:00:00.000000Z', '2026-12-07T06:56:54.690691Z');
INSERT INTO orders (id, order_ref, relationship_id, placed_at, created_at) VALUES (3, 'O-3', 1, '2020-01-03T00:00:00.000000Z', '2026-12-07T06:56:54.692234Z');
INSERT INTO archive_purges (id, ran_at, cutoff, rows) VALUES (1, '2024-03-03T00:00:00.000000Z', '2021-01-01T00:00:00.000000Z', 2);
INSERT INTO archive (id, received_at, relationship_id, direction, client_address, mail_from, rcpt_to, verdict, reply, changes, raw, delivered, raw_sha256, delivered_sha256, prev_sha256, row_sha256, body_encoding, raw_size, delivered_size, auto_reply, purged_at, purge_id) VALUES (1, '2020-02-01T10:00:00.000000Z', 1, 'buyer_to_seller', '', '', '[]', 'delivered', '', '[]', X'', NULL, '3e7e8428f7f255d7be20a78e32c344bba9b394aae9ab6f683d0d7024158af50e', '23482e57ba89496e91ce10a34a8aaf87f1a114ad4f03e352fbc3384d0f3fba89', '0000000000000000000000000000000000000000000000000000000000000000', '66b7757abe3a224feb3094a0fc702bfb6b4294f1fc71a4733aa15d77f006c155', 'zstd', 71, 104, 0, '2024-03-03T00:00:00.000000Z', 1);
INSERT INTO archive (id, received_at, relationship_id, direction, client_address, mail_from, rcpt_to, verdict, reply, changes, raw, delivered, raw_sha256, delivered_sha256, prev_sha256, row_sha256, body_encoding, raw_size, delivered_size, auto_reply, purged_at, purge_id) VALUES (2, '2020-02-01T11:00:00.000000Z', 2, 'buyer_to_seller', '192.0.2.7', 'bea@mail.example', '["jl7twokrebbhshr6@marketplace.example"]', 'delivered', '250 2.0.0 OK', '["rewrote From"]', X'', NULL, '3c58377813226b89e5a30670ab8c1c3dcafcd14d0e9407faf91c9cd0344c2d56', 'e49d0b802d0532922ac9a53058aa4f13580ea60cdccc31de751e12341ecd8e4f', '66b7757abe3a224feb3094a0fc702bfb6b4294f1fc71a4733aa15d77f006c155', 'de490e7872c3d6a821ae239d0390f064859e679d982acf563497afd9445808d0', 'zstd', 71, 104, 0, NULL, NULL);
INSERT INTO archive (id, received_at, relationship_id, direction, client_address, mail_from, rcpt_to, verdict, reply, changes, raw, delivered, raw_sha256, delivered_sha256, prev_sha256, row_sha256, body_encoding, raw_size, delivered_size, auto_reply, purged_at, purge_id) VALUES (3, '2020-02-01T12:00:00.000000Z', 1, 'buyer_to_seller', '', '', '[]', 'rejected', '', '[]', X'', NULL, '67e81ec0a37364e98ce76f3a9f6b2540221f1aca94dd54ed6b2cc0f22cf9e28e', NULL, 'de490e7872c3d6a821ae239d0390f064859e679d982acf563497afd9445808d0', '3312e4fabe1a8d7265f8aa085b47403976e4b3a6680de7bd0be2b6fa5de7275f', 'zstd', 71, NULL, 0, '2024-03-03T00:00:00.000000Z', 1);
INSERT INTO archive (id, received_at, relationship_id, direction, client_address, mail_from, rcpt_to, verdict, reply, changes, raw, delivered, raw_sha256, delivered_sha256, prev_sha256, row_sha256, body_encoding, raw_size, delivered_size, auto_reply, purged_at, purge_id) VALUES (4, '2024-03-01T09:00:00.000000Z', 1, 'seller_to_buyer', '192.0.2.7', 'bea@mail.example', '["2236zxqpp46ixed6@marketplace.example"]', 'delivered', '250 2.0.0 OK', '["rewrote From"]', X'', NULL, 'eed936d9d107969282620442cbf2fcaa0838aa9eadb4832034cd3fb42f66fd49', '1db121e4f74e8776e6761f2ab215eaffc01c0bc86728435adbbeabf121178743', '3312e4fabe1a8d7265f8aa085b47403976e4b3a6680de7bd0be2b6fa5de7275f', '8cdb7d3130f6282ff0ffae64983853252b37f05bc3a944b93ad55a3edd0dd2f6', 'zstd', 71, 104, 0, NULL, NULL);
INSERT INTO archive (id, received_at, relationship_id, direction, client_address, mail_from, rcpt_to, verdict, reply, changes, raw, delivered, raw_sha256, delivered_sha256, prev_sha256, row_sha256, body_encoding, raw_size, delivered_size, auto_reply, purged_at, purge_id) VALUES (5, '2024-03-01T10:00:00.000000Z', 1, 'buyer_to_seller', '192.0.2.7', 'bea@mail.example', '["2236zxqpp46ixed6@marketplace.example"]', 'delivered', '250 2.0.0 OK', '["rewrote From"]', X'', NULL, '334d51ae9341f5fdc93dd94251b6a48f7aea98d601d7b36e61f886f014adc45a', 'c13e8f5a67a8514892f8c3fbcbc3df6981782d8209c14c080f1c056803de8b3e', '8cdb7d3130f6282ff0ffae64983853252b37f05bc3a944b93ad55a3edd0dd2f6', '0351a25757212cd625babd709d22439abaeb4e2fb42a02b85d45fda75895a45e', 'zstd', 49, 82, 1, NULL, NULL);
INSERT INTO archive_bodies (archive_id, raw, delivered) VALUES (2, X'28b52ffd204739020046726f6d3a207840790d0a5375626a6563743a206e320d0a4d6573736167652d49443a203c6f32406d61696c2e6578616d706c653e0d0a0d0a426f6479203220636166c3a90d0a', X'28b52ffd20686d0100240246726f6d3a20666d6373716777706b62617736747866406d61726b6574706c61636502005b430201447802');
INSERT INTO archive_bodies (archive_id, raw, delivered) VALUES (4, X'28b52ffd204739020046726f6d3a207840790d0a5375626a6563743a206e340d0a4d6573736167652d49443a203c6f34406d61696c2e6578616d706c653e0d0a0d0a426f6479203420636166c3a90d0a', X'28b52ffd20686d0100240246726f6d3a20327568686e346a74663375686b636e71406d61726b6574706c61636502005b430201447802');
INSERT INTO archive_bodies (archive_id, raw, delivered) VALUES (5, X'28b52ffd203189010046726f6d3a207840790d0a4175746f2d5375626d69747465643a206175746f2d7265706c6965640d0a0d0a617761790d0a', X'28b52ffd2052950100a40246726f6d3a20327568686e346a74663375686b636e71406d61726b6574706c6163652e6578616d706c6501005a95a10c');
INSERT INTO message_ids (id, relationship_id, sender_id, original_id, relay_id, archive_id, created_at) VALUES (2, 2, 3, '<o2@mail.example>', '<r2@marketplace.example>', 2, '2020-02-01T11:00:00.000000Z');
INSERT INTO message_ids (id, relationship_id, sender_id, original_id, relay_id, archive_id, created_at) VALUES (3, 1, 1, '<o4@mail.example>', '<r4@marketplace.example>', 4, '2024-03-01T09:00:00.000000Z');
INSERT INTO message_ids (id, relationship_id, sender_id, original_id, relay_id, archive_id, created_at) VALUES (4, 1, 2, '<o5@mail.example>', '<r5@marketplace.example>', 5, '2024-03-01T10:00:00.000000Z');
INSERT INTO seller_sends (id, seller_id, archive_id, sent_at) VALUES (1, 1, 4, '2024-03-01T09:00:00.000000Z');
INSERT INTO archive_holds (relationship_id, held_at, reason) VALUES (2, '2024-03-02T00:00:00.000000Z', 'case 15');

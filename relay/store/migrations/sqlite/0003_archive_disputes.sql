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

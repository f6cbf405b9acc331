-- Delivery reports that came back to a VERP bounce address, each tied to
-- the message that bounced. Kept as long as the archive.

CREATE TABLE bounces (
    id               INTEGER PRIMARY KEY,
    received_at      TEXT NOT NULL,
    relay_message_id TEXT NOT NULL,       -- the relay's Message-ID of the bounced message
    archive_id       INTEGER REFERENCES archive (id),
    relationship_id  INTEGER REFERENCES relationships (id),
    action           TEXT NOT NULL,       -- failed, delayed, … or 'none' when no DSN
    status           TEXT NOT NULL,       -- RFC 3463 code, or ''
    notified         INTEGER NOT NULL DEFAULT 0,
    raw              BLOB NOT NULL
);
CREATE INDEX bounces_by_archive ON bounces (archive_id);

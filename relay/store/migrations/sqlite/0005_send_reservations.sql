-- The daily cap across processes and nodes (issue 9): a seller message
-- takes its place in seller_sends *before* it is forwarded, as a row without
-- an archive id (a reservation, `store.reserve_send()`); archiving the
-- delivered message fills in the id, anything else deletes the row. So
-- archive_id becomes nullable. SQLite cannot drop a NOT NULL in place: the
-- table is rebuilt, ids kept.

CREATE TABLE seller_sends_new (
    id         INTEGER PRIMARY KEY,
    seller_id  INTEGER NOT NULL REFERENCES parties (id),
    archive_id INTEGER REFERENCES archive (id),   -- NULL: reserved, being forwarded now
    sent_at    TEXT NOT NULL
);
INSERT INTO seller_sends_new (id, seller_id, archive_id, sent_at)
    SELECT id, seller_id, archive_id, sent_at FROM seller_sends;
DROP TABLE seller_sends;
ALTER TABLE seller_sends_new RENAME TO seller_sends;
CREATE INDEX seller_sends_by_seller ON seller_sends (seller_id, sent_at);

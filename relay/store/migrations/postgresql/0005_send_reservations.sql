-- The daily cap across nodes (issue 9): a seller message takes its place in
-- seller_sends *before* it is forwarded, as a row without an archive id (a
-- reservation, `store.reserve_send()`, serialized per seller by an advisory
-- lock); archiving the delivered message fills in the id, anything else
-- deletes the row.

ALTER TABLE seller_sends ALTER COLUMN archive_id DROP NOT NULL;

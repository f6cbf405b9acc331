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

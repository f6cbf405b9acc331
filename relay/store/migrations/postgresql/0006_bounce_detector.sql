-- Which reader understood a delivery report: 'rfc3464' for a DSN's own
-- message/delivery-status part, else the name of the flufl.bounce detector
-- that recognised a plain-text bounce (qmail, exim, yahoo, …), or '' when
-- nothing did. Reports recorded before this migration were all RFC 3464.
ALTER TABLE bounces ADD COLUMN detector TEXT NOT NULL DEFAULT 'rfc3464';

-- Relay workers claim the deliveries of a job with a lease (owner + expiry) instead of
-- holding a row lock through a whole SMTP session: a killed worker's claim simply expires.
ALTER TABLE deliveries ADD COLUMN lease_owner text;
ALTER TABLE deliveries ADD COLUMN lease_until timestamptz;
-- The scheduler's scan: deferred remote deliveries that are due.
CREATE INDEX deliveries_deferred_due ON deliveries (next_attempt_at) WHERE state = 'deferred';

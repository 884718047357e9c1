-- A queued local delivery may lose its account: accounts.id is referenced ON DELETE SET NULL so
-- that removing an account leaves its mail's history, and the MDA bounces such a delivery
-- (550 5.1.1, a DSN to the sender). The check that a queued local delivery has an account made
-- that SET NULL fail instead, so an account with any mail still queued for it (arriving while it
-- is removed, or waiting for a stopped MDA) could not be removed at all.
ALTER TABLE deliveries DROP CONSTRAINT deliveries_check;

-- A relay worker's claim sets lease_owner and lease_until on each delivery it takes. With an
-- index on lease_until that update could never be HOT: every claim wrote a new entry into every
-- index of deliveries. Without it (and with fillfactor 70, see 070) a claim is one heap tuple.
-- The scheduler's search for expired leases (a dead worker's deliveries, every
-- RELAY_SCHEDULER_INTERVAL) now reads the pending rows through deliveries_pending instead: they
-- are the active queue, and a lease that expires is rare.
DROP INDEX deliveries_lease_until;

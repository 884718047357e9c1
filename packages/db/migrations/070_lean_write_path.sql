-- Fewer writes per message on the accept -> mailbox path. Each local delivery row is written
-- three times (insert, dispatch stamp, final state), and every version that is not a HOT update
-- adds an entry to every index whose predicate it matches; each message row was written twice
-- (insert, then the MDA's parsed summary) with its body moved to TOAST (three chunk rows and
-- their index entries for 4 KiB).

-- UNIQUE (message_id, final_recipient) already serves lookups by message_id.
DROP INDEX deliveries_message;
-- The scheduler reads deliveries_deferred_due and deliveries_lease_until; nothing read this one.
DROP INDEX deliveries_due;
-- The queue views and the sweeper only look at pending rows: one partial index for both,
-- which a delivered or bounced row leaves.
DROP INDEX deliveries_state_domain;
DROP INDEX deliveries_undispatched;
CREATE INDEX deliveries_pending ON deliveries (state, id) WHERE state IN ('queued', 'deferred');
-- Room on each page so the dispatch stamp (no indexed column changes) can be a HOT update.
ALTER TABLE deliveries SET (fillfactor = 70);

-- The MDA's parsed summary gets a table of its own: storing it is one insert instead of a
-- second version of the message row.
CREATE TABLE message_parsed (
  message_id bigint PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
  parsed     jsonb NOT NULL
);
INSERT INTO message_parsed (message_id, parsed) SELECT id, parsed FROM messages WHERE parsed IS NOT NULL;
ALTER TABLE messages DROP COLUMN parsed;

-- A message row up to a page (about 8 KB with its body) stays in the heap instead of TOAST.
-- Larger bodies still go out of line uncompressed (STORAGE EXTERNAL, see 030), so slices stay cheap.
ALTER TABLE messages SET (toast_tuple_target = 8160);

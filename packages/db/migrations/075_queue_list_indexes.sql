-- The admin queue list (`listQueue`: `WHERE state = $s AND id > $after [AND remote_domain = $d]
-- ORDER BY id LIMIT n`) reads each state as a range of an index in id order, so a page reads
-- about a page of rows however large deliveries grows. The waiting states have had one since
-- 070 (deliveries_pending). Without these, a page of bounced or cancelled deliveries walked the
-- primary key past every delivered row, and a domain filter was checked row by row.
--
-- Delivered rows are left out of deliveries_bounced_cancelled: on any large table they are most
-- rows, and there the planner walks the primary key for a page of them, which reads about as
-- few rows as an index range would (packages/queue/test/list-plan.test.ts shows the plans). So a
-- delivery that succeeds adds no entry to it; one that bounces or is cancelled adds one.
--
-- deliveries_domain holds remote deliveries only (local ones have no remote_domain): one entry
-- per row version whose state changes, so a remote delivery adds two on its way (its insert, its
-- final update) and one per deferral; those updates are new row versions anyway (state is
-- indexed by deliveries_pending). No column of either index changes in the dispatch stamp or the
-- relay's claim, so those stay HOT updates.
CREATE INDEX deliveries_bounced_cancelled ON deliveries (state, id) WHERE state IN ('bounced', 'cancelled');
CREATE INDEX deliveries_domain ON deliveries (remote_domain, state, id) WHERE remote_domain IS NOT NULL;

-- The scheduler also looks for deliveries whose relay worker's lease ran out (a killed worker).
CREATE INDEX deliveries_lease_until ON deliveries (lease_until) WHERE lease_until IS NOT NULL;

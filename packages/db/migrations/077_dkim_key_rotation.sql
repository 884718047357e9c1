-- A DKIM key rotates in two steps: the new key waits here (pending) while its TXT record is
-- published, and the msa keeps signing with the current key until the operator activates it.
-- Signing at once with a key whose record is not in DNS yet would fail DKIM at every receiver.
ALTER TABLE domains
  ADD COLUMN dkim_pending_selector text,
  ADD COLUMN dkim_pending_algorithm text CHECK (dkim_pending_algorithm IN ('rsa-sha256', 'ed25519-sha256')),
  ADD COLUMN dkim_pending_private_key text,
  ADD CONSTRAINT domains_dkim_pending_complete
    CHECK ((dkim_pending_selector IS NULL) = (dkim_pending_private_key IS NULL)),
  -- Only a domain with a current key has a pending one (a first key is current at once), and
  -- two records under one name would be one record in DNS: the pending key needs a selector of its own.
  ADD CONSTRAINT domains_dkim_pending_replaces_current
    CHECK (dkim_pending_selector IS NULL OR (dkim_selector IS NOT NULL AND dkim_pending_selector <> dkim_selector));

-- Per-account filter rules, applied by the MDA at delivery in ascending position order; the
-- first rule whose condition matches decides what happens to the copy.
CREATE TABLE filter_rules (
  id           bigserial PRIMARY KEY,
  account_id   bigint NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
  position     integer NOT NULL CHECK (position >= 0),
  -- header: header_name + op (contains | is | exists) + value; size: op (over | under) + size_bytes.
  condition    text NOT NULL CHECK (condition IN ('header', 'size')),
  header_name  text CHECK (header_name IS NULL OR header_name = lower(header_name)),
  op           text NOT NULL CHECK (op IN ('contains', 'is', 'exists', 'over', 'under')),
  value        text,
  size_bytes   bigint CHECK (size_bytes IS NULL OR size_bytes >= 0),
  action       text NOT NULL CHECK (action IN ('fileinto', 'discard', 'forward')),
  folder       text,
  forward_to   text,
  -- For forward: also file a copy into the INBOX.
  keep_copy    boolean NOT NULL DEFAULT false,
  created_at   timestamptz NOT NULL DEFAULT now(),
  UNIQUE (account_id, position),
  CHECK (condition <> 'header' OR (header_name IS NOT NULL AND op IN ('contains', 'is', 'exists') AND (op = 'exists' OR value IS NOT NULL))),
  CHECK (condition <> 'size' OR (op IN ('over', 'under') AND size_bytes IS NOT NULL)),
  CHECK (action <> 'fileinto' OR (folder IS NOT NULL AND folder <> '')),
  CHECK (action <> 'forward' OR forward_to IS NOT NULL)
);
CREATE INDEX filter_rules_account ON filter_rules (account_id, position);

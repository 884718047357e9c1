-- Bearer tokens for the admin API. Only the sha256 of a token is stored: tokens are 256-bit
-- random values, so a fast hash is enough and a leaked table does not leak usable tokens.
CREATE TABLE api_tokens (
  id           bigserial PRIMARY KEY,
  name         text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'),
  token_hash   bytea NOT NULL UNIQUE,
  -- NULL: an operator token that sees everything; otherwise the one domain (tenant) it may see and change.
  domain       text CHECK (domain IS NULL OR domain = lower(domain)),
  created_at   timestamptz NOT NULL DEFAULT now(),
  last_used_at timestamptz,
  revoked_at   timestamptz
);

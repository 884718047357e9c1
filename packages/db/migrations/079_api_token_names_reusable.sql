-- A token name is unique among active tokens only: after `mailctl token revoke ci` an operator can
-- create a new "ci" token (revoked rows stay for the record, as `token list` shows them).
ALTER TABLE api_tokens DROP CONSTRAINT api_tokens_name_key;
CREATE UNIQUE INDEX api_tokens_active_name ON api_tokens (name) WHERE revoked_at IS NULL;

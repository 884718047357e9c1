-- Submission (services/msa): what each account sent, in fixed time windows, for the per-account
-- message and recipient limits. Kept in PostgreSQL so every msa replica sees the same counts.
-- (Failed logins use auth_failures from 030, shared with POP3, so a guesser cannot spread
-- attempts across protocols.)

CREATE TABLE submission_counters (
  account_id   bigint NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
  window_start timestamptz NOT NULL,
  messages     integer NOT NULL DEFAULT 0,
  recipients   integer NOT NULL DEFAULT 0,
  PRIMARY KEY (account_id, window_start)
);
CREATE INDEX submission_counters_window ON submission_counters (window_start);

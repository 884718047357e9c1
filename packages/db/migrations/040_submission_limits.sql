-- Submission (services/msa): failed-login counters per client IP and per account, and what each
-- account sent, in fixed time windows. Kept in PostgreSQL so every msa replica sees the same counts.

CREATE TABLE auth_failures (
  scope        text NOT NULL CHECK (scope IN ('ip', 'account')),
  key          text NOT NULL,
  window_start timestamptz NOT NULL,
  failures     integer NOT NULL DEFAULT 0,
  PRIMARY KEY (scope, key, window_start)
);
CREATE INDEX auth_failures_window ON auth_failures (window_start);

CREATE TABLE submission_counters (
  account_id   bigint NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
  window_start timestamptz NOT NULL,
  messages     integer NOT NULL DEFAULT 0,
  recipients   integer NOT NULL DEFAULT 0,
  PRIMARY KEY (account_id, window_start)
);
CREATE INDEX submission_counters_window ON submission_counters (window_start);

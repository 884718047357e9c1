-- POP3: sizes as RETR sends them, failed-login throttling, POP-before-SMTP.

-- The octet count of messages.raw as POP3 sends it (bare LF made CRLF, a final CRLF added when
-- missing; before byte-stuffing). Computed once per message by the POP3 service: raw never changes.
CREATE TABLE pop3_message_sizes (
  message_id bigint PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
  size       bigint NOT NULL CHECK (size >= 0)
);

-- Failed authentications per scope ('ip' or 'account') and key, in a fixed window; shared by every
-- replica so a guesser cannot spread attempts across them.
CREATE TABLE auth_failures (
  scope        text NOT NULL,
  key          text NOT NULL,
  window_start timestamptz NOT NULL DEFAULT now(),
  failures     integer NOT NULL DEFAULT 0,
  PRIMARY KEY (scope, key)
);

-- POP-before-SMTP: the last successful POP3 login per client IP (written only when POP_BEFORE_SMTP is on).
CREATE TABLE pop_logins (
  ip         inet PRIMARY KEY,
  account_id bigint NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
  at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX pop_logins_at ON pop_logins (at);

-- POP3 (and any reader) streams large messages with substring(raw FROM x FOR n). On a compressed
-- value each slice decompresses everything before it (quadratic in the message size); stored
-- uncompressed out of line, a slice reads only its own TOAST chunks. Applies to rows written from now on.
ALTER TABLE messages ALTER COLUMN raw SET STORAGE EXTERNAL;

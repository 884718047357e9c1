-- The core schema: the directory (domains, accounts, aliases), the queue (messages,
-- deliveries), mailboxes and the journey. Every state a message or delivery can be in is a row.

CREATE TABLE domains (
  id            bigserial PRIMARY KEY,
  name          text NOT NULL UNIQUE CHECK (name = lower(name) AND name <> ''),
  dkim_selector text,
  dkim_algorithm text CHECK (dkim_algorithm IN ('rsa-sha256', 'ed25519-sha256')),
  dkim_private_key text,
  -- What the inbound MTA does with mail failing DMARC whose policy is reject: 'reject' (550) or 'quarantine' (Junk).
  dmarc_reject_action text NOT NULL DEFAULT 'reject' CHECK (dmarc_reject_action IN ('reject', 'quarantine', 'accept')),
  created_at    timestamptz NOT NULL DEFAULT now(),
  CHECK ((dkim_selector IS NULL) = (dkim_private_key IS NULL))
);

CREATE TABLE accounts (
  id            bigserial PRIMARY KEY,
  domain_id     bigint NOT NULL REFERENCES domains(id) ON DELETE RESTRICT,
  local_part    text NOT NULL CHECK (local_part = lower(local_part) AND local_part <> ''),
  address       text NOT NULL UNIQUE CHECK (address = lower(address)),
  password_hash text NOT NULL,
  -- The shared secret APOP needs in clear; NULL means APOP is refused for this account.
  apop_secret   text,
  quota_bytes   bigint CHECK (quota_bytes IS NULL OR quota_bytes >= 0),
  used_bytes    bigint NOT NULL DEFAULT 0 CHECK (used_bytes >= 0),
  disabled      boolean NOT NULL DEFAULT false,
  created_at    timestamptz NOT NULL DEFAULT now(),
  UNIQUE (domain_id, local_part)
);

CREATE TABLE aliases (
  id          bigserial PRIMARY KEY,
  domain_id   bigint NOT NULL REFERENCES domains(id) ON DELETE RESTRICT,
  -- '*' is the domain's catch-all.
  local_part  text NOT NULL CHECK (local_part = lower(local_part) AND local_part <> ''),
  address     text NOT NULL UNIQUE CHECK (address = lower(address)),
  targets     text[] NOT NULL CHECK (cardinality(targets) > 0),
  created_at  timestamptz NOT NULL DEFAULT now(),
  UNIQUE (domain_id, local_part)
);

CREATE TABLE messages (
  id             bigserial PRIMARY KEY,
  -- A short public id, shown in Received: headers, replies and the admin tools.
  queue_id       text NOT NULL UNIQUE,
  raw            bytea NOT NULL,
  size           bigint NOT NULL CHECK (size >= 0),
  -- '' is the null reverse-path <>.
  envelope_from  text NOT NULL,
  source         text NOT NULL CHECK (source IN ('inbound', 'submission', 'lmtp', 'bounce', 'import', 'forward')),
  client_ip      text,
  client_helo    text,
  auth_user      text,
  message_id_header text,
  auth_results   jsonb,
  dsn_envid      text,
  dsn_ret        text CHECK (dsn_ret IN ('FULL', 'HDRS')),
  trace_id       text,
  -- What the MDA parsed once (subject, from, to, date, MIME structure...).
  parsed         jsonb,
  received_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX messages_message_id_header ON messages (message_id_header);
CREATE INDEX messages_received_at ON messages (received_at);

CREATE TABLE deliveries (
  id              bigserial PRIMARY KEY,
  message_id      bigint NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
  -- The RCPT TO address as the client gave it (the DSN's Original-Recipient unless ORCPT says otherwise).
  recipient       text NOT NULL,
  -- The address this delivery goes to after alias expansion: an account's address or a remote address.
  final_recipient text NOT NULL,
  kind            text NOT NULL CHECK (kind IN ('local', 'remote')),
  account_id      bigint REFERENCES accounts(id) ON DELETE SET NULL,
  remote_domain   text,
  folder          text NOT NULL DEFAULT 'INBOX',
  state           text NOT NULL DEFAULT 'queued'
                  CHECK (state IN ('queued', 'deferred', 'delivered', 'bounced', 'cancelled')),
  attempts        integer NOT NULL DEFAULT 0,
  next_attempt_at timestamptz,
  last_attempt_at timestamptz,
  last_reply      text,
  last_status     text,
  remote_mta      text,
  dispatched_at   timestamptz,
  dsn_notify      text[],
  dsn_orcpt       text,
  -- Bounce bookkeeping: 'pending' until a DSN is generated for this failed or delayed delivery.
  dsn_state       text CHECK (dsn_state IN ('pending', 'sent', 'suppressed')),
  delay_notified_at timestamptz,
  created_at      timestamptz NOT NULL DEFAULT now(),
  updated_at      timestamptz NOT NULL DEFAULT now(),
  UNIQUE (message_id, final_recipient),
  CHECK (kind = 'remote' OR state <> 'queued' OR account_id IS NOT NULL),
  CHECK (kind = 'local' OR remote_domain IS NOT NULL)
);
CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE state IN ('queued', 'deferred');
CREATE INDEX deliveries_undispatched ON deliveries (created_at) WHERE state = 'queued';
CREATE INDEX deliveries_message ON deliveries (message_id);
CREATE INDEX deliveries_state_domain ON deliveries (state, remote_domain);
CREATE INDEX deliveries_dsn_pending ON deliveries (message_id) WHERE dsn_state = 'pending';

-- UID allocation per folder (RFC 3501-style UIDs, also POP3's UIDL source).
CREATE TABLE folders (
  account_id   bigint NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
  name         text NOT NULL,
  uid_validity bigint NOT NULL DEFAULT (extract(epoch FROM now())::bigint),
  uid_next     bigint NOT NULL DEFAULT 1,
  PRIMARY KEY (account_id, name)
);

CREATE TABLE mailbox_entries (
  id          bigserial PRIMARY KEY,
  account_id  bigint NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
  folder      text NOT NULL DEFAULT 'INBOX',
  uid         bigint NOT NULL,
  message_id  bigint NOT NULL REFERENCES messages(id) ON DELETE RESTRICT,
  -- One entry per delivery: the MDA's idempotency key.
  delivery_id bigint UNIQUE REFERENCES deliveries(id) ON DELETE SET NULL,
  -- Per-recipient header lines added at delivery (Return-Path:, Delivered-To:), CRLF-terminated;
  -- the mailbox copy of the message is header_prefix followed by messages.raw.
  header_prefix bytea NOT NULL DEFAULT ''::bytea,
  size        bigint NOT NULL CHECK (size >= 0),
  flags       text[] NOT NULL DEFAULT '{}',
  deleted     boolean NOT NULL DEFAULT false,
  created_at  timestamptz NOT NULL DEFAULT now(),
  UNIQUE (account_id, folder, uid),
  FOREIGN KEY (account_id, folder) REFERENCES folders(account_id, name) ON DELETE CASCADE
);
CREATE INDEX mailbox_entries_message ON mailbox_entries (message_id);

CREATE TABLE delivery_events (
  id          bigserial PRIMARY KEY,
  message_id  bigint NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
  delivery_id bigint REFERENCES deliveries(id) ON DELETE CASCADE,
  event       text NOT NULL CHECK (event IN ('accepted', 'dispatched', 'attempt', 'delivered', 'deferred',
                                             'bounced', 'delayed', 'retrieved', 'filtered', 'discarded',
                                             'forwarded', 'retry', 'cancelled', 'expired')),
  service     text NOT NULL,
  reply       text,
  detail      jsonb,
  created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX delivery_events_message ON delivery_events (message_id, id);
CREATE INDEX delivery_events_delivery ON delivery_events (delivery_id, id);

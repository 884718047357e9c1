import type { Bus } from "@mailstack/bus";
import { resolveRecipient, type FilterRuleRow, type Pool, type PoolClient } from "@mailstack/db";
import { FINAL_STATES, dispatchAccepted, insertMessage, recordEvents, stillPending, type AcceptedMessage, type JourneyEvent } from "@mailstack/queue";
import { currentTraceId, logText, mailMetrics, type Logger } from "@mailstack/telemetry";
import { decide, type Decision } from "./filters.ts";
import { mdaMetrics } from "./metrics.ts";
import { parseMessage, type ParsedMessage } from "./parse.ts";

export const SERVICE = "mda";

export interface DeliverContext {
  pool: Pool;
  logger: Logger;
  /** Needed to dispatch a forwarded copy right after commit; without it the sweeper dispatches it. */
  bus?: Bus;
}

export interface DeliverOptions {
  /**
   * The client is told the result (LMTP) and produces its own bounce: a failure then gets
   * dsn_state 'suppressed' instead of 'pending'.
   */
  failureReported?: boolean;
  /**
   * With failureReported: a full mailbox is a temporary failure (452 4.2.2) that the client
   * retries, as Dovecot's quota_full_tempfail; this copy is then cancelled, not bounced.
   */
  quotaFullTempfail?: boolean;
}

export type Outcome =
  | { status: "missing" }
  | { status: "duplicate"; state: string }
  | { status: "delivered"; folder: string; uid: number; forwardedTo?: string }
  | { status: "discarded"; ruleId: number }
  | { status: "forwarded"; to: string; messageId: number }
  | { status: "bounced"; code: number; enhanced: string; text: string }
  | { status: "tempfail"; code: number; enhanced: string; text: string };

export interface Row {
  id: number;
  message_id: number;
  queue_id: string;
  state: string;
  attempts: number;
  kind: "local" | "remote";
  account_id: number | null;
  final_recipient: string;
  folder: string;
  dsn_notify: string[] | null;
  envelope_from: string;
  message_size: number;
  trace_id: string | null;
  trace_span_id: string | null;
  received_at: Date;
  parsed: ParsedMessage | null;
  address: string | null;
  disabled: boolean | null;
  rules: FilterRuleRow[];
}

/** Header lines only ever carry printable text: anything else in an address is dropped. */
function headerSafe(text: string): string {
  return text.replace(/[\x00-\x1f\x7f]/g, "");
}

/** The per-recipient trace lines prepended to the stored message (RFC 5321 §4.4; Delivered-To as Postfix writes it). */
export function headerPrefix(envelopeFrom: string, finalRecipient: string): Buffer {
  return Buffer.from(`Return-Path: <${headerSafe(envelopeFrom)}>\r\nDelivered-To: ${headerSafe(finalRecipient)}\r\n`, "utf8");
}

/**
 * A filed copy whose sender asked to be told of success (NOTIFY=SUCCESS, RFC 3461 5.2.2): we are
 * the final MTA, so the "delivered" notice is ours (dsn_state 'pending', sent by the DSN
 * generator). Never to <>. Such copies take the one-by-one path, which records it.
 */
export function wantsSuccessNotice(row: Pick<Row, "dsn_notify" | "envelope_from">): boolean {
  return row.envelope_from !== "" && (row.dsn_notify ?? []).some((n) => n.toUpperCase() === "SUCCESS");
}

/** DSN bookkeeping for a failed delivery: no bounce to <>, none when NOTIFY excludes FAILURE, none when the client was told. */
function dsnStateFor(row: Row, options: DeliverOptions): "pending" | "suppressed" {
  if (options.failureReported || row.envelope_from === "") return "suppressed";
  const notify = (row.dsn_notify ?? []).map((n) => n.toUpperCase());
  if (notify.length > 0 && (notify.includes("NEVER") || !notify.includes("FAILURE"))) return "suppressed";
  return "pending";
}

async function bounce(client: PoolClient, row: Row, options: DeliverOptions, code: number, enhanced: string, text: string): Promise<Outcome> {
  const reply = `${code} ${enhanced} ${text}`;
  await client.query(
    `UPDATE deliveries SET state = 'bounced', attempts = attempts + 1, last_attempt_at = now(), next_attempt_at = NULL,
            last_status = $2, last_reply = $3, dsn_state = $4, updated_at = now()
      WHERE id = $1`,
    [row.id, enhanced, reply, dsnStateFor(row, options)],
  );
  await recordEvents(client, [{ messageId: row.message_id, deliveryId: row.id, event: "bounced", service: SERVICE, reply, detail: { recipient: row.final_recipient } }]);
  return { status: "bounced", code, enhanced, text };
}

/** A temporary failure told to the client, which retries: this copy ends here, without a DSN. */
async function tempfail(client: PoolClient, row: Row, code: number, enhanced: string, text: string): Promise<Outcome> {
  const reply = `${code} ${enhanced} ${text}`;
  await client.query(
    `UPDATE deliveries SET state = 'cancelled', attempts = attempts + 1, last_attempt_at = now(), next_attempt_at = NULL,
            last_status = $2, last_reply = $3, dsn_state = NULL, updated_at = now()
      WHERE id = $1`,
    [row.id, enhanced, reply],
  );
  await recordEvents(client, [{ messageId: row.message_id, deliveryId: row.id, event: "deferred", service: SERVICE, reply, detail: { recipient: row.final_recipient, retriedBy: "client" } }]);
  return { status: "tempfail", code, enhanced, text };
}

interface Filed {
  ok: boolean;
  folder: string;
  uid: number;
}

/** Quota check and increment in one statement, then the next UID of the folder, then the entry. */
async function fileCopy(client: PoolClient, row: Row, folder: string): Promise<Filed> {
  const prefix = headerPrefix(row.envelope_from, row.final_recipient);
  const size = prefix.length + row.message_size;
  const quota = await client.query(
    `UPDATE accounts SET used_bytes = used_bytes + $2
      WHERE id = $1 AND (quota_bytes IS NULL OR used_bytes + $2 <= quota_bytes) RETURNING id`,
    [row.account_id, size],
  );
  if (!quota.rowCount) return { ok: false, folder, uid: 0 };
  const uid = await client.query<{ uid: number }>(
    `INSERT INTO folders (account_id, name, uid_next) VALUES ($1, $2, 2)
     ON CONFLICT (account_id, name) DO UPDATE SET uid_next = folders.uid_next + 1
     RETURNING uid_next - 1 AS uid`,
    [row.account_id, folder],
  );
  await client.query(
    `INSERT INTO mailbox_entries (account_id, folder, uid, message_id, delivery_id, header_prefix, size)
     VALUES ($1, $2, $3, $4, $5, $6, $7)`,
    [row.account_id, folder, uid.rows[0]!.uid, row.message_id, row.id, prefix, size],
  );
  return { ok: true, folder, uid: uid.rows[0]!.uid };
}

/** dsnState 'pending' asks the DSN generator for a "delivered" notice (wantsSuccessNotice). */
async function markDelivered(client: PoolClient, row: Row, folder: string, reply: string, events: JourneyEvent[], dsnState: "pending" | null = null): Promise<void> {
  await client.query(
    `UPDATE deliveries SET state = 'delivered', folder = $2, attempts = attempts + 1, last_attempt_at = now(),
            next_attempt_at = NULL, last_status = '2.0.0', last_reply = $3, dsn_state = $4, updated_at = now()
      WHERE id = $1`,
    [row.id, folder, reply, dsnState],
  );
  await recordEvents(client, events);
}

/**
 * True when the message is a bounce (from <>) of a copy this account's forward rule sent: ours
 * or the remote's, its returned message (or header) carries the Delivered-To line createForward
 * put on that copy. Forwarding it would send it to the very target that failed: it would be lost.
 */
async function bouncesOwnForward(client: PoolClient, row: Row): Promise<boolean> {
  if (row.envelope_from !== "") return false;
  const raw = await client.query<{ raw: Buffer }>("SELECT raw FROM messages WHERE id = $1", [row.message_id]);
  const line = `\r\ndelivered-to: ${headerSafe(row.address!).toLowerCase()}\r\n`;
  return raw.rows[0]!.raw.toString("latin1").toLowerCase().includes(line);
}

/**
 * Creates the forwarded copy as a new message (source 'forward') in the same transaction.
 * The envelope sender becomes the forwarding account (so a bounce of the copy goes to it,
 * and SPF checks at the destination see our domain); a bounce (<>) stays <> so it cannot loop.
 * The copy keeps the original's trace and accepting span, so its retries and bounces stay in that journey.
 */
async function createForward(client: PoolClient, row: Row, to: string): Promise<AcceptedMessage | string> {
  const route = await resolveRecipient(client, to, { allowRemote: true });
  if (!route.ok) return `forward target refused: ${route.reason}`;
  const raw = await client.query<{ raw: Buffer }>("SELECT raw FROM messages WHERE id = $1", [row.message_id]);
  // Delivered-To on the copy lets the next hop (and this MDA) detect a forwarding loop.
  const body = Buffer.concat([Buffer.from(`Delivered-To: ${headerSafe(row.address!)}\r\n`), raw.rows[0]!.raw]);
  return insertMessage(
    client,
    { raw: body, envelopeFrom: row.envelope_from === "" ? "" : row.address!, source: "forward", traceId: row.trace_id, traceSpanId: row.trace_span_id },
    route.routes.map((r) => ({ recipient: to, route: r })),
    SERVICE,
  );
}

/**
 * Delivers one local delivery: under the delivery's row lock, check it is still pending,
 * check the account, apply the rules, quota, UID, entry, state and event, all in one
 * transaction. Safe to call any number of times for the same delivery: only the first call
 * has an effect. (The consumer files plain cases in batches: batch.ts.)
 */
export async function deliverLocal(ctx: DeliverContext, deliveryId: number, options: DeliverOptions = {}): Promise<Outcome> {
  const stopTimer = mdaMetrics.handleSeconds.startTimer();
  const outcome = await deliverOnce(ctx, deliveryId, options);
  stopTimer();
  mdaMetrics.outcomes.inc({ outcome: outcome.status });
  return outcome;
}

/**
 * The one info line per delivery outcome, written after its commit (docs/mda.md, Logs). A
 * duplicate or a missing delivery changed nothing and gets none. The line carries the message's
 * trace: a batch is filed in the context of the job that started it, not of each of its jobs.
 */
export function logOutcome(logger: Logger, row: Row, outcome: Outcome): void {
  if (outcome.status === "missing" || outcome.status === "duplicate") return;
  const trace = row.trace_id && row.trace_id !== currentTraceId() ? { trace_id: row.trace_id, span_id: undefined } : {};
  const fields = {
    messageId: row.message_id,
    queueId: row.queue_id,
    deliveryId: row.id,
    to: row.final_recipient,
    from: row.envelope_from,
    delay: Math.round(Math.max(0, Date.now() - new Date(row.received_at).getTime()) / 10) / 100,
    attempts: row.attempts + 1,
    ...trace,
  };
  switch (outcome.status) {
    case "delivered":
      logger.info(
        { ...fields, status: "delivered", dsn: "2.0.0", relay: outcome.folder, action: "filed", uid: outcome.uid, ...(outcome.forwardedTo ? { forwardedTo: outcome.forwardedTo } : {}), reply: `250 2.0.0 Delivered to ${logText(outcome.folder)} as UID ${outcome.uid}` },
        "delivered",
      );
      return;
    case "discarded":
      logger.info({ ...fields, status: "delivered", dsn: "2.0.0", relay: "none", action: "discarded", rule: outcome.ruleId, reply: "250 2.0.0 Discarded by filter rule" }, "delivered");
      return;
    case "forwarded":
      logger.info(
        { ...fields, status: "delivered", dsn: "2.0.0", relay: "none", action: "forwarded", forwardedTo: outcome.to, forwardMessageId: outcome.messageId, reply: `250 2.0.0 Forwarded to ${logText(outcome.to)}` },
        "delivered",
      );
      return;
    case "bounced":
      logger.info({ ...fields, status: "bounced", dsn: outcome.enhanced, relay: "none", reply: logText(`${outcome.code} ${outcome.enhanced} ${outcome.text}`) }, "bounced");
      return;
    case "tempfail":
      // Told to the LMTP client, which retries; this copy is cancelled.
      logger.info({ ...fields, status: "deferred", dsn: outcome.enhanced, relay: "none", retriedBy: "client", reply: logText(`${outcome.code} ${outcome.enhanced} ${outcome.text}`) }, "deferred");
      return;
  }
}

export function observeFiled(row: Row): void {
  mdaMetrics.acceptToMailbox.observe(Math.max(0, (Date.now() - new Date(row.received_at).getTime()) / 1000));
}

async function deliverOnce(ctx: DeliverContext, deliveryId: number, options: DeliverOptions): Promise<Outcome> {
  const pre = await ctx.pool.query<Row & { raw: Buffer | null }>(
    `SELECT ${ROW_COLUMNS}, CASE WHEN p.parsed IS NULL THEN m.raw END AS raw ${ROW_FROM}`,
    [deliveryId],
  );
  const head = pre.rows[0];
  if (!head) return { status: "missing" };
  if (FINAL_STATES.has(head.state) || head.kind !== "local") return { status: "duplicate", state: head.state };
  if (head.raw) {
    head.parsed = await parseMessage(head.raw);
    await ctx.pool.query("INSERT INTO message_parsed (message_id, parsed) VALUES ($1, $2) ON CONFLICT (message_id) DO NOTHING", [head.message_id, JSON.stringify(head.parsed)]);
  }
  // The common case (an account that exists, a copy to file) takes one statement; anything
  // else (rules that discard or forward, a full mailbox, a missing account) the transaction below.
  if (head.account_id !== null && head.address !== null && !head.disabled && !wantsSuccessNotice(head)) {
    const decision = decideFor(head);
    if (decision.kind === "file" && decision.ruleId === null && decision.reason === "default") {
      const fast = await fileFast(ctx, head, decision.folder);
      if (fast) return fast;
    }
  }
  return deliverInTransaction(ctx, deliveryId, options);
}

export function decideFor(row: Row): Decision {
  const prefixSize = headerPrefix(row.envelope_from, row.final_recipient).length;
  return decide(row.rules, {
    headers: row.parsed?.headers ?? [],
    size: prefixSize + row.message_size,
    spam: row.parsed?.spam ?? false,
    defaultFolder: row.folder,
  });
}

/**
 * Files a copy in ONE statement (its own transaction): lock the delivery if still pending,
 * charge the quota, take the folder's next UID, insert the entry, mark the delivery delivered
 * and record the event. Concurrent duplicates wait on the row lock and then find it final.
 * Returns null when the quota refused the copy (the caller bounces it in a transaction).
 */
async function fileFast(ctx: DeliverContext, row: Row, folder: string): Promise<Outcome | null> {
  const prefix = headerPrefix(row.envelope_from, row.final_recipient);
  const size = prefix.length + row.message_size;
  const result = await ctx.pool.query<{ pending: number; uid: number | null }>(
    `WITH pending AS (
       SELECT id FROM deliveries WHERE id = $1 AND ${stillPending()} FOR NO KEY UPDATE
     ), quota AS (
       UPDATE accounts SET used_bytes = used_bytes + $4
        WHERE id = $2 AND EXISTS (SELECT 1 FROM pending) AND (quota_bytes IS NULL OR used_bytes + $4 <= quota_bytes)
       RETURNING id
     ), uid AS (
       INSERT INTO folders (account_id, name, uid_next) SELECT id, $3, 2 FROM quota
       ON CONFLICT (account_id, name) DO UPDATE SET uid_next = folders.uid_next + 1
       RETURNING account_id, uid_next - 1 AS uid
     ), entry AS (
       INSERT INTO mailbox_entries (account_id, folder, uid, message_id, delivery_id, header_prefix, size)
       SELECT account_id, $3, uid, $5, $1, $6, $4 FROM uid
       RETURNING uid
     ), done AS (
       UPDATE deliveries SET state = 'delivered', folder = $3, attempts = attempts + 1, last_attempt_at = now(),
              next_attempt_at = NULL, last_status = '2.0.0', updated_at = now(),
              last_reply = '250 2.0.0 Delivered to ' || $3 || ' as UID ' || (SELECT uid FROM entry)
        WHERE id = $1 AND EXISTS (SELECT 1 FROM entry)
       RETURNING id
     ), event AS (
       INSERT INTO delivery_events (message_id, delivery_id, event, service, reply, detail)
       SELECT $5, id, 'delivered', $7, '250 2.0.0 Delivered', json_build_object('folder', $3::text, 'uid', (SELECT uid FROM entry))
         FROM done
     )
     SELECT (SELECT count(*)::int FROM pending) AS pending, (SELECT uid FROM entry) AS uid`,
    [row.id, row.account_id, folder, size, row.message_id, prefix, SERVICE],
  );
  const { pending, uid } = result.rows[0]!;
  if (pending === 0) return { status: "duplicate", state: "delivered" };
  if (uid === null) return null;
  mailMetrics.deliveriesFinal.inc({ kind: "local", state: "delivered" });
  observeFiled(row);
  const outcome: Outcome = { status: "delivered", folder, uid };
  logOutcome(ctx.logger, row, outcome);
  return outcome;
}

export const ROW_COLUMNS = `d.id, d.message_id, m.queue_id, d.state, d.attempts, d.kind, d.account_id, d.final_recipient, d.folder, d.dsn_notify,
       m.envelope_from, m.size AS message_size, m.trace_id, m.trace_span_id, m.received_at, p.parsed, a.address, a.disabled,
       COALESCE((SELECT json_agg(f ORDER BY f.position) FROM filter_rules f WHERE f.account_id = d.account_id), '[]') AS rules`;
export const ROW_FROM = `FROM deliveries d
         JOIN messages m ON m.id = d.message_id
         LEFT JOIN message_parsed p ON p.message_id = m.id
         LEFT JOIN accounts a ON a.id = d.account_id
        WHERE d.id = $1`;

/** The general path: everything under the delivery's row lock in one explicit transaction. */
export async function deliverInTransaction(ctx: DeliverContext, deliveryId: number, options: DeliverOptions): Promise<Outcome> {
  let forwarded: AcceptedMessage | null = null;
  const client = await ctx.pool.connect();
  let outcome: Outcome | undefined;
  let locked: Row | undefined;
  try {
    await client.query("BEGIN");
    const result = await client.query<Row>(`SELECT ${ROW_COLUMNS} ${ROW_FROM} FOR NO KEY UPDATE OF d`, [deliveryId]);
    const row = result.rows[0];
    locked = row;
    if (!row) {
      outcome = { status: "missing" };
    } else if (FINAL_STATES.has(row.state) || row.kind !== "local") {
      outcome = { status: "duplicate", state: row.state };
    } else if (row.account_id === null || row.address === null) {
      outcome = await bounce(client, row, options, 550, "5.1.1", "Mailbox unavailable: no such account");
    } else if (row.disabled) {
      outcome = await bounce(client, row, options, 550, "5.2.1", "Mailbox disabled");
    } else {
      const parsed = row.parsed;
      const headers = parsed?.headers ?? [];
      let decision: Decision = decideFor(row);
      const events: JourneyEvent[] = [];
      if (decision.kind === "forward") {
        const looped = headers.some(([name, value]) => name === "delivered-to" && value.trim().toLowerCase() === row.address);
        // A forward that keeps a copy may still meet a full mailbox: the savepoint undoes the forward then.
        if (decision.keepCopy) await client.query("SAVEPOINT forward");
        const created = looped
          ? "forwarding loop: this account already handled the message"
          : (await bouncesOwnForward(client, row))
            ? "a bounce of this account's forwarded copy: kept for the account"
            : await createForward(client, row, decision.to);
        if (typeof created === "string") {
          // Nothing is lost: the copy stays with the account.
          ctx.logger.warn({ deliveryId, rule: decision.ruleId, problem: created }, "forward not possible; filing into INBOX");
          events.push({ messageId: row.message_id, deliveryId: row.id, event: "filtered", service: SERVICE, detail: { rule: decision.ruleId, problem: created } });
          decision = { kind: "file", folder: "INBOX", ruleId: decision.ruleId, reason: "rule" };
        } else {
          forwarded = created;
          events.push({ messageId: row.message_id, deliveryId: row.id, event: "forwarded", service: SERVICE, detail: { rule: decision.ruleId, to: decision.to, forwardMessageId: created.messageId } });
          if (!decision.keepCopy) {
            await markDelivered(client, row, row.folder, `250 2.0.0 Forwarded to ${decision.to}`, events);
            outcome = { status: "forwarded", to: decision.to, messageId: created.messageId };
          } else {
            decision = { kind: "file", folder: "INBOX", ruleId: decision.ruleId, reason: "rule" };
          }
        }
      }
      if (decision.kind === "discard") {
        events.push({ messageId: row.message_id, deliveryId: row.id, event: "discarded", service: SERVICE, detail: { rule: decision.ruleId } });
        await markDelivered(client, row, row.folder, "250 2.0.0 Discarded by filter rule", events);
        outcome = { status: "discarded", ruleId: decision.ruleId };
      } else if (decision.kind === "file") {
        const filed = await fileCopy(client, row, decision.folder);
        if (!filed.ok) {
          // A bounce and a forward must not both happen: undo the forwarded copy.
          if (forwarded) await client.query("ROLLBACK TO SAVEPOINT forward");
          forwarded = null;
          outcome = options.failureReported && options.quotaFullTempfail
            ? await tempfail(client, row, 452, "4.2.2", "Mailbox full")
            : await bounce(client, row, options, 552, "5.2.2", "Mailbox full");
        } else {
          if (decision.ruleId !== null || decision.reason === "spam") {
            events.push({ messageId: row.message_id, deliveryId: row.id, event: "filtered", service: SERVICE, detail: { rule: decision.ruleId, reason: decision.reason, folder: filed.folder } });
          }
          events.push({ messageId: row.message_id, deliveryId: row.id, event: "delivered", service: SERVICE, reply: "250 2.0.0 Delivered", detail: { folder: filed.folder, uid: filed.uid } });
          await markDelivered(client, row, filed.folder, `250 2.0.0 Delivered to ${filed.folder} as UID ${filed.uid}`, events, wantsSuccessNotice(row) ? "pending" : null);
          observeFiled(row);
          outcome = { status: "delivered", folder: filed.folder, uid: filed.uid, ...(forwarded ? { forwardedTo: (forwarded as AcceptedMessage).deliveries[0]?.finalRecipient } : {}) };
        }
      }
    }
    await client.query("COMMIT");
  } catch (error) {
    await client.query("ROLLBACK").catch(() => undefined);
    throw error;
  } finally {
    client.release();
  }
  outcome ??= { status: "missing" };
  if (locked) logOutcome(ctx.logger, locked, outcome);
  if (outcome.status === "delivered" || outcome.status === "discarded" || outcome.status === "forwarded") {
    mailMetrics.deliveriesFinal.inc({ kind: "local", state: "delivered" });
  } else if (outcome.status === "bounced") {
    mailMetrics.deliveriesFinal.inc({ kind: "local", state: "bounced" });
  } else if (outcome.status === "tempfail") {
    mailMetrics.deliveriesFinal.inc({ kind: "local", state: "cancelled" });
  }
  if (forwarded && ctx.bus) {
    await dispatchAccepted(ctx.bus, ctx.pool, forwarded).catch((error) =>
      ctx.logger.warn({ err: error, messageId: forwarded?.messageId }, "dispatch of forwarded copy failed; the sweeper will retry"),
    );
  }
  return outcome;
}

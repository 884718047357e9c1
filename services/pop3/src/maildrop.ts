import type { Pool, PoolClient } from "@mailstack/db";
import copyStreams from "pg-copy-streams";
import { canonicalLength, MessageEncoder } from "./transform.ts";

const copyTo = copyStreams.to;

// Advisory lock class for POP3 maildrops; the second key is the account id.
const LOCK_CLASS = 4_207_110;
// Read-ahead for consecutive small messages: a few queries per mailbox instead of one per RETR.
const READ_AHEAD_COUNT = 256;
const DOT = 0x2e;
const LF_DOT = Buffer.from("\n.");
const TERMINATOR = Buffer.from(".\r\n");
// Each batch is held twice (the stored bytes, for TOP, and the built responses), and a session
// holds at most two batches: about 4 MiB per session.
const READ_AHEAD_BYTES = 1024 * 1024;
// Messages up to this size are sized in batches; larger ones are read in slices.
const SIZE_BATCH_BYTES = 8 * 1024 * 1024;

export interface Entry {
  /** Message number in this session, 1-based, fixed for the session. */
  number: number;
  id: number;
  uid: number;
  messageId: number;
  deliveryId: number | null;
  /** Per-recipient header lines, ending with a line break. */
  headerPrefix: Buffer;
  rawLength: number;
  /** Octets the stored message alone becomes (CRLF-normalised); equal to rawLength when it needs no change. */
  rawSize: number;
  /** Octets RETR sends (before byte-stuffing). */
  size: number;
  uidl: string;
  deleted: boolean;
  /** The accepting SMTP session's trace and span, for a span link from the retrieval. */
  traceId: string | null;
  traceSpanId: string | null;
}

interface Row {
  id: number;
  uid: number;
  message_id: number;
  delivery_id: number | null;
  header_prefix: Buffer;
  raw_length: number;
  raw_size: number | null;
  trace_id: string | null;
  trace_span_id: string | null;
}

/**
 * One account's INBOX as a POP3 session sees it: locked (PostgreSQL advisory lock held on this
 * session's own connection, so it is released when the session ends or the connection dies),
 * listed once at login, read by streaming slices of messages.raw.
 */
export class Maildrop {
  readonly entries: Entry[];
  private readonly client: PoolClient;
  private readonly accountId: number;
  private readonly chunkSize: number;
  /**
   * Small messages read ahead, by message number: the stored bytes, and the complete RETR
   * response (status line, message as sent, terminator) built for the whole batch in one buffer,
   * so that a RETR of a message read ahead is one synchronous write of a view of it.
   */
  private readAhead = new Map<number, { raw: Buffer; response: Buffer }>();
  private inFlight: { numbers: Set<number>; done: Promise<void> } | null = null;
  /** Index of the first entry not yet read ahead. */
  private nextIndex = 0;
  private closed = false;

  private constructor(client: PoolClient, accountId: number, entries: Entry[], chunkSize: number) {
    this.client = client;
    this.accountId = accountId;
    this.entries = entries;
    this.chunkSize = chunkSize;
  }

  /** Locks and lists the maildrop; null when another session holds the lock. */
  static async open(sessionPool: Pool, accountId: number, chunkSize: number): Promise<Maildrop | null> {
    const client = await sessionPool.connect();
    // A checked-out pg client has no error listener: without this, a connection lost while the
    // session is idle would be an unhandled 'error' event. The next query then fails and is answered.
    client.on("error", ignoreError);
    try {
      const lock = await client.query<{ locked: boolean }>("SELECT pg_try_advisory_lock($1, $2::int) AS locked", [LOCK_CLASS, accountId]);
      if (!lock.rows[0]!.locked) {
        client.off("error", ignoreError);
        client.release();
        return null;
      }
      const folder = await client.query<{ uid_validity: number }>(
        "SELECT uid_validity FROM folders WHERE account_id = $1 AND name = 'INBOX'",
        [accountId],
      );
      const uidValidity = folder.rows[0]?.uid_validity ?? 0;
      const rows = (
        await client.query<Row>(
          `SELECT e.id, e.uid, e.message_id, e.delivery_id, e.header_prefix,
                  octet_length(m.raw) AS raw_length, s.size AS raw_size, m.trace_id, m.trace_span_id
             FROM mailbox_entries e
             JOIN messages m ON m.id = e.message_id
             LEFT JOIN pop3_message_sizes s ON s.message_id = e.message_id
            WHERE e.account_id = $1 AND e.folder = 'INBOX' AND NOT e.deleted
            ORDER BY e.uid`,
          [accountId],
        )
      ).rows;
      const rawSizes = await sizeMessages(client, rows, chunkSize);
      const entries = rows.map((row, index): Entry => {
        let prefix = row.header_prefix;
        // The prefix must end a line, so that prefix and raw are encoded as one stream.
        if (prefix.length > 0 && prefix[prefix.length - 1] !== 0x0a) prefix = Buffer.concat([prefix, Buffer.from("\r\n")]);
        const rawSize = rawSizes.get(row.message_id)!;
        return {
          number: index + 1,
          id: row.id,
          uid: row.uid,
          messageId: row.message_id,
          deliveryId: row.delivery_id,
          headerPrefix: prefix,
          rawLength: row.raw_length,
          rawSize,
          size: canonicalLength([prefix]) + rawSize,
          uidl: `${uidValidity}.${row.uid}`,
          deleted: false,
          traceId: row.trace_id,
          traceSpanId: row.trace_span_id,
        };
      });
      return new Maildrop(client, accountId, entries, chunkSize);
    } catch (error) {
      client.release(true);
      throw error;
    }
  }

  /**
   * The RETR response of a message read ahead (used once), or undefined. Synchronous: the
   * common case, consecutive RETRs of small messages, needs no query and no await.
   */
  takeResponse(entry: Entry): Buffer | undefined {
    const cached = this.readAhead.get(entry.number);
    if (!cached) return undefined;
    this.readAhead.delete(entry.number);
    this.readAheadIfLow();
    return cached.response;
  }

  /**
   * The complete RETR response of a small message, reading it (and the small messages after it)
   * ahead when it is not read yet; null for a message too large for that, which `send` streams.
   */
  async response(entry: Entry): Promise<Buffer | null> {
    if (entry.rawLength > this.chunkSize) return null;
    await this.cached(entry);
    return this.takeResponse(entry)!;
  }

  /**
   * Produces one message as RETR (bodyLines null) or TOP n bodyLines sends it: CRLF line endings,
   * byte-stuffed, without the terminating ".". `emit` gets the encoded pieces of each slice read
   * (mostly zero-copy views of it) and may apply backpressure.
   */
  async send(entry: Entry, bodyLines: number | null, emit: (parts: Buffer[]) => Promise<void> | void): Promise<void> {
    const encoder = new MessageEncoder({ bodyLines });
    const parts: Buffer[] = [];
    encoder.pushTo(entry.headerPrefix, parts);
    if (entry.rawLength <= this.chunkSize) {
      encoder.pushTo((await this.cached(entry)).raw, parts);
    } else {
      for (let offset = 0; offset < entry.rawLength && !encoder.done; offset += this.chunkSize) {
        encoder.pushTo(await fetchSlice(this.client, entry.messageId, offset, this.chunkSize), parts);
        await emit(parts.splice(0));
      }
    }
    const tail = encoder.end();
    if (tail.length) parts.push(tail);
    await emit(parts);
  }

  /** A small message read ahead, reading it and the ones after it when it is not. */
  private async cached(entry: Entry): Promise<{ raw: Buffer; response: Buffer }> {
    let cached = this.readAhead.get(entry.number);
    if (!cached && this.inFlight?.numbers.has(entry.number)) {
      await this.inFlight.done;
      cached = this.readAhead.get(entry.number);
    }
    if (!cached) {
      // Not read ahead (first RETR, out of order, or the read-ahead failed): this message and the next small ones.
      this.readAhead.clear();
      const batch = this.nextBatch(entry.number - 1);
      this.nextIndex = batch.nextIndex;
      this.store(batch.entries, await fetchRaw(this.client, batch.entries.map((e) => e.messageId)));
      cached = this.readAhead.get(entry.number);
      if (!cached) throw new Error(`message ${entry.messageId} vanished`);
    }
    return cached;
  }

  /** Keeps the next batch on its way while the client reads this one. */
  private readAheadIfLow(): void {
    if (this.inFlight || this.closed || this.readAhead.size >= READ_AHEAD_COUNT / 2 || this.nextIndex >= this.entries.length) return;
    const batch = this.nextBatch(this.nextIndex);
    this.nextIndex = batch.nextIndex;
    if (batch.entries.length === 0) return;
    const numbers = new Set(batch.entries.map((e) => e.number));
    // A failed read-ahead is not an error: the message is then read when it is asked for.
    const done: Promise<void> = fetchRaw(this.client, batch.entries.map((e) => e.messageId))
      .then((raws) => this.store(batch.entries, raws), () => undefined)
      .finally(() => {
        if (this.inFlight?.done === done) this.inFlight = null;
      });
    this.inFlight = { numbers, done };
  }

  /** Builds the RETR responses of a batch into one buffer and files them with their raw bytes. */
  private store(entries: Entry[], raws: Map<number, Buffer>): void {
    if (this.closed) return;
    const built: Array<{ entry: Entry; raw: Buffer; parts: Buffer[]; length: number }> = [];
    let total = 0;
    for (const entry of entries) {
      const raw = raws.get(entry.messageId);
      if (!raw) continue;
      const parts = [Buffer.from(`+OK ${entry.size} octets\r\n`), ...encodeMessage(entry, raw), TERMINATOR];
      const length = parts.reduce((sum, part) => sum + part.length, 0);
      built.push({ entry, raw, parts, length });
      total += length;
    }
    const block = Buffer.allocUnsafeSlow(total);
    let offset = 0;
    for (const { entry, raw, parts, length } of built) {
      for (const part of parts) offset += part.copy(block, offset);
      this.readAhead.set(entry.number, { raw, response: block.subarray(offset - length, offset) });
    }
  }

  /** Up to READ_AHEAD_COUNT small, undeleted messages from entries[start], within READ_AHEAD_BYTES. */
  private nextBatch(start: number): { entries: Entry[]; nextIndex: number } {
    const entries: Entry[] = [];
    let bytes = 0;
    let i = start;
    for (; i < this.entries.length && entries.length < READ_AHEAD_COUNT; i++) {
      const next = this.entries[i]!;
      if (next.deleted || next.rawLength > this.chunkSize) continue;
      if (entries.length > 0 && bytes + next.rawLength > READ_AHEAD_BYTES) break;
      entries.push(next);
      bytes += next.rawLength;
    }
    return { entries, nextIndex: i };
  }

  /** UPDATE state: marks the DELEted entries deleted in one transaction; returns how many. */
  async commitDeletions(): Promise<number> {
    const ids = this.entries.filter((e) => e.deleted).map((e) => e.id);
    if (ids.length === 0) return 0;
    await this.client.query("BEGIN");
    try {
      const removed = await this.client.query<{ size: number }>(
        "UPDATE mailbox_entries SET deleted = true WHERE id = ANY($1::bigint[]) AND NOT deleted RETURNING size",
        [ids],
      );
      const bytes = removed.rows.reduce((sum, row) => sum + row.size, 0);
      await this.client.query("UPDATE accounts SET used_bytes = greatest(0, used_bytes - $2) WHERE id = $1", [this.accountId, bytes]);
      await this.client.query("COMMIT");
      return removed.rowCount ?? 0;
    } catch (error) {
      await this.client.query("ROLLBACK").catch(() => undefined);
      throw error;
    }
  }

  /** Releases the lock and the connection (dropping the connection if the unlock fails). */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.readAhead.clear();
    await this.inFlight?.done;
    this.inFlight = null;
    try {
      await this.client.query("SELECT pg_advisory_unlock($1, $2::int)", [LOCK_CLASS, this.accountId]);
      this.client.off("error", ignoreError);
      this.client.release();
    } catch {
      // The connection is gone, and the lock with it.
      this.client.release(true);
    }
  }
}

function ignoreError(): void {}

/**
 * A small message as RETR sends it, without the terminator: the header prefix and the stored
 * bytes, CRLF-normalised and byte-stuffed. Stored mail that needs neither (CRLF only, which the
 * cached size shows, and no line starting with ".") is used as it is.
 */
function encodeMessage(entry: Entry, raw: Buffer): Buffer[] {
  const encoder = new MessageEncoder();
  const parts: Buffer[] = [];
  encoder.pushTo(entry.headerPrefix, parts);
  if (entry.rawSize === raw.length && raw[0] !== DOT && raw.indexOf(LF_DOT) < 0) {
    parts.push(raw);
    return parts;
  }
  encoder.pushTo(raw, parts);
  const tail = encoder.end();
  if (tail.length) parts.push(tail);
  return parts;
}

/**
 * The raw bytes of several messages by binary COPY: PostgreSQL sends the bytes as they are (no
 * hex encoding to produce and decode, which otherwise costs more than everything else per
 * message); the messages are views into the received buffer.
 */
async function fetchRaw(client: PoolClient, ids: number[]): Promise<Map<number, Buffer>> {
  if (!ids.every(Number.isSafeInteger)) throw new Error("message ids must be integers");
  const rows = await copyRows(
    client,
    `SELECT u.n::int4, m.raw FROM unnest('{${ids.join(",")}}'::bigint[]) WITH ORDINALITY AS u(id, n) JOIN messages m ON m.id = u.id`,
  );
  const map = new Map<number, Buffer>();
  for (const [n, raw] of rows) map.set(ids[n - 1]!, raw);
  return map;
}

/** `length` bytes of a message's raw from `offset` (0-based), by binary COPY. */
async function fetchSlice(client: PoolClient, messageId: number, offset: number, length: number): Promise<Buffer> {
  for (const value of [messageId, offset, length]) if (!Number.isSafeInteger(value)) throw new Error("expected integers");
  const rows = await copyRows(client, `SELECT 1::int4, substring(raw FROM ${offset + 1} FOR ${length}) FROM messages WHERE id = ${messageId}`);
  if (rows.length !== 1) throw new Error(`message ${messageId} vanished`);
  return rows[0]![1];
}

/** Runs `COPY (select) TO STDOUT (FORMAT binary)` for a select of (int4, bytea) and parses the rows. */
async function copyRows(client: PoolClient, select: string): Promise<Array<[number, Buffer]>> {
  const stream = client.query(copyTo(`COPY (${select}) TO STDOUT (FORMAT binary)`));
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(chunk as Buffer);
  return parseBinaryCopy(chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks));
}

const COPY_SIGNATURE = Buffer.from("PGCOPY\n\xff\r\n\0", "latin1");

/** Rows (int4, bytea) of PostgreSQL's binary COPY format, the bytea as views into `data`. */
export function parseBinaryCopy(data: Buffer): Array<[number, Buffer]> {
  if (data.length < 19 || !data.subarray(0, 11).equals(COPY_SIGNATURE)) throw new Error("not binary COPY data");
  let offset = 11 + 4; // signature, flags
  offset += 4 + data.readInt32BE(offset); // header extension
  const rows: Array<[number, Buffer]> = [];
  for (;;) {
    const fields = data.readInt16BE(offset);
    offset += 2;
    if (fields === -1) return rows;
    if (fields !== 2) throw new Error(`binary COPY: expected 2 fields, got ${fields}`);
    const nLength = data.readInt32BE(offset);
    if (nLength !== 4) throw new Error("binary COPY: expected an int4");
    const n = data.readInt32BE(offset + 4);
    offset += 8;
    const length = data.readInt32BE(offset);
    offset += 4;
    if (length < 0 || offset + length > data.length) throw new Error("binary COPY: bad field length");
    rows.push([n, data.subarray(offset, offset + length)]);
    offset += length;
  }
}

/** The POP3 size of each listed message's raw bytes, computing and caching the ones not yet known. */
async function sizeMessages(client: PoolClient, rows: Row[], chunkSize: number): Promise<Map<number, number>> {
  const sizes = new Map<number, number>();
  const missing = new Map<number, number>();
  for (const row of rows) {
    if (row.raw_size !== null) sizes.set(row.message_id, row.raw_size);
    else missing.set(row.message_id, row.raw_length);
  }
  if (missing.size === 0) return sizes;
  const computed = new Map<number, number>();
  let batch: number[] = [];
  let batchBytes = 0;
  const flush = async () => {
    if (batch.length === 0) return;
    for (const [id, raw] of await fetchRaw(client, batch)) computed.set(id, canonicalLength([raw]));
    batch = [];
    batchBytes = 0;
  };
  for (const [id, length] of missing) {
    if (length > chunkSize) {
      const encoder = new MessageEncoder({ stuff: false });
      for (let offset = 0; offset < length; offset += chunkSize) {
        encoder.pushTo(await fetchSlice(client, id, offset, chunkSize), null);
      }
      encoder.end();
      computed.set(id, encoder.length);
      continue;
    }
    if (batchBytes + length > SIZE_BATCH_BYTES) await flush();
    batch.push(id);
    batchBytes += length;
  }
  await flush();
  await client.query(
    `INSERT INTO pop3_message_sizes (message_id, size)
     SELECT * FROM unnest($1::bigint[], $2::bigint[]) ON CONFLICT DO NOTHING`,
    [[...computed.keys()], [...computed.values()]],
  );
  for (const [id, size] of computed) sizes.set(id, size);
  return sizes;
}

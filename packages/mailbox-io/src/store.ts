import Cursor from "pg-cursor";
import { canonicalFolderName, isFolderPath, transaction, type Pool, type PoolClient } from "@mailstack/db";
import { headerBoundary } from "@mailstack/mail";
import { insertMessage } from "@mailstack/queue";
import { mboxrdEntry } from "./mbox.ts";

/** A refused import or export (bad folder name, over quota, malformed input): one line for the operator. */
export class MailboxIoError extends Error {
  readonly code: "invalid" | "not-found" | "quota" | "too-large";
  constructor(code: MailboxIoError["code"], message: string) {
    super(message);
    this.name = "MailboxIoError";
    this.code = code;
  }
}

export interface MailboxEntry {
  folder: string;
  uid: number;
  envelopeFrom: string;
  receivedAt: Date;
  /** The mailbox copy: the per-recipient header prefix followed by the stored message. */
  bytes: Buffer;
}

/**
 * Folder names double as relative paths in exports: no empty, "." or ".." segments, no control
 * characters. Returns the name to use: INBOX however it was written ("inbox" is not a folder of its own).
 */
export function validateFolderName(name: string): string {
  if (!isFolderPath(name)) throw new MailboxIoError("invalid", `invalid folder name: ${JSON.stringify(name)}`);
  return canonicalFolderName(name);
}

/** The folder to export: its name as stored, or not-found (an empty export would look like a backup). */
export async function existingFolder(pool: Pool, accountId: number, name: string): Promise<string> {
  const folder = validateFolderName(name);
  if (!(await listFolders(pool, accountId)).includes(folder)) throw new MailboxIoError("not-found", `no such folder: ${folder}`);
  return folder;
}

export async function listFolders(pool: Pool, accountId: number): Promise<string[]> {
  const result = await pool.query<{ name: string }>(
    `SELECT name FROM folders WHERE account_id = $1
     UNION SELECT DISTINCT folder FROM mailbox_entries WHERE account_id = $1 ORDER BY 1`,
    [accountId],
  );
  return result.rows.map((r) => r.name);
}

/**
 * The mailbox entries of an account (one folder, or all), oldest UID first, read through a
 * cursor a few rows at a time so a large mailbox is never in memory at once.
 */
export async function* mailboxEntries(pool: Pool, accountId: number, folder?: string, batchSize = 8): AsyncGenerator<MailboxEntry> {
  const client = await pool.connect();
  const params: unknown[] = [accountId];
  if (folder !== undefined) params.push(folder);
  const cursor = client.query(
    new Cursor<{ folder: string; uid: number; envelope_from: string; received_at: Date; header_prefix: Buffer; raw: Buffer }>(
      `SELECT e.folder, e.uid, m.envelope_from, m.received_at, e.header_prefix, m.raw
       FROM mailbox_entries e JOIN messages m ON m.id = e.message_id
       WHERE e.account_id = $1 AND NOT e.deleted ${folder !== undefined ? "AND e.folder = $2" : ""}
       ORDER BY e.folder, e.uid`,
      params,
    ),
  );
  try {
    for (;;) {
      const rows = await cursor.read(batchSize);
      if (rows.length === 0) break;
      for (const row of rows) {
        yield {
          folder: row.folder,
          uid: row.uid,
          envelopeFrom: row.envelope_from,
          receivedAt: row.received_at,
          bytes: row.header_prefix.length ? Buffer.concat([row.header_prefix, row.raw]) : row.raw,
        };
      }
    }
  } finally {
    await cursor.close().catch(() => undefined);
    client.release();
  }
}

/** One folder as an mboxrd byte stream. */
export async function* mboxStream(pool: Pool, accountId: number, folder: string): AsyncGenerator<Buffer> {
  for await (const entry of mailboxEntries(pool, accountId, folder)) {
    yield* mboxrdEntry(entry.envelopeFrom, entry.receivedAt, entry.bytes);
  }
}

export interface ImportedMessage {
  raw: Buffer;
  envelopeFrom: string;
  receivedAt: Date | null;
}

function headerValue(raw: Buffer, name: string): string | null {
  const end = headerBoundary(raw)?.headerEnd ?? raw.length;
  // UTF-8: Return-Path may hold an SMTPUTF8 address (RFC 6531/6532).
  const head = raw.subarray(0, Math.min(end, 256 * 1024)).toString("utf8");
  const match = new RegExp(`^${name}:[ \\t]*((?:.*)(?:\\r?\\n[ \\t].*)*)`, "im").exec(head);
  return match ? match[1]!.replace(/\r?\n[ \t]+/g, " ").trim() || null : null;
}

/** The envelope sender an .eml file implies: its Return-Path, or the null sender. */
export function returnPath(raw: Buffer): string {
  const value = headerValue(raw, "Return-Path");
  return value ? value.replace(/^<|>$/g, "") : "";
}

/** Files one message inside the caller's transaction: a messages row (source 'import'), the next UID, a mailbox entry. */
async function fileMessage(client: PoolClient, accountId: number, folder: string, message: ImportedMessage): Promise<{ uid: number; queueId: string }> {
  const stored = await insertMessage(
    client,
    { raw: message.raw, envelopeFrom: message.envelopeFrom, source: "import", messageIdHeader: headerValue(message.raw, "Message-ID") },
    [],
    "admin-api",
  );
  if (message.receivedAt) {
    await client.query("UPDATE messages SET received_at = $2 WHERE id = $1", [stored.messageId, message.receivedAt]);
  }
  await client.query("INSERT INTO folders (account_id, name) VALUES ($1, $2) ON CONFLICT DO NOTHING", [accountId, folder]);
  const uid = await client.query<{ uid: number }>(
    "UPDATE folders SET uid_next = uid_next + 1 WHERE account_id = $1 AND name = $2 RETURNING uid_next - 1 AS uid",
    [accountId, folder],
  );
  await client.query(
    "INSERT INTO mailbox_entries (account_id, folder, uid, message_id, size) VALUES ($1, $2, $3, $4, $5)",
    [accountId, folder, uid.rows[0]!.uid, stored.messageId, message.raw.length],
  );
  return { uid: uid.rows[0]!.uid, queueId: stored.queueId };
}

/**
 * Files a batch of messages in one transaction, the account row locked so that the quota check
 * and the usage update cannot race with the MDA. The stored bytes are exactly the input.
 */
async function importBatch(
  pool: Pool,
  accountId: number,
  batch: (ImportedMessage & { folder: string })[],
): Promise<{ filed: { uid: number; queueId: string }[]; refused?: MailboxIoError }> {
  return transaction(pool, async (client) => {
    const account = await client.query<{ quota_bytes: number | null; used_bytes: number }>(
      "SELECT quota_bytes, used_bytes FROM accounts WHERE id = $1 FOR NO KEY UPDATE",
      [accountId],
    );
    const row = account.rows[0];
    if (!row) throw new MailboxIoError("not-found", "the account no longer exists");
    let used = row.used_bytes;
    const filed = [];
    let refused: MailboxIoError | undefined;
    for (const message of batch) {
      if (row.quota_bytes !== null && used + message.raw.length > row.quota_bytes) {
        // What fits is kept (committed below); the import stops at the first message that does not.
        refused = new MailboxIoError("quota", `the account's quota of ${row.quota_bytes} bytes would be exceeded`);
        break;
      }
      filed.push(await fileMessage(client, accountId, message.folder, message));
      used += message.raw.length;
    }
    await client.query("UPDATE accounts SET used_bytes = $2 WHERE id = $1", [accountId, used]);
    return refused ? { filed, refused } : { filed };
  });
}

/** Files one message into a folder, in its own transaction. */
export async function importMessage(pool: Pool, accountId: number, folder: string, message: ImportedMessage): Promise<{ uid: number; queueId: string }> {
  const { filed, refused } = await importBatch(pool, accountId, [{ ...message, folder: validateFolderName(folder) }]);
  if (refused) throw refused;
  return filed[0]!;
}

/** Messages per transaction and bytes per transaction: few commits, bounded memory. */
const BATCH_MESSAGES = 100;
const BATCH_BYTES = 8 * 1024 * 1024;

export interface ImportResult {
  imported: number;
  bytes: number;
  folders: string[];
}

/**
 * Imports messages in batches (one transaction per batch of up to 100 messages or 8 MiB). On a
 * failure the error says how many messages were committed before it: a quota refusal keeps every
 * message before the one that does not fit; any other failure rolls back its whole batch.
 */
export async function importMessages(
  pool: Pool,
  accountId: number,
  messages: AsyncIterable<ImportedMessage & { folder: string }>,
): Promise<ImportResult> {
  const result: ImportResult = { imported: 0, bytes: 0, folders: [] };
  let batch: (ImportedMessage & { folder: string })[] = [];
  let batchBytes = 0;
  const flush = async () => {
    if (batch.length === 0) return;
    const { filed, refused } = await importBatch(pool, accountId, batch);
    for (const message of batch.slice(0, filed.length)) {
      result.imported++;
      result.bytes += message.raw.length;
      if (!result.folders.includes(message.folder)) result.folders.push(message.folder);
    }
    batch = [];
    batchBytes = 0;
    if (refused) throw refused;
  };
  try {
    for await (const message of messages) {
      batch.push({ ...message, folder: validateFolderName(message.folder) });
      batchBytes += message.raw.length;
      if (batch.length >= BATCH_MESSAGES || batchBytes >= BATCH_BYTES) await flush();
    }
    await flush();
  } catch (error) {
    const problem = error as Error;
    problem.message = `${problem.message} (after ${result.imported} message(s) imported)`;
    throw problem;
  }
  return result;
}

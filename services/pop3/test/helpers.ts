import net from "node:net";
import tls from "node:tls";
import { once } from "node:events";
import { randomBytes } from "node:crypto";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { commonShape, loadConfig } from "@mailstack/config";
import { addAccount, addDomain, getDomain, type Pool } from "@mailstack/db";
import { createLogger } from "@mailstack/telemetry";
import type { TestEnv } from "@mailstack/testkit";
import { pop3Shape, type Pop3Config } from "../src/config.ts";
import { startPop3, type Pop3Server } from "../src/server.ts";

/** A validated config for a test server on ephemeral loopback ports, with test-friendly overrides. */
export function testConfig(env: TestEnv, overrides: Partial<Pop3Config> = {}): Pop3Config {
  const config = loadConfig({ ...commonShape, ...pop3Shape }, {
    ...env.env,
    POP3_HOST: "127.0.0.1",
    POP3_PORT: "0",
    POP3S_PORT: "0",
    POP3_FAILED_LOGIN_DELAY: "0",
    POP3_MAX_SESSIONS: "10",
    TLS_DIR: join(tmpdir(), "mailstack-pop3-test-tls"),
  }) as Pop3Config;
  return { ...config, ...overrides };
}

export async function startTestServer(env: TestEnv, overrides: Partial<Pop3Config> = {}): Promise<Pop3Server> {
  const config = testConfig(env, overrides);
  return startPop3({ pool: env.pool, logger: createLogger("pop3", config.LOG_LEVEL), config });
}

export interface TestAccount {
  id: number;
  address: string;
  password: string;
}

export async function createAccount(pool: Pool, address: string, password = "secret-pw", apopSecret: string | null = null): Promise<TestAccount> {
  const domain = address.split("@")[1]!;
  if (!(await getDomain(pool, domain))) await addDomain(pool, domain);
  const account = await addAccount(pool, { address, password, apopSecret });
  return { id: account.id, address: account.address, password };
}

/**
 * Files a message the way the MDA does (the real schema): a messages row, and a mailbox entry
 * with the next UID of the account's INBOX; size = header prefix + raw as stored.
 */
export async function fileMessage(pool: Pool, accountId: number, raw: Buffer | string, headerPrefix: Buffer | string = ""): Promise<{ entryId: number; messageId: number; uid: number }> {
  const rawBytes = Buffer.isBuffer(raw) ? raw : Buffer.from(raw);
  const prefix = Buffer.isBuffer(headerPrefix) ? headerPrefix : Buffer.from(headerPrefix);
  const client = await pool.connect();
  try {
    await client.query("BEGIN");
    const message = await client.query<{ id: number }>(
      `INSERT INTO messages (queue_id, raw, size, envelope_from, source) VALUES ($1, $2, $3, '', 'inbound') RETURNING id`,
      [randomBytes(8).toString("hex"), rawBytes, rawBytes.length],
    );
    const folder = await client.query<{ uid: number }>(
      "UPDATE folders SET uid_next = uid_next + 1 WHERE account_id = $1 AND name = 'INBOX' RETURNING uid_next - 1 AS uid",
      [accountId],
    );
    const uid = folder.rows[0]!.uid;
    const entry = await client.query<{ id: number }>(
      `INSERT INTO mailbox_entries (account_id, folder, uid, message_id, header_prefix, size)
       VALUES ($1, 'INBOX', $2, $3, $4, $5) RETURNING id`,
      [accountId, uid, message.rows[0]!.id, prefix, prefix.length + rawBytes.length],
    );
    await client.query("UPDATE accounts SET used_bytes = used_bytes + $2 WHERE id = $1", [accountId, prefix.length + rawBytes.length]);
    await client.query("COMMIT");
    return { entryId: entry.rows[0]!.id, messageId: message.rows[0]!.id, uid };
  } catch (error) {
    await client.query("ROLLBACK");
    throw error;
  } finally {
    client.release();
  }
}

/** A deliberately literal POP3 client over a real socket, for checking exact bytes. */
export class PopClient {
  socket: net.Socket | tls.TLSSocket;
  private buffer = Buffer.alloc(0);
  private waiters: Array<() => void> = [];
  closed = false;

  private constructor(socket: net.Socket | tls.TLSSocket) {
    this.socket = socket;
    this.listen(socket);
  }

  private listen(socket: net.Socket | tls.TLSSocket): void {
    socket.on("data", (chunk: Buffer) => {
      this.buffer = Buffer.concat([this.buffer, chunk]);
      this.wake();
    });
    socket.on("close", () => {
      this.closed = true;
      this.wake();
    });
    socket.on("error", () => undefined);
  }

  private wake(): void {
    const waiters = this.waiters;
    this.waiters = [];
    for (const waiter of waiters) waiter();
  }

  static async connect(port: number, options: { tls?: boolean; ca?: string } = {}): Promise<{ client: PopClient; greeting: string }> {
    const socket = options.tls
      ? tls.connect({ port, host: "127.0.0.1", ca: options.ca, servername: "localhost" })
      : net.connect({ port, host: "127.0.0.1" });
    await once(socket, options.tls ? "secureConnect" : "connect");
    const client = new PopClient(socket);
    return { client, greeting: await client.line() };
  }

  /** Reads until `predicate` finds a complete response in the buffer; returns its byte length. */
  private async until(find: (buffer: Buffer) => number, timeoutMs = 10_000): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const end = find(this.buffer);
      if (end >= 0) {
        const out = this.buffer.subarray(0, end);
        this.buffer = this.buffer.subarray(end);
        return out;
      }
      if (this.closed) throw new Error(`connection closed; buffered: ${JSON.stringify(this.buffer.toString("latin1").slice(0, 200))}`);
      if (Date.now() > deadline) throw new Error(`timed out; buffered: ${JSON.stringify(this.buffer.toString("latin1").slice(0, 200))}`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, 200);
        this.waiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
  }

  /** One response line without CRLF. */
  async line(timeoutMs?: number): Promise<string> {
    const bytes = await this.until((b) => {
      const i = b.indexOf("\r\n");
      return i < 0 ? -1 : i + 2;
    }, timeoutMs);
    return bytes.subarray(0, bytes.length - 2).toString("utf8");
  }

  /** A multi-line response: status line, then the body exactly as sent (still stuffed), without the final ".\r\n". */
  async multiline(): Promise<{ status: string; body: Buffer }> {
    const status = await this.line();
    if (!status.startsWith("+OK")) return { status, body: Buffer.alloc(0) };
    const body = await this.until((b) => {
      if (b.subarray(0, 3).equals(Buffer.from(".\r\n"))) return 3;
      const i = b.indexOf("\r\n.\r\n");
      return i < 0 ? -1 : i + 5;
    });
    return { status, body: body.length === 3 ? Buffer.alloc(0) : body.subarray(0, body.length - 3) };
  }

  send(line: string | Buffer): void {
    this.socket.write(typeof line === "string" ? `${line}\r\n` : line);
  }

  async command(line: string): Promise<string> {
    this.send(line);
    return this.line();
  }

  async upgrade(ca: string): Promise<void> {
    const raw = this.socket;
    raw.removeAllListeners("data");
    raw.removeAllListeners("close");
    const secure = tls.connect({ socket: raw, ca, servername: "localhost" });
    await once(secure, "secureConnect");
    this.socket = secure;
    this.buffer = Buffer.alloc(0);
    this.listen(secure);
  }

  async login(account: TestAccount): Promise<string> {
    await this.command(`USER ${account.address}`);
    return this.command(`PASS ${account.password}`);
  }

  close(): void {
    this.socket.destroy();
  }
}

/** Removes POP3 byte-stuffing from a multi-line body. */
export function unstuff(body: Buffer): Buffer {
  return Buffer.from(body.toString("latin1").replace(/(^|\r\n)\.\./g, "$1."), "latin1");
}

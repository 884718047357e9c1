import { connect, type Socket } from "node:net";
import { addAccount, addDomain, type Pool } from "@mailstack/db";
import { acceptMessage, dispatchAccepted, type AcceptedMessage } from "@mailstack/queue";
import type { Bus } from "@mailstack/bus";

export async function account(pool: Pool, address: string, quotaBytes: number | null = null): Promise<number> {
  const domain = address.split("@")[1]!;
  await addDomain(pool, domain).catch(() => undefined);
  return (await addAccount(pool, { address, password: "secret-password", quotaBytes })).id;
}

/** Accepts a message for local recipients the way the SMTP services do, and dispatches it. */
export async function send(
  pool: Pool,
  bus: Bus | null,
  raw: string | Buffer,
  recipients: Array<{ address: string; accountId: number; notify?: string[]; folder?: string }>,
  envelopeFrom = "sender@remote.example",
): Promise<AcceptedMessage> {
  const accepted = await acceptMessage(
    pool,
    { raw: Buffer.isBuffer(raw) ? raw : Buffer.from(raw), envelopeFrom, source: "inbound" },
    recipients.map((r) => ({ recipient: r.address, route: { kind: "local", accountId: r.accountId, address: r.address }, dsnNotify: r.notify ?? null, ...(r.folder ? { folder: r.folder } : {}) })),
    "test",
  );
  if (bus) await dispatchAccepted(bus, pool, accepted);
  return accepted;
}

export function message(subject: string, body = "Hello.\r\n", extraHeaders = ""): string {
  return `From: Sender <sender@remote.example>\r\nTo: someone@example.test\r\nSubject: ${subject}\r\nMessage-ID: <${subject.replace(/\W/g, "")}@remote.example>\r\n${extraHeaders}\r\n${body}`;
}

/** A line-oriented client on a raw socket: send text, read complete SMTP/LMTP replies. */
export class LineClient {
  private buffer = "";
  private waiters: Array<() => void> = [];
  /** Every line of the last reply read (a multi-line reply's continuation lines included). */
  lastReplyLines: string[] = [];
  readonly socket: Socket;
  private constructor(socket: Socket) {
    this.socket = socket;
    socket.setEncoding("utf8");
    socket.on("data", (text: string) => {
      this.buffer += text;
      for (const wake of this.waiters.splice(0)) wake();
    });
    socket.on("close", () => {
      for (const wake of this.waiters.splice(0)) wake();
    });
    socket.on("error", () => undefined);
  }
  static async open(port: number, host = "127.0.0.1"): Promise<LineClient> {
    const socket = connect(port, host);
    await new Promise<void>((resolve, reject) => socket.once("connect", resolve).once("error", reject));
    return new LineClient(socket);
  }
  write(text: string): void {
    this.socket.write(text);
  }
  /** Reads one complete (possibly multi-line) reply and returns its last line. */
  async reply(timeoutMs = 10_000): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const match = /^(\d{3}) [^\r\n]*\r\n/m.exec(this.buffer);
      if (match) {
        const end = match.index + match[0].length;
        this.lastReplyLines = this.buffer.slice(0, end).split("\r\n").filter((line) => line !== "");
        this.buffer = this.buffer.slice(end);
        return match[0].trimEnd();
      }
      if (Date.now() > deadline || this.socket.destroyed) throw new Error(`no reply; buffer: ${JSON.stringify(this.buffer)}`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, 100);
        this.waiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
  }
  async command(line: string): Promise<string> {
    this.write(`${line}\r\n`);
    return this.reply();
  }
  /** Whether the server closed the connection (waits up to timeoutMs for it). */
  async closed(timeoutMs = 2_000): Promise<boolean> {
    if (this.socket.destroyed || this.socket.readableEnded) return true;
    return new Promise<boolean>((resolve) => {
      const timer = setTimeout(() => resolve(false), timeoutMs);
      this.socket.once("close", () => {
        clearTimeout(timer);
        resolve(true);
      });
    });
  }
  /** Whatever the server sent that no reply() has read yet. */
  pending(): string {
    return this.buffer;
  }
  close(): void {
    this.socket.destroy();
  }
}

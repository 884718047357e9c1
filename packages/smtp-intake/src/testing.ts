import net from "node:net";
import tls from "node:tls";

export interface Reply {
  code: number;
  /** Every line's text after the code and separator. */
  lines: string[];
  /** The whole reply as sent, lines joined with \n. */
  text: string;
}

/**
 * A deliberately dumb SMTP client over a raw socket, for protocol edge cases that a real
 * client library refuses to produce (bare LF, pipelined garbage, early talking...).
 */
export class RawSmtp {
  socket: net.Socket | tls.TLSSocket;
  private buffer = "";
  private waiters: Array<() => void> = [];
  closed = false;

  constructor(socket: net.Socket | tls.TLSSocket) {
    this.socket = socket;
    socket.setEncoding("latin1");
    socket.on("data", (chunk: string) => {
      this.buffer += chunk;
      this.wake();
    });
    socket.on("close", () => {
      this.closed = true;
      this.wake();
    });
    socket.on("error", () => undefined);
  }

  static connect(port: number, host = "127.0.0.1"): Promise<RawSmtp> {
    return new Promise((resolve, reject) => {
      const socket = net.connect(port, host, () => resolve(new RawSmtp(socket)));
      socket.once("error", reject);
    });
  }

  private wake(): void {
    for (const wake of this.waiters.splice(0)) wake();
  }

  write(data: string | Buffer): void {
    this.socket.write(typeof data === "string" ? Buffer.from(data, "latin1") : data);
  }

  /** Reads one complete (possibly multi-line) reply; rejects on close or timeout. */
  async reply(timeoutMs = 10_000): Promise<Reply> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const lines: string[] = [];
      let consumed = 0;
      let done = false;
      for (;;) {
        const end = this.buffer.indexOf("\r\n", consumed);
        if (end < 0) break;
        const line = this.buffer.slice(consumed, end);
        consumed = end + 2;
        lines.push(line);
        if (/^\d{3} /.test(line) || /^\d{3}$/.test(line)) {
          done = true;
          break;
        }
      }
      if (done) {
        this.buffer = this.buffer.slice(consumed);
        return { code: Number(lines[0]!.slice(0, 3)), lines: lines.map((l) => l.slice(4)), text: lines.join("\n") };
      }
      if (this.closed) throw new Error(`connection closed while waiting for a reply (buffer: ${JSON.stringify(this.buffer)})`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`no reply within ${timeoutMs} ms (buffer: ${JSON.stringify(this.buffer)})`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.waiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
  }

  async command(line: string): Promise<Reply> {
    this.write(`${line}\r\n`);
    return this.reply();
  }

  /** Resolves when the server has closed the connection. */
  async waitClosed(timeoutMs = 10_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!this.closed) {
      if (Date.now() > deadline) throw new Error("connection still open");
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, 50);
        this.waiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
  }

  /** Everything received and not yet read as a reply. */
  pending(): string {
    return this.buffer;
  }

  /** Upgrades with STARTTLS (the command must have been answered 220 already). */
  async startTls(): Promise<void> {
    const raw = this.socket as net.Socket;
    raw.removeAllListeners("data");
    raw.removeAllListeners("close");
    const secure = tls.connect({ socket: raw, rejectUnauthorized: false });
    await new Promise<void>((resolve, reject) => {
      secure.once("secureConnect", () => resolve());
      secure.once("error", reject);
    });
    this.socket = secure;
    this.buffer = "";
    secure.setEncoding("latin1");
    secure.on("data", (chunk: string) => {
      this.buffer += chunk;
      this.wake();
    });
    secure.on("close", () => {
      this.closed = true;
      this.wake();
    });
  }

  close(): void {
    this.socket.destroy();
  }
}

/** A 4 KiB-ish plain message with CRLF line endings. */
export function sampleMessage(options: { from?: string; to?: string; subject?: string; body?: string; messageId?: string } = {}): string {
  const lines = [
    `From: ${options.from ?? "Sender <sender@remote.example>"}`,
    `To: ${options.to ?? "user1@example.test"}`,
    `Subject: ${options.subject ?? "hello"}`,
    `Message-ID: ${options.messageId ?? `<${Math.random().toString(36).slice(2)}@remote.example>`}`,
    "Date: Fri, 27 Nov 2026 09:00:00 +0000",
    "MIME-Version: 1.0",
    "Content-Type: text/plain; charset=us-ascii",
    "",
    options.body ?? "Hello there.",
    "",
  ];
  return lines.join("\r\n");
}

/** Dot-stuffs a CRLF message for DATA and appends the terminator. */
export function dataPayload(message: string): string {
  const stuffed = message.replace(/^\./gm, "..");
  return `${stuffed}${stuffed.endsWith("\r\n") ? "" : "\r\n"}.\r\n`;
}

import net from "node:net";
import tls from "node:tls";
import { once } from "node:events";
import { createPool, type Pool } from "@mailstack/db";
import { ConnectionSlots, startTlsSource, tlsSourceOptions, type TlsCredentials } from "@mailstack/runtime";
import type { Logger } from "@mailstack/telemetry";
import type { Pop3Config } from "./config.ts";
import { pop3Metrics as metrics } from "./metrics.ts";
import { Pop3Session, type SessionIo, type SessionSettings } from "./session.ts";


// At most this many pipelined command lines wait in memory before the socket is paused.
const MAX_QUEUED_LINES = 64;
const TLS_HANDSHAKE_TIMEOUT_MS = 30_000;
/** How long a session may take to finish its current command when the server stops. */
const SHUTDOWN_GRACE_MS = 5_000;
// Queued in place of a discarded over-long line.
const TOO_LONG = Symbol("line too long");


export interface Pop3Options {
  pool: Pool;
  logger: Logger;
  config: Pop3Config;
  /** Credentials to use instead of loading them from the TLS_* settings (tests). */
  tls?: TlsCredentials;
}

export interface Pop3Server {
  /** Port of the STLS listener. */
  port: number;
  /** Port of the implicit TLS listener. */
  tlsPort: number;
  tls: TlsCredentials;
  listening(): boolean;
  /** Stops accepting, lets each session finish its current command, closes them (no UPDATE), resolves. */
  stop(): Promise<void>;
}

export async function startPop3(options: Pop3Options): Promise<Pop3Server> {
  const { config, logger, pool } = options;
  // The operator's certificate is read again when it changes on disk (or on SIGHUP); new
  // handshakes on 995 and new STLS upgrades get the renewed one.
  const tlsSource = options.tls ? null : await startTlsSource(tlsSourceOptions(config, logger));
  let credentials = options.tls ?? tlsSource!.current();
  const currentTls = () => credentials;
  const sessionPool = createPool({ url: config.DATABASE_URL, max: config.POP3_MAX_SESSIONS, applicationName: "pop3-session" });
  let lockedSessions = 0;
  const settings: SessionSettings = {
    hostname: config.MAIL_HOSTNAME,
    tlsAvailable: true,
    allowPlaintext: config.POP3_ALLOW_PLAINTEXT,
    failedLoginDelayMs: config.POP3_FAILED_LOGIN_DELAY,
    throttle: { perIp: config.POP3_MAX_FAILURES_PER_IP, perAccount: config.POP3_MAX_FAILURES_PER_ACCOUNT, windowMs: config.POP3_FAILURE_WINDOW },
    chunkSize: config.POP3_CHUNK_SIZE,
    popBeforeSmtp: config.POP_BEFORE_SMTP,
    tryAcquireSession: () => {
      if (lockedSessions >= config.POP3_MAX_SESSIONS) return false;
      lockedSessions++;
      return true;
    },
    releaseSession: () => {
      lockedSessions--;
    },
  };
  const connections = new Set<Connection>();
  const admission = new ConnectionSlots({ max: config.POP3_MAX_CONNECTIONS, maxPerIp: config.POP3_MAX_CONNECTIONS_PER_IP });
  let stopping = false;

  const accept = (socket: net.Socket | tls.TLSSocket, listener: string, release: () => void) => {
    metrics.connections.inc({ listener });
    const connection = new Connection(socket, listener === "pop3s", { pool, sessionPool, logger, settings }, config, currentTls);
    connections.add(connection);
    metrics.open.inc();
    connection.finished.then(() => {
      connections.delete(connection);
      metrics.open.dec();
      release();
    });
  };

  // allowHalfOpen: a client that half-closes after sending its commands (`printf ... | nc -N`) still
  // gets every reply, and its QUIT is carried out; the connection closes after the last reply.
  const plain = net.createServer({ allowHalfOpen: true }, (socket) => {
    const release = stopping ? null : admission.admit(socket.remoteAddress ?? "");
    if (!release) {
      metrics.refused.inc();
      socket.on("error", () => undefined);
      socket.end("-ERR [SYS/TEMP] too many connections; try again later\r\n");
      return;
    }
    accept(socket, "pop3", release);
  });
  // 995 wraps each connection itself, as STLS does, rather than through tls.createServer: a
  // half-open TLS server's native handshake never notices a client that leaves before its
  // ClientHello (a TCP probe, a port scan), which then held a socket until the handshake timeout
  // and held up shutdown.
  const handshaking = new Set<tls.TLSSocket>();
  const secure = net.createServer({ allowHalfOpen: true }, (raw) => {
    // Over a limit, nothing can be said before a handshake (which would cost the CPU the limit saves): drop it.
    const release = stopping ? null : admission.admit(raw.remoteAddress ?? "");
    if (!release) {
      metrics.refused.inc();
      raw.on("error", () => undefined);
      raw.destroy();
      return;
    }
    const { socket, secured } = serverTls(raw, credentials.context);
    handshaking.add(socket);
    socket.on("error", (error) => logger.debug({ err: error }, "pop3s connection error"));
    void secured.then((ok) => {
      handshaking.delete(socket);
      if (ok) accept(socket, "pop3s", release);
      else release();
    });
  });
  tlsSource?.onChange((next) => {
    credentials = next;
  });
  plain.listen(config.POP3_PORT, config.POP3_HOST);
  secure.listen(config.POP3S_PORT, config.POP3_HOST);
  await Promise.all([once(plain, "listening"), once(secure, "listening")]);
  const port = (plain.address() as net.AddressInfo).port;
  const tlsPort = (secure.address() as net.AddressInfo).port;
  logger.info({ port, tlsPort, certificate: credentials.source, selfSigned: credentials.selfSigned }, "pop3 listening");

  return {
    port,
    tlsPort,
    get tls() {
      return credentials;
    },
    listening: () => plain.listening && secure.listening && !stopping,
    async stop() {
      if (stopping) return;
      stopping = true;
      tlsSource?.stop();
      const closed = Promise.all([new Promise((resolve) => plain.close(resolve)), new Promise((resolve) => secure.close(resolve))]);
      for (const socket of handshaking) socket.destroy();
      await Promise.all([...connections].map((connection) => connection.shutdown()));
      await closed;
      await sessionPool.end();
    },
  };
}

/**
 * Server-side TLS on a plain socket, for 995 and for STLS alike. `secured` resolves true once the
 * handshake is done, false (the socket destroyed) when the client leaves or half-closes before
 * that, or the handshake takes longer than its timeout.
 */
function serverTls(raw: net.Socket, secureContext: tls.SecureContext): { socket: tls.TLSSocket; secured: Promise<boolean> } {
  const socket = new tls.TLSSocket(raw, { isServer: true, secureContext });
  const secured = new Promise<boolean>((resolve) => {
    const settle = (ok: boolean) => {
      clearTimeout(timer);
      socket.off("secure", onSecure).off("end", onGone).off("close", onGone);
      if (!ok) socket.destroy();
      resolve(ok);
    };
    const onSecure = () => settle(true);
    const onGone = () => settle(false);
    const timer = setTimeout(onGone, TLS_HANDSHAKE_TIMEOUT_MS);
    socket.once("secure", onSecure).once("end", onGone).once("close", onGone);
  });
  return { socket, secured };
}

/** One client connection: line framing, command queue, STLS upgrade, autologout. */
class Connection implements SessionIo {
  readonly remoteAddress: string;
  secure: boolean;
  readonly finished: Promise<void>;
  private socket: net.Socket | tls.TLSSocket;
  private readonly session: Pop3Session;
  private readonly config: Pop3Config;
  private readonly currentTls: () => TlsCredentials;
  private readonly logger: Logger;
  private buffer: Buffer = Buffer.alloc(0);
  private discardingLongLine = false;
  private readonly queue: Array<string | typeof TOO_LONG> = [];
  private processing = false;
  private closed = false;
  private stopping = false;
  /** The client half-closed: what it sent is answered, then the connection is closed. */
  private inputEnded = false;
  private timer: NodeJS.Timeout | null = null;
  private resolveFinished!: () => void;
  private readonly onData = (chunk: Buffer) => this.receive(chunk);
  private readonly onEnd = () => {
    this.inputEnded = true;
    void this.process();
  };

  constructor(
    socket: net.Socket | tls.TLSSocket,
    secure: boolean,
    deps: ConstructorParameters<typeof Pop3Session>[1],
    config: Pop3Config,
    currentTls: () => TlsCredentials,
  ) {
    this.socket = socket;
    this.secure = secure;
    this.config = config;
    this.currentTls = currentTls;
    this.logger = deps.logger;
    this.remoteAddress = socket.remoteAddress ?? "";
    socket.setNoDelay(true);
    this.finished = new Promise((resolve) => (this.resolveFinished = resolve));
    this.session = new Pop3Session(this, deps);
    this.attach(socket);
    this.resetTimer();
    void this.write(this.session.greeting());
  }

  private attach(socket: net.Socket | tls.TLSSocket): void {
    socket.on("data", this.onData);
    socket.on("end", this.onEnd);
    socket.on("error", (error) => this.logger.debug({ err: error }, "pop3 connection error"));
    socket.on("close", () => this.onClose());
  }

  private receive(chunk: Buffer): void {
    if (this.closed) return;
    const queued = this.queue.length;
    this.buffer = this.buffer.length ? Buffer.concat([this.buffer, chunk]) : chunk;
    for (;;) {
      const lf = this.buffer.indexOf(0x0a);
      if (lf < 0) break;
      const lineBytes = this.buffer.subarray(0, lf);
      this.buffer = this.buffer.subarray(lf + 1);
      if (this.discardingLongLine) {
        this.discardingLongLine = false;
        this.queue.push(TOO_LONG);
        continue;
      }
      if (lineBytes.length + 1 > this.config.POP3_MAX_LINE) {
        this.queue.push(TOO_LONG);
        continue;
      }
      const end = lineBytes.length > 0 && lineBytes[lineBytes.length - 1] === 0x0d ? lineBytes.length - 1 : lineBytes.length;
      this.queue.push(lineBytes.subarray(0, end).toString("utf8"));
    }
    if (this.buffer.length > this.config.POP3_MAX_LINE) {
      this.buffer = Buffer.alloc(0);
      this.discardingLongLine = true;
    }
    // RFC 1939: a command resets the autologout timer; bytes of a line that never ends do not.
    if (this.queue.length > queued) this.resetTimer();
    if (this.queue.length > MAX_QUEUED_LINES) this.socket.pause();
    void this.process();
  }

  private async process(): Promise<void> {
    if (this.processing) return;
    this.processing = true;
    try {
      while (this.queue.length > 0 && !this.closed && !this.stopping) {
        const line = this.queue.shift()!;
        const pending = line === TOO_LONG ? this.session.lineTooLong() : this.session.handle(line);
        if (pending) await pending;
        if (this.queue.length <= MAX_QUEUED_LINES / 2 && this.socket.isPaused()) this.socket.resume();
      }
    } catch (error) {
      this.logger.error({ err: error }, "pop3 command failed");
      await this.write("-ERR [SYS/TEMP] internal error\r\n").catch(() => undefined);
      this.close();
    } finally {
      this.processing = false;
    }
    if (this.stopping && !this.closed) {
      await this.write("-ERR [SYS/TEMP] server shutting down\r\n");
      this.close();
    } else if (this.inputEnded && !this.closed && this.queue.length === 0) {
      // Every command the half-closed client sent is answered (an unterminated last line is
      // not a command); without a QUIT among them, no UPDATE.
      this.close();
    } else if (this.closed) await this.finish();
  }

  write(data: string | Buffer): Promise<void> {
    if (this.closed || this.socket.destroyed) return Promise.resolve();
    if (this.socket.write(data)) return Promise.resolve();
    return this.drained();
  }

  writeNow(data: Buffer): Promise<void> | undefined {
    if (this.closed || this.socket.destroyed) return undefined;
    return this.socket.write(data) ? undefined : this.drained();
  }

  writeParts(parts: Buffer[]): Promise<void> {
    if (this.closed || this.socket.destroyed) return Promise.resolve();
    this.socket.cork();
    let ok = true;
    for (const part of parts) ok = this.socket.write(part);
    this.socket.uncork();
    return ok ? Promise.resolve() : this.drained();
  }

  private drained(): Promise<void> {
    return new Promise((resolve) => {
      const done = () => {
        this.socket.off("drain", done);
        this.socket.off("close", done);
        // The client is reading: that is activity too.
        this.resetTimer();
        resolve();
      };
      this.socket.on("drain", done);
      this.socket.on("close", done);
    });
  }

  async startTls(): Promise<void> {
    // Anything the client sent after STLS, before the handshake, is discarded (RFC 2595 section 4).
    this.queue.length = 0;
    this.buffer = Buffer.alloc(0);
    this.discardingLongLine = false;
    const raw = this.socket;
    raw.off("data", this.onData);
    raw.off("end", this.onEnd);
    if (this.inputEnded) {
      // The client half-closed after STLS: it cannot take part in a handshake.
      this.close();
      return;
    }
    raw.removeAllListeners("close");
    const { socket, secured } = serverTls(raw, this.currentTls().context);
    this.socket = socket;
    this.attach(socket);
    if (await secured) this.secure = true;
    else this.close();
  }

  close(): void {
    if (!this.closed) {
      this.closed = true;
      this.socket.end();
      this.socket.destroySoon?.();
    }
    if (!this.processing) void this.finish();
  }

  private onClose(): void {
    this.closed = true;
    if (this.timer) clearTimeout(this.timer);
    if (!this.processing) void this.finish();
  }

  private finishing: Promise<void> | null = null;
  private finish(): Promise<void> {
    this.finishing ??= (async () => {
      if (this.timer) clearTimeout(this.timer);
      await this.session.end();
      if (!this.socket.destroyed) this.socket.destroy();
      this.resolveFinished();
    })();
    return this.finishing;
  }

  private resetTimer(): void {
    if (this.timer) {
      this.timer.refresh();
      return;
    }
    this.timer = setTimeout(() => void this.onIdle(), this.config.POP3_AUTOLOGOUT);
    this.timer.unref();
  }

  private async onIdle(): Promise<void> {
    if (this.closed) return;
    if (this.processing) {
      // Waiting on PostgreSQL or a TLS handshake (which has its own timeout): not the client's idleness.
      if (!this.socket.writableNeedDrain) return this.resetTimer();
      // Waiting for the client to read, and it has read nothing for the whole autologout time:
      // drop it (no response can be sent in the middle of a message; no UPDATE), which releases the maildrop.
      this.logger.info({ remoteAddress: this.remoteAddress }, "pop3 client stopped reading; connection dropped");
      this.socket.destroy();
      return;
    }
    await this.session.autologout();
    this.close();
  }

  /** Graceful shutdown: after the command in progress, close without UPDATE. */
  async shutdown(): Promise<void> {
    if (!this.closed && !this.stopping) {
      this.stopping = true;
      this.queue.length = 0;
      // When a command is in progress, the processing loop says goodbye after it.
      if (!this.processing) {
        void this.write("-ERR [SYS/TEMP] server shutting down\r\n").then(() => this.close());
      }
    }
    // A client that does not read (a RETR blocked on a full socket) would hold the shutdown until
    // its autologout; after a grace it is cut off, without UPDATE: nothing it marked is deleted.
    const cut = setTimeout(() => this.socket.destroy(), SHUTDOWN_GRACE_MS);
    try {
      await this.finished;
    } finally {
      clearTimeout(cut);
    }
  }
}

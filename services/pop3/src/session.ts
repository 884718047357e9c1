import { randomBytes } from "node:crypto";
import { recordPopLogin, type Pool } from "@mailstack/db";
import { recordEvents, type JourneyEvent } from "@mailstack/queue";
import { SpanKind, SpanStatusCode, tracer, type Link, type Logger } from "@mailstack/telemetry";
import { checkApop, checkPassword, decodePlain, isThrottled, recordFailure, type Account, type ThrottleLimits } from "./auth.ts";
import { Maildrop, type Entry } from "./maildrop.ts";
import { pop3Metrics } from "./metrics.ts";

/** What a session needs from its connection; the socket server provides it, tests may too. */
export interface SessionIo {
  readonly remoteAddress: string;
  /** True on implicit TLS or after STLS. */
  readonly secure: boolean;
  /** Writes, resolving once the socket can take more (backpressure). */
  write(data: string | Buffer): Promise<void>;
  /** Writes; returns a promise (to wait on before writing more) only when the socket's buffer is full. */
  writeNow(data: Buffer): Promise<void> | undefined;
  /** Writes several buffers as one (a gathered write, no copy), with the same backpressure. */
  writeParts(parts: Buffer[]): Promise<void>;
  /** Upgrades to TLS after "+OK" was written; input pipelined after STLS is discarded. */
  startTls(): Promise<void>;
  close(): void;
}

export interface SessionSettings {
  hostname: string;
  tlsAvailable: boolean;
  /** `never`, `loopback` or `always`: plaintext USER/PASS and AUTH PLAIN before TLS. */
  allowPlaintext: "never" | "loopback" | "always";
  failedLoginDelayMs: number;
  throttle: ThrottleLimits;
  chunkSize: number;
  popBeforeSmtp: boolean;
  /** Refuses a login beyond this many locked sessions in the process. */
  tryAcquireSession: () => boolean;
  releaseSession: () => void;
}

export interface SessionDeps {
  pool: Pool;
  /** Connections that hold a maildrop lock for a whole session. */
  sessionPool: Pool;
  logger: Logger;
  settings: SessionSettings;
}

type State = "authorization" | "transaction" | "closed";

// Journey events of retrievals are written when the client pauses, not while it downloads: the
// inserts would compete with the transfer for the CPU. At most this many wait in memory.
const MAX_PENDING_EVENTS = 5000;
const EVENT_QUIET_MS = 500;
const WRITE_BATCH = 64 * 1024;
const TERMINATOR = Buffer.from(".\r\n");

/** Whether an address is loopback (127/8, ::1, IPv4-mapped 127/8). */
export function isLoopback(address: string): boolean {
  const plain = address.startsWith("::ffff:") ? address.slice(7) : address;
  return plain === "::1" || plain.startsWith("127.");
}

/** The client IP in the form PostgreSQL's inet and the MSA compare (IPv4-mapped IPv6 unwrapped). */
export function clientIp(address: string): string {
  return address.startsWith("::ffff:") && address.includes(".") ? address.slice(7) : address;
}

/**
 * The POP3 protocol (RFC 1939, 2449, 2595, 5034) for one connection, driven one command line
 * at a time by `handle`. AUTHORIZATION -> TRANSACTION -> UPDATE (on QUIT only).
 */
export class Pop3Session {
  state: State = "authorization";
  /** The APOP timestamp of the greeting, angle brackets included. */
  readonly timestamp: string;
  private readonly io: SessionIo;
  private readonly deps: SessionDeps;
  private readonly settings: SessionSettings;
  private user: string | null = null;
  /** Set while waiting for the client's response to AUTH PLAIN's empty challenge. */
  private awaitingSasl = false;
  private maildrop: Maildrop | null = null;
  private account: Account | null = null;
  private holdsSessionSlot = false;
  private events: JourneyEvent[] = [];
  private eventTimer: NodeJS.Timeout | null = null;

  constructor(io: SessionIo, deps: SessionDeps) {
    this.io = io;
    this.deps = deps;
    this.settings = deps.settings;
    this.timestamp = `<${process.pid}.${randomBytes(6).toString("hex")}.${Date.now()}@${this.settings.hostname}>`;
  }

  greeting(): string {
    return `+OK POP3 server ready ${this.timestamp}\r\n`;
  }

  private reply(text: string): Promise<void> {
    return this.io.write(`${text}\r\n`);
  }

  private plaintextAllowed(): boolean {
    if (this.io.secure) return true;
    if (this.settings.allowPlaintext === "always") return true;
    return this.settings.allowPlaintext === "loopback" && isLoopback(this.io.remoteAddress);
  }

  /** A command line longer than the limit arrived (and was discarded). */
  lineTooLong(): Promise<void> {
    this.awaitingSasl = false;
    return this.reply("-ERR line too long");
  }

  /**
   * Handles one command line (without its CRLF). Returns nothing when the command completed
   * synchronously (a RETR of a message read ahead), so the common case costs no promise.
   */
  handle(line: string): Promise<void> | void {
    if (this.state === "closed") return;
    if (this.awaitingSasl) {
      this.awaitingSasl = false;
      return this.saslResponse(line);
    }
    const space = line.indexOf(" ");
    const keyword = (space < 0 ? line : line.slice(0, space)).toUpperCase();
    const args = space < 0 ? [] : line.slice(space + 1).split(" ").filter((arg) => arg !== "");
    if (keyword === "QUIT") return this.quit();
    if (keyword === "CAPA") return this.capa();
    if (this.state === "authorization") {
      switch (keyword) {
        case "USER": return this.userCommand(line.slice(space + 1), space < 0);
        case "PASS": return this.passCommand(space < 0 ? "" : line.slice(space + 1));
        case "APOP": return this.apop(args);
        case "AUTH": return this.auth(args);
        case "STLS": return this.stls();
        case "STAT": case "LIST": case "RETR": case "DELE": case "NOOP": case "RSET": case "TOP": case "UIDL":
          return this.reply("-ERR command not valid before authentication");
        default:
          return this.reply("-ERR unknown command");
      }
    }
    switch (keyword) {
      case "STAT": return this.stat();
      case "LIST": return this.list(args);
      case "UIDL": return this.uidl(args);
      case "RETR": return this.retr(args);
      case "TOP": return this.top(args);
      case "DELE": return this.dele(args);
      case "NOOP": return this.reply("+OK");
      case "RSET": return this.rset();
      case "USER": case "PASS": case "APOP": case "AUTH": case "STLS":
        return this.reply("-ERR command not valid in the TRANSACTION state");
      default:
        return this.reply("-ERR unknown command");
    }
  }

  private capa(): Promise<void> {
    const lines = ["+OK capability list follows", "TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"];
    if (this.state === "authorization") {
      if (this.plaintextAllowed()) lines.push("USER", "SASL PLAIN");
      if (!this.io.secure && this.settings.tlsAvailable) lines.push("STLS");
    }
    lines.push("IMPLEMENTATION mailstack", ".");
    return this.io.write(lines.join("\r\n") + "\r\n");
  }

  private async stls(): Promise<void> {
    if (this.io.secure) return this.reply("-ERR already using TLS");
    if (!this.settings.tlsAvailable) return this.reply("-ERR TLS not available");
    await this.reply("+OK begin TLS negotiation");
    await this.io.startTls();
    // RFC 2595: forget everything learnt before TLS.
    this.user = null;
  }

  private userCommand(name: string, missing: boolean): Promise<void> {
    if (!this.plaintextAllowed()) return this.reply("-ERR [AUTH] plaintext authentication is disabled without TLS; use STLS");
    if (missing || !name.trim()) return this.reply("-ERR USER needs a name");
    this.user = name.trim();
    return this.reply("+OK send PASS");
  }

  private async passCommand(password: string): Promise<void> {
    if (!this.plaintextAllowed()) return this.reply("-ERR [AUTH] plaintext authentication is disabled without TLS; use STLS");
    const name = this.user;
    this.user = null;
    if (name === null) return this.reply("-ERR USER first");
    if (!password) return this.reply("-ERR PASS needs a password");
    return this.login(name, () => checkPassword(this.deps.pool, name, password));
  }

  private async apop(args: string[]): Promise<void> {
    if (args.length !== 2) return this.reply("-ERR usage: APOP name digest");
    const [name, digest] = args as [string, string];
    if (!/^[0-9a-fA-F]{32}$/.test(digest)) return this.reply("-ERR [AUTH] invalid APOP digest");
    let notEnabled = false;
    await this.login(name, async () => {
      const result = await checkApop(this.deps.pool, name, this.timestamp, digest);
      if (result === "not-enabled") {
        notEnabled = true;
        return null;
      }
      return result;
    }, () => (notEnabled ? "-ERR [AUTH] APOP is not enabled for this account; use USER/PASS or AUTH" : null));
  }

  private async auth(args: string[]): Promise<void> {
    // The same mechanisms as CAPA's SASL line (Thunderbird chooses from this list).
    if (args.length === 0) return this.io.write(`+OK supported mechanisms\r\n${this.plaintextAllowed() ? "PLAIN\r\n" : ""}.\r\n`);
    if (args[0]!.toUpperCase() !== "PLAIN") return this.reply("-ERR unsupported authentication mechanism");
    if (!this.plaintextAllowed()) return this.reply("-ERR [AUTH] plaintext authentication is disabled without TLS; use STLS");
    if (args.length > 2) return this.reply("-ERR usage: AUTH PLAIN [initial-response]");
    if (args.length === 1) {
      this.awaitingSasl = true;
      return this.reply("+ ");
    }
    return this.saslResponse(args[1] === "=" ? "" : args[1]!);
  }

  private async saslResponse(line: string): Promise<void> {
    const response = line.trim();
    if (response === "*") return this.reply("-ERR authentication cancelled");
    const credentials = decodePlain(response);
    if (!credentials) return this.reply("-ERR [AUTH] malformed AUTH PLAIN response");
    return this.login(credentials.name, () => checkPassword(this.deps.pool, credentials.name, credentials.password));
  }

  /** The common part of every login: throttling, the failure delay, the session slot, the lock. */
  private async login(name: string, check: () => Promise<Account | null>, refusal?: () => string | null): Promise<void> {
    const ip = clientIp(this.io.remoteAddress);
    const throttle = this.settings.throttle;
    if (await isThrottled(this.deps.pool, ip, name, throttle)) {
      await delay(this.settings.failedLoginDelayMs);
      this.deps.logger.warn({ ip, user: name }, "pop3 login throttled");
      pop3Metrics.logins.inc({ result: "throttled" });
      return this.reply("-ERR [SYS/TEMP] too many failed logins; try again later");
    }
    const account = await check();
    if (!account) {
      await recordFailure(this.deps.pool, ip, name, throttle);
      await delay(this.settings.failedLoginDelayMs);
      this.deps.logger.info({ ip, user: name }, "pop3 authentication failed");
      pop3Metrics.logins.inc({ result: "failed" });
      return this.reply(refusal?.() ?? "-ERR [AUTH] invalid user name or password");
    }
    if ((this.state as State) === "closed") return;
    if (!this.settings.tryAcquireSession()) return this.reply("-ERR [SYS/TEMP] too many sessions; try again later");
    this.holdsSessionSlot = true;
    let maildrop: Maildrop | null;
    try {
      maildrop = await Maildrop.open(this.deps.sessionPool, account.id, this.settings.chunkSize);
    } catch (error) {
      this.releaseSlot();
      this.deps.logger.error({ err: error, account: account.address }, "pop3 could not open maildrop");
      return this.reply("-ERR [SYS/TEMP] mailbox unavailable; try again later");
    }
    if (!maildrop) {
      this.releaseSlot();
      pop3Metrics.logins.inc({ result: "in_use" });
      return this.reply("-ERR [IN-USE] maildrop already locked by another session");
    }
    if ((this.state as State) === "closed") {
      // The connection went away while the maildrop was opening.
      await maildrop.close();
      this.releaseSlot();
      return;
    }
    this.maildrop = maildrop;
    this.account = account;
    this.state = "transaction";
    if (this.settings.popBeforeSmtp) {
      await recordPopLogin(this.deps.pool, ip, account.id).catch((error) => this.deps.logger.error({ err: error }, "pop_logins upsert failed"));
    }
    this.deps.logger.info({ ip, account: account.address, messages: maildrop.entries.length }, "pop3 login");
    pop3Metrics.logins.inc({ result: "ok" });
    const { count, octets } = this.totals();
    return this.reply(`+OK maildrop has ${count} messages (${octets} octets)`);
  }

  private releaseSlot(): void {
    if (!this.holdsSessionSlot) return;
    this.holdsSessionSlot = false;
    this.settings.releaseSession();
  }

  private totals(): { count: number; octets: number } {
    let count = 0;
    let octets = 0;
    for (const entry of this.maildrop!.entries) {
      if (entry.deleted) continue;
      count++;
      octets += entry.size;
    }
    return { count, octets };
  }

  /** The entry a message-number argument names, or the -ERR reply to give. */
  private find(arg: string | undefined): Entry | string {
    if (arg === undefined || !/^\d{1,9}$/.test(arg)) return "-ERR invalid message number";
    const entry = this.maildrop!.entries[Number(arg) - 1];
    if (!entry) return "-ERR no such message";
    if (entry.deleted) return `-ERR message ${entry.number} already deleted`;
    return entry;
  }

  /** The entry a message-number argument names, or null after answering -ERR. */
  private async entry(arg: string | undefined): Promise<Entry | null> {
    const found = this.find(arg);
    if (typeof found !== "string") return found;
    await this.reply(found);
    return null;
  }

  private stat(): Promise<void> {
    const { count, octets } = this.totals();
    return this.reply(`+OK ${count} ${octets}`);
  }

  private async list(args: string[]): Promise<void> {
    if (args.length > 1) return this.reply("-ERR usage: LIST [msg]");
    if (args.length === 1) {
      const entry = await this.entry(args[0]);
      if (entry) await this.reply(`+OK ${entry.number} ${entry.size}`);
      return;
    }
    const { count, octets } = this.totals();
    const lines = [`+OK ${count} messages (${octets} octets)`];
    for (const entry of this.maildrop!.entries) if (!entry.deleted) lines.push(`${entry.number} ${entry.size}`);
    lines.push(".");
    return this.io.write(lines.join("\r\n") + "\r\n");
  }

  private async uidl(args: string[]): Promise<void> {
    if (args.length > 1) return this.reply("-ERR usage: UIDL [msg]");
    if (args.length === 1) {
      const entry = await this.entry(args[0]);
      if (entry) await this.reply(`+OK ${entry.number} ${entry.uidl}`);
      return;
    }
    const lines = ["+OK unique-id listing follows"];
    for (const entry of this.maildrop!.entries) if (!entry.deleted) lines.push(`${entry.number} ${entry.uidl}`);
    lines.push(".");
    return this.io.write(lines.join("\r\n") + "\r\n");
  }

  private retr(args: string[]): Promise<void> | void {
    if (args.length !== 1) return this.reply("-ERR usage: RETR msg");
    const entry = this.find(args[0]);
    if (typeof entry === "string") return this.reply(entry);
    const startTime = performance.timeOrigin + performance.now();
    const response = this.maildrop!.takeResponse(entry);
    if (!response) return this.retrReading(entry, startTime);
    // The response goes out first; the span, metrics and journey event are recorded after it,
    // while the client reads, so they add nothing to the time a client waits for each message.
    const backpressure = this.io.writeNow(response);
    this.retrieved(entry, startTime, true);
    return backpressure;
  }

  /** RETR of a message not read ahead: reads it (and the next ones), or streams a large one. */
  private async retrReading(entry: Entry, startTime: number): Promise<void> {
    let response: Buffer | null;
    try {
      response = await this.maildrop!.response(entry);
    } catch (error) {
      this.deps.logger.error({ err: error, entry: entry.id }, "pop3 could not read message");
      await this.reply("-ERR [SYS/TEMP] could not read the message; try again later");
      return this.retrieved(entry, startTime, false);
    }
    if (!response) return this.retrieved(entry, startTime, await this.sendMessage(entry, null, `+OK ${entry.size} octets`));
    await this.io.write(response);
    this.retrieved(entry, startTime, true);
  }

  /** Records a retrieval: its span (a trace of its own, linked to the message's journey), metrics and journey event. */
  private retrieved(entry: Entry, startTime: number, sent: boolean): void {
    const links: Link[] = entry.traceId && entry.traceSpanId
      ? [{ context: { traceId: entry.traceId, spanId: entry.traceSpanId, traceFlags: 1, isRemote: true } }]
      : [];
    const span = tracer.startSpan("pop3 RETR", {
      kind: SpanKind.SERVER,
      root: true,
      startTime,
      links,
      attributes: { "network.protocol.name": "pop3", "mail.message.id": entry.messageId, "mail.message.size": entry.size },
    });
    if (!sent) span.setStatus({ code: SpanStatusCode.ERROR, message: "message could not be read" });
    span.end();
    if (!sent) return;
    pop3Metrics.retrieved.inc();
    pop3Metrics.retrievedBytes.inc(entry.size);
    this.events.push({
      messageId: entry.messageId,
      deliveryId: entry.deliveryId,
      event: "retrieved",
      service: "pop3",
      detail: { account: this.account!.address, uid: entry.uid, protocol: "pop3" },
    });
    if (this.events.length >= MAX_PENDING_EVENTS) void this.flushEvents();
    else if (this.eventTimer) this.eventTimer.refresh();
    else {
      this.eventTimer = setTimeout(() => void this.flushEvents(), EVENT_QUIET_MS);
      this.eventTimer.unref();
    }
  }

  private async top(args: string[]): Promise<void> {
    if (args.length !== 2 || !/^\d+$/.test(args[1]!)) return this.reply("-ERR usage: TOP msg lines");
    const entry = await this.entry(args[0]);
    if (!entry) return;
    // Any count of digits (fetchmail asks for 99999999 lines, others more); a huge one is the whole body.
    await this.sendMessage(entry, Number(args[1]), "+OK top of message follows");
  }

  /** Sends a RETR/TOP response; false when the message could not be read. */
  private async sendMessage(entry: Entry, bodyLines: number | null, status: string): Promise<boolean> {
    // Output is gathered into writes of up to 64 KiB, so a small message (status line, body and
    // terminator) leaves in one segment. The status line goes out only with the first body bytes,
    // so a read failure before that can still be answered with -ERR.
    let pending: Buffer[] = [Buffer.from(`${status}\r\n`)];
    let pendingBytes = pending[0]!.length;
    let started = false;
    try {
      await this.maildrop!.send(entry, bodyLines, (parts) => {
        for (const part of parts) {
          pending.push(part);
          pendingBytes += part.length;
        }
        if (pendingBytes < WRITE_BATCH) return;
        const out = pending;
        pending = [];
        pendingBytes = 0;
        started = true;
        return this.io.writeParts(out);
      });
    } catch (error) {
      this.deps.logger.error({ err: error, entry: entry.id }, "pop3 could not read message");
      if (!started) await this.reply("-ERR [SYS/TEMP] could not read the message; try again later");
      // Part of the message was sent; the only honest thing left is to drop the connection.
      else this.io.close();
      return false;
    }
    pending.push(TERMINATOR);
    // A small message leaves as one buffer; a large one's last parts without copying.
    if (pendingBytes < WRITE_BATCH) await this.io.write(Buffer.concat(pending, pendingBytes + TERMINATOR.length));
    else await this.io.writeParts(pending);
    return true;
  }

  private async dele(args: string[]): Promise<void> {
    if (args.length !== 1) return this.reply("-ERR usage: DELE msg");
    const entry = await this.entry(args[0]);
    if (!entry) return;
    entry.deleted = true;
    return this.reply(`+OK message ${entry.number} deleted`);
  }

  private rset(): Promise<void> {
    for (const entry of this.maildrop!.entries) entry.deleted = false;
    const { count, octets } = this.totals();
    return this.reply(`+OK maildrop has ${count} messages (${octets} octets)`);
  }

  private async quit(): Promise<void> {
    if (this.state === "transaction") {
      // UPDATE state: the deletions, atomically, and only here.
      let removed = 0;
      try {
        removed = await this.maildrop!.commitDeletions();
      } catch (error) {
        this.deps.logger.error({ err: error }, "pop3 could not commit deletions");
        await this.reply("-ERR [SYS/TEMP] deleted messages not removed; try again later");
        await this.end();
        this.io.close();
        return;
      }
      pop3Metrics.deleted.inc(removed);
      await this.reply(`+OK bye (${removed} messages deleted)`);
    } else {
      await this.reply("+OK bye");
    }
    await this.end();
    this.io.close();
  }

  /** Autologout (RFC 1939): closes without entering the UPDATE state. */
  async autologout(): Promise<void> {
    if (this.state === "closed") return;
    await this.reply("-ERR [SYS/TEMP] autologout: idle for too long").catch(() => undefined);
    await this.end();
    this.io.close();
  }

  /** Ends the session without UPDATE (drop, timeout, shutdown): releases lock and slot, records events. */
  async end(): Promise<void> {
    if (this.state === "closed") return;
    this.state = "closed";
    const maildrop = this.maildrop;
    this.maildrop = null;
    await maildrop?.close();
    this.releaseSlot();
    await this.flushEvents();
  }

  private async flushEvents(): Promise<void> {
    if (this.eventTimer) clearTimeout(this.eventTimer);
    this.eventTimer = null;
    const events = this.events;
    if (events.length === 0) return;
    this.events = [];
    try {
      await recordEvents(this.deps.pool, events);
    } catch (error) {
      this.deps.logger.error({ err: error, count: events.length }, "pop3 could not record retrieved events");
    }
  }
}

function delay(ms: number): Promise<void> {
  return ms > 0 ? new Promise((resolve) => setTimeout(resolve, ms)) : Promise.resolve();
}

import net from "node:net";
import { StringDecoder } from "node:string_decoder";
import tls from "node:tls";
import { utf8AddrUnitext, utf8AddrXtext } from "@mailstack/mail";
import { SpanKind, SpanStatusCode, withSpan, type Span } from "@mailstack/telemetry";
import { DotStuffer } from "./dot-stuff.ts";

/** A reply from the remote server. */
export interface Reply {
  code: number;
  /** The enhanced status code (RFC 3463) when the server gave one. */
  enhanced: string | null;
  /** All lines joined with spaces, without the codes. */
  text: string;
  /** The reply as the server wrote its last line, for logs, events and Diagnostic-Code. */
  line: string;
  /** Each line's text (the EHLO extension list). */
  lines?: string[];
}

export function formatRemoteReply(reply: Reply): string {
  return `${reply.code}${reply.enhanced ? ` ${reply.enhanced}` : ""} ${reply.text}`.trim();
}

export type FailureStage = "connect" | "greeting" | "ehlo" | "starttls" | "auth" | "mail" | "rcpt" | "data" | "message";

/** A failure talking to one host. temporary: try later (or another MX); otherwise bounce. */
export class SmtpError extends Error {
  readonly temporary: boolean;
  readonly stage: FailureStage;
  readonly reply: Reply | null;
  /** The enhanced status code this failure maps to. */
  readonly status: string;
  constructor(message: string, options: { temporary: boolean; stage: FailureStage; reply?: Reply | null; status?: string }) {
    super(message);
    this.name = "SmtpError";
    this.temporary = options.temporary;
    this.stage = options.stage;
    this.reply = options.reply ?? null;
    // A reply without an enhanced code gets X.0.0 (RFC 3463); the class always says what we do with it.
    const status = options.status ?? options.reply?.enhanced ?? (options.reply || !options.temporary ? "4.0.0" : "4.4.1");
    this.status = `${options.temporary ? 4 : 5}${status.slice(1)}`;
  }
}

/** RFC 5321 4.5.3.2 timeouts (ms); all configurable. */
export interface Timeouts {
  connect: number;
  greeting: number;
  command: number;
  dataInit: number;
  dataBlock: number;
  dataEnd: number;
}

export const rfcTimeouts: Timeouts = {
  connect: 30_000,
  greeting: 300_000,
  command: 300_000,
  dataInit: 120_000,
  dataBlock: 180_000,
  dataEnd: 600_000,
};

export type TlsMode = "opportunistic" | "required" | "none";

export interface ConnectOptions {
  /** The MX host name (SNI, spans, Remote-MTA). */
  hostname: string;
  /** The IP address to connect to. */
  address: string;
  port: number;
  /** Our name in EHLO/HELO. */
  heloName: string;
  tls: TlsMode;
  /** Verify the server certificate (required TLS to a smart host); MX certificates are not verified by default. */
  tlsVerify?: boolean;
  tlsCa?: string | Buffer;
  auth?: { user: string; pass: string } | null;
  timeouts: Timeouts;
  maxReplyBytes?: number;
}

export interface EnvelopeRecipient {
  address: string;
  notify?: string[] | null;
  orcpt?: string | null;
}

export interface Envelope {
  from: string;
  recipients: EnvelopeRecipient[];
  envid?: string | null;
  ret?: "FULL" | "HDRS" | null;
}

/** What the message needs from the server. */
export interface MessageContent {
  /** A byte above 127 anywhere: BODY=8BITMIME. */
  eightBit: boolean;
  /**
   * UTF-8 header fields (RFC 6532) at any level of the MIME structure (the message's own header, a
   * part's, a returned message/global or message/global-headers): SMTPUTF8 (RFC 6531 3.2).
   */
  utf8Header: boolean;
}

/** A 4xx or 5xx reply makes its client span an error, as an HTTP client span for a 4xx/5xx status. */
function refusedStatus(span: Span, reply: Reply): void {
  if (reply.code >= 400) span.setStatus({ code: SpanStatusCode.ERROR, message: `the server replied ${reply.code}${reply.enhanced ? ` ${reply.enhanced}` : ""}` });
}

export interface TransactionResult {
  /**
   * One per envelope recipient, in order: its RCPT reply, or the DATA outcome for accepted ones.
   * permanent: the refusal is final (5xx, except 552 to RCPT: RFC 5321 4.5.3.1.10 "too many recipients").
   */
  recipients: Array<{ address: string; reply: Reply; accepted: boolean; permanent: boolean }>;
  /** The reply after the final dot; null when no data was sent. */
  data: Reply | null;
}

/** A reply line: the code, then "-" on all but the last line; the text (and the space before it) may be absent (RFC 5321 4.2). */
const REPLY_LINE = /^(\d{3})(?:([ -])(.*))?$/;
const ENHANCED = /^([245]\.\d{1,3}\.\d{1,3})(?:\s+|$)/;
/** Lines of one multi-line reply at most (an EHLO list is a few dozen). */
const MAX_REPLY_LINES = 1_000;

/** Positive completion (2xx), by the first digit as RFC 5321 4.2.1 says clients decide. */
const positive = (reply: Reply) => reply.code >= 200 && reply.code < 300;

/** RFC 3461 xtext: '+', '=' and characters outside 33-126 become +HH. */
export function xtext(value: string): string {
  let out = "";
  for (const byte of Buffer.from(value, "utf8")) {
    out += byte < 33 || byte > 126 || byte === 0x2b || byte === 0x3d ? `+${byte.toString(16).toUpperCase().padStart(2, "0")}` : String.fromCharCode(byte);
  }
  return out;
}

/** An address (or any text) without a character outside ASCII: it may go to a server without SMTPUTF8. */
export const isAscii = (text: string) => !/[^\x00-\x7f]/.test(text);

/**
 * The ORCPT parameter's value for a stored ORCPT (`addr-type;address`, decoded). A utf-8 address
 * (RFC 6533 3) goes as utf-8-addr-unitext in a transaction with SMTPUTF8 and as the 7-bit
 * utf-8-addr-xtext otherwise; any other type as xtext (RFC 3461 4.2). A bare address is rfc822,
 * or utf-8 when it is not ASCII.
 */
export function orcptParameter(orcpt: string, smtpUtf8: boolean): string {
  const semicolon = orcpt.indexOf(";");
  const type = semicolon > 0 ? orcpt.slice(0, semicolon) : isAscii(orcpt) ? "rfc822" : "utf-8";
  const address = semicolon > 0 ? orcpt.slice(semicolon + 1) : orcpt;
  if (type.toLowerCase() !== "utf-8") return `${type};${xtext(address)}`;
  return `utf-8;${smtpUtf8 ? utf8AddrUnitext(address) : utf8AddrXtext(address)}`;
}

/**
 * One SMTP client connection: EHLO (HELO fallback), STARTTLS, AUTH PLAIN, then any number
 * of transactions (connection reuse). Commands are pipelined when the server offers it.
 * Every wait has its RFC 5321 timeout; a connection that failed mid-command is marked broken.
 */
export class SmtpConnection {
  readonly options: ConnectOptions;
  socket: net.Socket;
  extensions = new Map<string, string>();
  secure = false;
  /** The socket is unusable (closed, timed out, a 421, a reply nobody asked for): close it without QUIT. */
  broken = false;
  /** Usable but not to be reused (RSET refused): QUIT, then close. */
  retired = false;
  transactions = 0;
  greeting = "";
  private decoder = new StringDecoder("utf8");
  private buffer = "";
  private lines: string[] = [];
  private replies: Reply[] = [];
  private waiter: { resolve: (reply: Reply) => void; reject: (error: Error) => void } | null = null;
  private failure: Error | null = null;
  /** Between transactions no reply is due: one arriving is the server giving up (e.g. "421 idle timeout"). */
  private idle = false;

  private constructor(options: ConnectOptions, socket: net.Socket) {
    this.options = options;
    this.socket = socket;
    this.attach(socket);
  }

  /** Connects, reads the greeting, says EHLO, upgrades with STARTTLS and authenticates as configured. */
  static async open(options: ConnectOptions): Promise<SmtpConnection> {
    const attributes = { "server.address": options.hostname, "network.peer.address": options.address, "server.port": options.port };
    const socket = await withSpan("smtp connect", { kind: SpanKind.CLIENT, attributes }, () => connectSocket(options));
    const connection = new SmtpConnection(options, socket);
    try {
      await connection.handshake();
      connection.idle = true;
      return connection;
    } catch (error) {
      // RFC 5321 3.8 (and 3.1 for a 554 greeting): the client ends the session with QUIT, not by dropping it.
      void connection.quit().catch(() => undefined);
      throw error;
    }
  }

  /** Whether the connection may carry another transaction. */
  get reusable(): boolean {
    return !this.broken && !this.retired;
  }

  private attach(socket: net.Socket): void {
    socket.setNoDelay(true);
    socket.on("data", (chunk: Buffer) => this.onData(chunk));
    socket.on("error", (error) => this.fail(error));
    socket.on("close", () => this.fail(new Error("connection closed by the server")));
  }

  private detach(socket: net.Socket): void {
    socket.removeAllListeners("data");
    socket.removeAllListeners("error");
    socket.removeAllListeners("close");
  }

  private onData(chunk: Buffer): void {
    this.buffer += this.decoder.write(chunk);
    if (this.buffer.length > (this.options.maxReplyBytes ?? 1_048_576)) {
      this.fail(new Error("the server's reply is too long"));
      this.socket.destroy();
      return;
    }
    let index: number;
    while ((index = this.buffer.indexOf("\n")) >= 0) {
      const line = this.buffer.slice(0, index).replace(/\r$/, "");
      this.buffer = this.buffer.slice(index + 1);
      const match = REPLY_LINE.exec(line);
      if (!match || this.lines.length >= MAX_REPLY_LINES) {
        this.fail(new Error(match ? "the server's reply has too many lines" : `unparseable reply line: ${line.slice(0, 100)}`));
        this.socket.destroy();
        return;
      }
      this.lines.push(match[3] ?? "");
      if (match[2] !== "-") this.pushReply(Number(match[1]), line);
    }
  }

  /** Ends a reply at its last line, whose code is the reply's (RFC 5321 4.2.1: the lines should all agree). */
  private pushReply(code: number, lastLine: string): void {
    const texts = this.lines;
    this.lines = [];
    let enhanced: string | null = null;
    const first = ENHANCED.exec(texts[0] ?? "");
    if (first && first[1]![0] === String(code)[0]) {
      enhanced = first[1]!;
      for (let i = 0; i < texts.length; i++) texts[i] = texts[i]!.replace(/^[245]\.\d{1,3}\.\d{1,3}(?:\s+|$)/, "");
    }
    const reply: Reply = { code, enhanced, text: texts.join(" ").trim(), line: lastLine, lines: texts };
    // 421: the server is closing the channel (RFC 5321 3.8), whatever it was answering.
    if (code === 421) this.broken = true;
    if (this.waiter) {
      const waiter = this.waiter;
      this.waiter = null;
      waiter.resolve(reply);
      return;
    }
    if (this.idle) {
      this.broken = true;
      this.failure ??= new Error(`the server said, unasked: ${formatRemoteReply(reply)}`);
    }
    this.replies.push(reply);
  }

  private fail(error: Error): void {
    this.broken = true;
    this.failure ??= error;
    if (this.waiter) {
      const waiter = this.waiter;
      this.waiter = null;
      waiter.reject(error);
    }
  }

  /** Waits for the next reply, at most timeoutMs. */
  readReply(timeoutMs: number, stage: FailureStage): Promise<Reply> {
    const queued = this.replies.shift();
    if (queued) return Promise.resolve(queued);
    if (this.failure) return Promise.reject(new SmtpError(this.failure.message, { temporary: true, stage }));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiter = null;
        this.broken = true;
        this.socket.destroy();
        reject(new SmtpError(`timed out after ${timeoutMs} ms waiting for the ${stage} reply`, { temporary: true, stage, status: "4.4.2" }));
      }, timeoutMs);
      this.waiter = {
        resolve: (reply) => {
          clearTimeout(timer);
          resolve(reply);
        },
        reject: (error) => {
          clearTimeout(timer);
          reject(new SmtpError(error.message, { temporary: true, stage, status: "4.4.2" }));
        },
      };
    });
  }

  private write(text: string | Buffer, stage: FailureStage = "mail"): void {
    // Every reply is read before the next command is written (pipelined ones included): a reply still
    // unread here was sent unasked (a greeting of two "220 " replies), and would be taken for the
    // answer to this command, shifting every later reply onto the wrong command.
    const unasked = this.replies[0];
    if (unasked) {
      this.broken = true;
      this.failure ??= new Error(`the server said, unasked: ${formatRemoteReply(unasked)}`);
    }
    if (this.failure) throw new SmtpError(this.failure.message, { temporary: true, stage });
    this.socket.write(text);
  }

  /** Sends one command and reads its reply, in a span of its own. */
  async command(line: string, stage: FailureStage, timeoutMs = this.options.timeouts.command): Promise<Reply> {
    const verb = line.split(" ", 1)[0]!.toUpperCase();
    return withSpan(`smtp ${verb}`, { kind: SpanKind.CLIENT, attributes: this.spanAttributes({ "smtp.command": verb }) }, async (span) => {
      this.write(`${line}\r\n`, stage);
      const reply = await this.readReply(timeoutMs, stage);
      span.setAttribute("smtp.reply.code", reply.code);
      refusedStatus(span, reply);
      return reply;
    });
  }

  private spanAttributes(extra: Record<string, string | number> = {}): Record<string, string | number | boolean> {
    return {
      "server.address": this.options.hostname,
      "network.peer.address": this.options.address,
      "server.port": this.options.port,
      "mail.smtp.tls": this.secure,
      ...extra,
    };
  }

  private async handshake(): Promise<void> {
    const greeting = await withSpan("smtp greeting", { kind: SpanKind.CLIENT, attributes: this.spanAttributes() }, () =>
      this.readReply(this.options.timeouts.greeting, "greeting"),
    );
    this.greeting = greeting.line;
    // A 5xx greeting says "no service here" about this host, not about the message (RFC 5321 3.1):
    // the next MX is tried, and when every host refuses, the delivery is deferred, not bounced
    // (Postfix's smtp_skip_5xx_greeting): a misconfigured or overloaded MX must not lose mail.
    if (!positive(greeting)) throw new SmtpError(`greeting: ${formatRemoteReply(greeting)}`, { temporary: true, stage: "greeting", reply: greeting });
    await this.hello();
    if (this.options.tls !== "none" && !this.secure) {
      if (this.extensions.has("STARTTLS")) {
        await this.startTls();
        // TLS 1.3 ends the client's handshake before the server has checked it: a server refusing it
        // (an alert for a missing client certificate, a hang-up) says so at the first read, the EHLO's
        // reply. No reply there is a failed STARTTLS, which opportunistic TLS retries in clear.
        await this.hello().catch((error: unknown) => {
          if (!(error instanceof SmtpError) || error.reply) throw error;
          throw new SmtpError(`TLS session failed: ${error.message}`, { temporary: true, stage: "starttls", status: "4.7.0" });
        });
      } else if (this.options.tls === "required") {
        throw new SmtpError("TLS is required for this destination but the server does not offer STARTTLS", { temporary: true, stage: "starttls", status: "4.7.10" });
      }
    }
    if (this.options.auth) await this.authenticate(this.options.auth);
  }

  private async hello(): Promise<void> {
    const ehlo = await this.command(`EHLO ${this.options.heloName}`, "ehlo");
    this.extensions = new Map();
    if (positive(ehlo)) {
      const all = ehlo.lines ?? [];
      for (const text of all.slice(1)) {
        const [keyword, ...params] = text.trim().split(/\s+/);
        if (keyword) this.extensions.set(keyword.toUpperCase(), params.join(" "));
      }
      return;
    }
    if (ehlo.code >= 500 && ehlo.code < 600) {
      const helo = await this.command(`HELO ${this.options.heloName}`, "ehlo");
      if (positive(helo)) return;
      throw new SmtpError(`HELO: ${formatRemoteReply(helo)}`, { temporary: helo.code < 500, stage: "ehlo", reply: helo });
    }
    throw new SmtpError(`EHLO: ${formatRemoteReply(ehlo)}`, { temporary: ehlo.code < 500, stage: "ehlo", reply: ehlo });
  }

  private async startTls(): Promise<void> {
    const reply = await this.command("STARTTLS", "starttls");
    if (!positive(reply)) {
      if (this.options.tls === "required") {
        throw new SmtpError(`STARTTLS: ${formatRemoteReply(reply)}`, { temporary: true, stage: "starttls", reply, status: "4.7.10" });
      }
      return; // opportunistic: carry on in clear
    }
    const plain = this.socket;
    this.detach(plain);
    // Whatever came after the 220 in clear (RFC 3207 5: a man in the middle's injected replies) is thrown away.
    this.buffer = "";
    this.lines = [];
    this.replies = [];
    this.decoder = new StringDecoder("utf8");
    // A failed handshake leaves nothing to say QUIT on.
    this.broken = true;
    const secured = await withSpan("smtp tls handshake", { kind: SpanKind.CLIENT, attributes: this.spanAttributes() }, () =>
      new Promise<tls.TLSSocket>((resolve, reject) => {
        const socket = tls.connect({
          socket: plain,
          servername: net.isIP(this.options.hostname) ? undefined : this.options.hostname,
          rejectUnauthorized: this.options.tlsVerify ?? false,
          ca: this.options.tlsCa,
          minVersion: "TLSv1.2",
        });
        const timer = setTimeout(() => {
          socket.destroy();
          reject(new SmtpError("TLS handshake timed out", { temporary: true, stage: "starttls", status: "4.7.0" }));
        }, this.options.timeouts.command);
        socket.once("secureConnect", () => {
          clearTimeout(timer);
          resolve(socket);
        });
        socket.once("error", (error) => {
          clearTimeout(timer);
          reject(new SmtpError(`TLS handshake failed: ${error.message}`, { temporary: true, stage: "starttls", status: "4.7.0" }));
        });
      }),
    );
    secured.removeAllListeners("error");
    this.socket = secured;
    this.secure = true;
    this.broken = false;
    this.attach(secured);
  }

  private async authenticate(auth: { user: string; pass: string }): Promise<void> {
    if (!this.secure) throw new SmtpError("refusing to send credentials without TLS", { temporary: true, stage: "auth", status: "4.7.10" });
    const token = Buffer.from(`\0${auth.user}\0${auth.pass}`).toString("base64");
    const reply = await this.command(`AUTH PLAIN ${token}`, "auth");
    if (!positive(reply)) throw new SmtpError(`AUTH: ${formatRemoteReply(reply)}`, { temporary: reply.code < 500 || reply.code === 535, stage: "auth", reply });
  }

  /**
   * One mail transaction: MAIL, RCPT per recipient and DATA (pipelined when offered),
   * then the message dot-stuffed with CRLF line endings. Refuses before sending when the
   * message is too big for the server's SIZE or needs 8BITMIME / SMTPUTF8 it does not offer:
   * 8-bit data needs 8BITMIME (RFC 6152), a non-ASCII address or header field needs
   * SMTPUTF8 (RFC 6531 3.2: such a message is never sent to a server without it).
   */
  async send(envelope: Envelope, body: Buffer, content: MessageContent): Promise<TransactionResult> {
    // Closed or given up by the server while idle: nothing of this transaction was sent.
    if (this.broken) throw new SmtpError(this.failure?.message ?? "the connection is no longer usable", { temporary: true, stage: "mail" });
    const ext = this.extensions;
    const maxSize = Number(ext.get("SIZE") ?? 0);
    if (ext.has("SIZE") && maxSize > 0 && body.length > maxSize) {
      throw new SmtpError(`message size ${body.length} exceeds the server's limit of ${maxSize}`, { temporary: false, stage: "mail", status: "5.3.4" });
    }
    const utf8Envelope = [envelope.from, ...envelope.recipients.map((r) => r.address)].some((a) => !isAscii(a));
    if (!ext.has("SMTPUTF8")) {
      // X.6.7 "non-ASCII addresses not permitted", X.6.9 "UTF-8 header message cannot be transferred" (RFC 6531 3.5).
      if (!isAscii(envelope.from)) {
        throw new SmtpError("the sender address is not ASCII and the server does not offer SMTPUTF8 (RFC 6531 3.2)", { temporary: false, stage: "mail", status: "5.6.7" });
      }
      if (utf8Envelope) {
        throw new SmtpError("the recipient address is not ASCII and the server does not offer SMTPUTF8 (RFC 6531 3.2)", { temporary: false, stage: "mail", status: "5.6.7" });
      }
      if (content.utf8Header) {
        throw new SmtpError("the message has UTF-8 header fields (in its header, or in a MIME part such as a returned message/global or message/global-headers), which need SMTPUTF8, and the server does not offer it (RFC 6531 3.2)", { temporary: false, stage: "mail", status: "5.6.9" });
      }
    }
    if (content.eightBit && !ext.has("8BITMIME")) {
      throw new SmtpError("the message has 8-bit data and the server does not offer 8BITMIME", { temporary: false, stage: "mail", status: "5.6.3" });
    }
    const dsn = ext.has("DSN");
    let mail = `MAIL FROM:<${envelope.from}>`;
    if (ext.has("SIZE")) mail += ` SIZE=${body.length}`;
    if (content.eightBit) mail += " BODY=8BITMIME";
    const smtpUtf8 = utf8Envelope || content.utf8Header;
    if (smtpUtf8) mail += " SMTPUTF8";
    if (dsn && envelope.ret) mail += ` RET=${envelope.ret}`;
    if (dsn && envelope.envid) mail += ` ENVID=${xtext(envelope.envid)}`;
    const rcpts = envelope.recipients.map((r) => {
      let line = `RCPT TO:<${r.address}>`;
      if (dsn && r.notify?.length) line += ` NOTIFY=${r.notify.join(",")}`;
      if (dsn && r.orcpt) line += ` ORCPT=${orcptParameter(r.orcpt, smtpUtf8)}`;
      return line;
    });
    this.transactions++;
    this.idle = false;
    try {
      return await withSpan("smtp transaction", { kind: SpanKind.CLIENT, attributes: this.spanAttributes({ "mail.recipients.count": rcpts.length, "mail.smtp.pipelining": ext.has("PIPELINING") ? 1 : 0 }) }, async (span) => {
        const result = await this.transaction(mail, rcpts, envelope, body);
        const refused = result.recipients.filter((r) => !r.accepted);
        span.setAttribute("mail.recipients.refused", refused.length);
        // Like an HTTP client span for a 4xx/5xx: the server said no (here, to some recipients).
        if (refused.length > 0) {
          const codes = [...new Set(refused.map((r) => r.reply.code))].join(", ");
          span.setStatus({ code: SpanStatusCode.ERROR, message: `${refused.length} of ${result.recipients.length} recipients refused (${codes})` });
        }
        return result;
      });
    } finally {
      this.idle = true;
      // A reply left unread (a second answer to the final dot) would be taken for the answer to the
      // next transaction's MAIL, and every later reply for the command before it: no reuse.
      if (this.replies.length > 0) {
        this.broken = true;
        this.failure ??= new Error(`the server said, unasked: ${formatRemoteReply(this.replies[0]!)}`);
      }
    }
  }

  private async transaction(mail: string, rcpts: string[], envelope: Envelope, body: Buffer): Promise<TransactionResult> {
    const t = this.options.timeouts;
    const ext = this.extensions;
    const result: TransactionResult = { recipients: [], data: null };
    // After a 421 the server closes the channel (RFC 5321 3.8): the commands after it get that answer, unread.
    let closing: Reply | null = null;
    const answer = async (reply: Promise<Reply>) => {
      const got = await reply;
      if (got.code === 421) closing = got;
      return got;
    };
    let mailReply: Reply;
    const rcptReplies: Reply[] = [];
    let dataReply: Reply;
    if (ext.has("PIPELINING")) {
      this.write(`${mail}\r\n${rcpts.join("\r\n")}\r\nDATA\r\n`);
      mailReply = await answer(this.readReply(t.command, "mail"));
      for (let i = 0; i < rcpts.length; i++) rcptReplies.push(closing ?? (await answer(this.readReply(t.command, "rcpt"))));
      dataReply = closing ?? (await answer(this.readReply(t.dataInit, "data")));
    } else {
      mailReply = await answer(this.command(mail, "mail"));
      if (positive(mailReply)) {
        for (const rcpt of rcpts) rcptReplies.push(closing ?? (await answer(this.command(rcpt, "rcpt"))));
      }
      dataReply = closing ?? (rcptReplies.some(positive)
        ? await answer(this.command("DATA", "data", t.dataInit))
        : { code: 554, enhanced: "5.5.1", text: "no valid recipients", line: "554 no valid recipients" });
    }
    const goAhead = dataReply.code >= 300 && dataReply.code < 400;
    const finish = async () => {
      if (closing) return;
      if (goAhead) await this.abortData();
      await this.reset();
    };
    if (!positive(mailReply)) {
      await finish();
      throw new SmtpError(`MAIL FROM: ${formatRemoteReply(mailReply)}`, { temporary: mailReply.code < 500, stage: "mail", reply: mailReply });
    }
    envelope.recipients.forEach((r, i) => {
      const reply = rcptReplies[i]!;
      // 552 to RCPT is the old "too many recipients" (RFC 5321 4.5.3.1.10): try again later.
      result.recipients.push({ address: r.address, reply, accepted: positive(reply), permanent: reply.code >= 500 && reply.code !== 552 });
    });
    if (!result.recipients.some((r) => r.accepted)) {
      await finish();
      return result;
    }
    if (!goAhead) {
      await finish();
      // DATA refused: every accepted recipient gets that reply.
      for (const r of result.recipients) {
        if (r.accepted) Object.assign(r, { reply: dataReply, accepted: false, permanent: dataReply.code >= 500 });
      }
      return result;
    }
    const final = await withSpan("smtp message", { kind: SpanKind.CLIENT, attributes: this.spanAttributes({ "mail.message.size": body.length }) }, async (span) => {
      const reply = await this.writeBody(body).then(
        () => {
          // A reply already here came before our end of data (the server answered mid-message,
          // a "552 message too big", and is likely closing): the session is done, whatever it says.
          if (this.replies.length > 0) this.retired = true;
          return this.readReply(t.dataEnd, "message");
        },
        (error: unknown) => {
          // The server answered before the end of the data and closed (a "552 message too big"):
          // its refusal is the outcome. A positive early reply is no acceptance of a message it never got whole.
          this.retired = true;
          const early = this.replies.shift();
          if (early && !positive(early)) return early;
          throw error;
        },
      );
      span.setAttribute("smtp.reply.code", reply.code);
      refusedStatus(span, reply);
      return reply;
    });
    result.data = final;
    for (const r of result.recipients) {
      if (!r.accepted) continue;
      r.reply = final;
      r.accepted = positive(final);
      r.permanent = final.code >= 500;
    }
    return result;
  }

  private async writeBody(body: Buffer): Promise<void> {
    const stuffer = new DotStuffer();
    const chunkSize = 65_536;
    for (let offset = 0; offset < body.length; offset += chunkSize) {
      const block = stuffer.push(body.subarray(offset, offset + chunkSize));
      // The last block goes out with the end of data in one write.
      if (offset + chunkSize >= body.length) return this.writeWithTimeout(Buffer.concat([block, stuffer.end()]));
      await this.writeWithTimeout(block);
    }
    await this.writeWithTimeout(stuffer.end());
  }

  /** Writes one block and waits for it to drain, at most the data block timeout; a connection closed meanwhile fails at once. */
  private writeWithTimeout(block: Buffer): Promise<void> {
    if (this.failure) return Promise.reject(new SmtpError(this.failure.message, { temporary: true, stage: "message" }));
    const socket = this.socket;
    if (socket.write(block)) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const done = (error: SmtpError | null) => {
        clearTimeout(timer);
        socket.off("drain", onDrain);
        socket.off("close", onClose);
        if (error) reject(error);
        else resolve();
      };
      const onDrain = () => done(null);
      // A closed socket never drains: without this, the wait would last the whole data block timeout.
      const onClose = () => done(new SmtpError(this.failure?.message ?? "connection closed by the server", { temporary: true, stage: "message", status: "4.4.2" }));
      const timer = setTimeout(() => {
        this.broken = true;
        socket.destroy();
        done(new SmtpError("timed out sending the message", { temporary: true, stage: "message", status: "4.4.2" }));
      }, this.options.timeouts.dataBlock);
      socket.once("drain", onDrain);
      socket.once("close", onClose);
    });
  }

  /** The server said 354 though the transaction cannot go on: send an empty message's end, then forget it. */
  private async abortData(): Promise<void> {
    this.write(".\r\n");
    await this.readReply(this.options.timeouts.dataEnd, "message").catch(() => undefined);
  }

  /** RSET after a failed transaction; a connection that cannot reset is not reused. */
  async reset(): Promise<void> {
    try {
      const reply = await this.command("RSET", "mail", 30_000);
      if (!positive(reply)) this.retired = true;
    } catch {
      this.broken = true;
    }
  }

  async quit(): Promise<void> {
    // Out of step with the server (a reply nobody read): nothing more is said.
    if (this.broken || this.replies.length > 0) return this.destroy();
    try {
      this.write("QUIT\r\n");
      await this.readReply(5_000, "mail").catch(() => undefined);
    } finally {
      this.destroy();
    }
  }

  destroy(): void {
    this.broken = true;
    this.socket.destroy();
  }
}

function connectSocket(options: ConnectOptions): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: options.address, port: options.port });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new SmtpError(`connection to ${options.address}:${options.port} timed out`, { temporary: true, stage: "connect", status: "4.4.1" }));
    }, options.timeouts.connect);
    socket.once("connect", () => {
      clearTimeout(timer);
      socket.removeAllListeners("error");
      resolve(socket);
    });
    socket.once("error", (error) => {
      clearTimeout(timer);
      reject(new SmtpError(`connect to ${options.address}:${options.port}: ${error.message}`, { temporary: true, stage: "connect", status: "4.4.1" }));
    });
  });
}

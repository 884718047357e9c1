import { randomBytes } from "node:crypto";
import type { AddressInfo, Server as NetServer, Socket } from "node:net";
import { SMTPServer, type SMTPServerAddress, type SMTPServerAuthentication, type SMTPServerDataStream, type SMTPServerSession } from "smtp-server";
import type { Bus } from "@mailstack/bus";
import { DirectoryCache, resolveRecipient as resolveWithDirectory, type Pool, type Resolution, type Route, type RouteRefusal } from "@mailstack/db";
import { Replies, parseAddress, pathEnd, reply, type AddressProblem, type SmtpReply } from "@mailstack/mail";
import { dispatchAccepted, newQueueId, type AcceptedMessage, type MessageSource, type NewDelivery } from "@mailstack/queue";
import { SpanKind, context, mailMetrics, trace, tracer, type Logger, type Span } from "@mailstack/telemetry";
import { ConnectionSlots } from "@mailstack/runtime";
import { AcceptBatcher } from "./batcher.ts";
import { BodyScanner, headerValue, normalizeLineEndings, receivedCount, withHeaderSection } from "./body.ts";
import { watchBus } from "./bus-health.ts";
import { GuardReplies, guardCommands, refuseArguments, refuseBareLf, refuseEmptyData, type CommandGuard, type GuardedConnection } from "./guard.ts";
import { checkParameters, storedOrcpt } from "./params.ts";
import { receivedHeader } from "./received.ts";
import { DispatchStamper } from "./stamper.ts";

/** Thrown by a hook to answer the client with this reply. */
export class SmtpError extends Error {
  readonly reply: SmtpReply;
  constructor(r: SmtpReply) {
    super(`${r.code} ${r.enhanced} ${r.text}`);
    this.name = "SmtpError";
    this.reply = r;
  }
}

export interface IntakeLimits {
  maxMessageSize: number;
  maxRecipients: number;
  maxFinalRecipients: number;
  maxLineLength: number;
  maxCommands: number;
  idleTimeoutMs: number;
  dataTimeoutMs: number;
  maxClients: number;
  maxClientsPerIp: number;
  perIpExempt: string[];
  greetingDelayMs: number;
  reverseDns: boolean;
  bareLineEndings: "reject" | "normalize";
  acceptConcurrency: number;
  acceptBatchMax: number;
  /** Message bytes all sessions together may hold in memory; past it a message gets 452 4.3.1. */
  maxBufferedBytes: number;
}

export const defaultLimits: IntakeLimits = {
  maxMessageSize: 50 * 1024 * 1024,
  maxRecipients: 100,
  maxFinalRecipients: 1000,
  maxLineLength: 1000,
  maxCommands: 20_000,
  idleTimeoutMs: 300_000,
  dataTimeoutMs: 600_000,
  maxClients: 1000,
  maxClientsPerIp: 50,
  perIpExempt: [],
  greetingDelayMs: 0,
  reverseDns: false,
  bareLineEndings: "reject",
  acceptConcurrency: 1,
  acceptBatchMax: 64,
  maxBufferedBytes: 512 * 1024 * 1024,
};

/** What the hooks see of a session. */
export interface IntakeSession {
  id: string;
  clientIp: string;
  clientHostname: string | null;
  helo: string | null;
  secure: boolean;
  /** The authenticated user (whatever `authenticate` returned), or null. */
  user: string | null;
  /** True when MAIL FROM carried SMTPUTF8. */
  smtpUtf8: boolean;
  /** The raw smtp-server session, for anything not covered above. */
  raw: SMTPServerSession;
}

export interface AcceptedRecipient {
  /** The RCPT TO address as parseAddress gives it: canonical quoting, domain lower-case, the local part's case kept. */
  recipient: string;
  routes: Route[];
  dsnNotify: string[] | null;
  dsnOrcpt: string | null;
}

export interface IncomingMessage {
  session: IntakeSession;
  /** The envelope sender as parseAddress gives it (the local part's case kept), '' for <>. */
  sender: string;
  recipients: AcceptedRecipient[];
  queueId: string;
  traceId: string;
  /** The message as received (dot-unstuffed, CRLF; a leading CRLF added when it had no header section), before our Received: header. */
  raw: Buffer;
}

export interface TransformResult {
  /** The message to store instead (for example with headers added). Our Received: goes on top of it. */
  raw?: Buffer;
  /** Folder for every local delivery (for example 'Junk' for DMARC quarantine). */
  folder?: string;
  /** Stored on messages.auth_results. */
  authResults?: Record<string, unknown>;
}

export interface IntakeOptions {
  /** Service name for events, logs and metrics ('mta-inbound', 'msa'). */
  service: string;
  source: Extract<MessageSource, "inbound" | "submission">;
  pool: Pool;
  bus: Bus;
  logger: Logger;
  /** Our host name: greeting, Received: headers. */
  hostname: string;
  banner?: string;
  port?: number;
  host?: string;
  /** 'starttls': plain with STARTTLS offered; 'implicit': TLS from the first byte (port 465); 'none': no TLS. */
  tlsMode?: "starttls" | "implicit" | "none";
  tls?: { key: string | Buffer; cert: string | Buffer };
  limits?: Partial<IntakeLimits>;
  /** AUTH: offered only when given. With required, MAIL/RCPT/DATA need a login first (530 5.7.0). */
  auth?: {
    methods?: string[];
    required?: boolean;
    /** Allow AUTH before STARTTLS (tests only). */
    allowInsecure?: boolean;
    /** Resolves the user name to store on the message, or null for bad credentials (535 5.7.8). Throw SmtpError for another reply (a 421 closes the connection). */
    authenticate(credentials: { method: string; username: string; password: string; session: IntakeSession }): Promise<string | null>;
    /**
     * Where AUTH is not required: whether this client may send without a login (MSA:
     * POP-before-SMTP). The bound on commands before a login then applies to the clients for
     * which it is false; asked once a client reaches the bound.
     */
    allowedWithoutLogin?(session: IntakeSession): Promise<boolean>;
  };
  /** MAIL FROM check (MSA: the sender belongs to the user). Throw SmtpError to refuse. */
  validateSender?(sender: string, session: IntakeSession): Promise<void>;
  /** Recipient lookups from memory, shared by a service's servers; each server starts its own when not given. */
  directory?: DirectoryCache;
  /** RCPT routing; the directory's resolveRecipient by default. */
  resolveRecipient?(address: string, session: IntakeSession): Promise<Resolution>;
  /**
   * Where mail to postmaster goes (RFC 5321 4.5.1): the bare `<postmaster>`, and postmaster at a
   * domain we serve that has no such account or alias. Default: postmaster@hostname, if served.
   */
  postmaster?: string;
  /** Whether recipients in domains we do not serve may be accepted (false: 554 5.7.1 relay denied). */
  allowRemote?: boolean | ((session: IntakeSession) => boolean);
  /** Last look at the message before it is committed. Throw SmtpError to refuse it. */
  transformMessage?(message: IncomingMessage): Promise<TransformResult | void>;
  /** Sweeper-independent hook after commit (tests, metrics). */
  onAccepted?(accepted: AcceptedMessage): void;
}

export interface IntakeServer {
  server: SMTPServer;
  /** Starts listening; resolves with the bound port (useful with port 0). */
  listen(): Promise<number>;
  port(): number;
  /** Group-commit figures: accept transactions committed, most messages in one. */
  stats(): { acceptTransactions: number; largestBatch: number };
  /** Serves this certificate to every TLS handshake from now on (a renewed one); sessions already in TLS keep theirs. */
  updateTls(tls: { key: string | Buffer; cert: string | Buffer }): void;
  /**
   * Stops accepting and waits for commits. A message already in DATA is received and answered
   * (up to graceMs); any other command gets 421 at once, and idle sessions get 421 after graceMs.
   */
  stop(graceMs?: number): Promise<void>;
}

// --- internals ------------------------------------------------------------------------------

type ConnectionInternals = GuardedConnection;

interface SessionState {
  commands: number;
  /** Commands other than AUTH (and its continuation lines) before a login, where AUTH is required or allowedWithoutLogin is given. */
  unauthenticated: number;
  /** allowedWithoutLogin said yes: no bound on commands before a login. */
  allowedWithoutLogin: boolean;
  /** Gives back this session's per-address slot (counted in onConnect), once. */
  releaseIp: (() => void) | null;
  connection: ConnectionInternals | null;
  sender: string | null;
  /**
   * The accepted recipients in order, by recipientKey. smtp-server's own list merges addresses
   * that differ only in case and keeps quoting variants apart, so it is used neither for the
   * deliveries nor for SMTP_MAX_RECIPIENTS: a remote `A@r` and `a@r` are two recipients (RFC 5321
   * 2.4), a mailbox of ours named again in another case or quoting is the same one.
   */
  recipients: Map<string, AcceptedRecipient>;
  finalCount: number;
  /** RCPTs refused with a 5xx since the session began or last had a message accepted. */
  refusedRecipients: number;
  span: Span | null;
}

const RELAY_TRICKS = new Set<AddressProblem>(["source-route", "percent-hack", "bang-path", "ip-literal", "quoted-at"]);
const OBSOLETE = new Set(["TURN", "SEND", "SOML", "SAML", "ETRN", "ATRN", "EXPN"]);
// smtp-server's own bound (10) counted AUTH continuation lines too and answered 421 4.4.2; ours replaces it.
const MAX_UNAUTHENTICATED_COMMANDS = 10;
// Then 421: probing addresses one RCPT after the other (a directory harvest) is cut short, as
// Postfix's smtpd_hard_error_limit does; the count restarts after each accepted message.
const MAX_REFUSED_RECIPIENTS = 20;
// RFC 5321 6.3: a message that has made this many hops is in a mail loop (a threshold of at least 100).
const MAX_HOPS = 100;

const R = {
  tooManyCommands: reply(421, "4.7.0", "Too many commands in one session, closing connection"),
  tooManyFromIp: reply(421, "4.7.0", "Too many connections from your address, try again later"),
  vrfy: reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery"),
  vrfySyntax: reply(501, "5.5.4", "Syntax: VRFY address"),
  tlsActive: reply(503, "5.5.1", "TLS already active"),
  // RFC 4954 section 6 (and 4: no AUTH inside a mail transaction).
  encryptionRequired: reply(538, "5.7.11", "Encryption required for requested authentication mechanism, issue STARTTLS first"),
  authInTransaction: reply(503, "5.5.1", "AUTH is not permitted during a mail transaction"),
  tooManyUnauthenticated: reply(421, "4.7.0", "Too many commands without authentication, closing connection"),
  bareLineEnding: reply(550, "5.6.11", "Bare CR or LF in message is not allowed, use CRLF line endings"),
  nul: reply(554, "5.6.0", "Message contains NUL bytes"),
  eightBitHeader: reply(550, "5.6.7", "Non-ASCII message headers need the SMTPUTF8 extension"),
  tooManyHops: reply(554, "5.4.6", `Too many hops (${MAX_HOPS} Received: fields), mail loop suspected`),
  dataTimeout: reply(421, "4.4.2", "DATA took too long, closing connection"),
  commandTimeout: reply(421, "4.4.2", "Command took too long, closing connection"),
  disabled: reply(550, "5.2.1", "Mailbox disabled"),
  loop: reply(550, "5.4.6", "Alias loop or chain too deep"),
  utf8Address: reply(553, "5.6.7", "Non-ASCII address needs the SMTPUTF8 extension"),
  // RFC 5321 4.5.3.1.10: over 64 octets of local part or 254 of mailbox.
  senderTooLong: reply(501, "5.1.7", "Path too long"),
  recipientTooLong: reply(501, "5.1.3", "Path too long"),
  badAuth: reply(535, "5.7.8", "Authentication credentials invalid"),
  tooManyRecipients: reply(452, "4.5.3", "Too many recipients"),
  tooManyFinal: reply(452, "4.5.3", "Too many recipients after alias expansion"),
  busy: reply(452, "4.3.1", "Insufficient system storage, try again later"),
  tooManyRefused: reply(421, "4.7.0", "Too many refused recipients, closing connection"),
};

function smtpError(r: SmtpReply): Error & { responseCode: number } {
  const error = new Error(`${r.enhanced} ${r.text}`) as Error & { responseCode: number };
  error.responseCode = r.code;
  return error;
}

/** The reply to a MAIL or RCPT address that parseAddress refused (relay tricks in RCPT are handled first). */
export function addressReply(problem: AddressProblem, verb: "MAIL" | "RCPT"): SmtpReply {
  if (problem === "utf8-not-allowed") return R.utf8Address;
  if (problem === "too-long") return verb === "MAIL" ? R.senderTooLong : R.recipientTooLong;
  return verb === "MAIL" ? Replies.badSenderSyntax : Replies.badRecipientSyntax;
}

function refusalReply(reason: RouteRefusal): SmtpReply {
  switch (reason) {
    case "relay-denied":
      return Replies.relayDenied;
    case "unknown-user":
      return Replies.unknownUser;
    case "disabled":
      return R.disabled;
    case "loop":
    case "too-deep":
      return R.loop;
  }
}

/** Undoes what smtp-server applied to the envelope from a MAIL command that was then refused. */
function forgetMailParameters(session: SMTPServerSession): void {
  const envelope = session.envelope as SMTPServerSession["envelope"] & { bodyType?: string; smtpUtf8?: boolean; requireTLS?: boolean };
  envelope.bodyType = "7bit";
  envelope.smtpUtf8 = false;
  envelope.requireTLS = false;
  if (envelope.dsn) {
    envelope.dsn.ret = null;
    envelope.dsn.envid = null;
  }
}

function randomTraceId(): string {
  return randomBytes(16).toString("hex");
}

/**
 * Creates an SMTP server with mailstack's policy (see index.ts for the contract).
 */
export function createIntakeServer(options: IntakeOptions): IntakeServer {
  const limits: IntakeLimits = { ...defaultLimits, ...options.limits };
  const { pool, bus, logger, service } = options;
  const states = new WeakMap<SMTPServerSession, SessionState>();
  // The total is smtp-server's maxClients; this bounds each client address.
  const perIp = new ConnectionSlots({ maxPerIp: limits.maxClientsPerIp, exempt: limits.perIpExempt });
  const batcher = new AcceptBatcher(pool, service, { concurrency: limits.acceptConcurrency, maxBatch: limits.acceptBatchMax });
  const busWatch = watchBus(bus);
  const stamper = new DispatchStamper(pool, logger);
  const ownDirectory = options.directory ? null : new DirectoryCache(pool);
  const directory = options.directory ?? ownDirectory!;
  const lookup = (address: string) => directory.lookup(address);
  const markDispatched = (ids: number[]) => stamper.mark(ids);
  const inFlight = new Set<Promise<unknown>>();
  // Message bytes held in memory by all sessions (bounded by maxBufferedBytes).
  let buffered = 0;
  const tlsMode = options.tlsMode ?? "starttls";
  const authOffered = !!options.auth;
  const hideAuthBeforeTls = authOffered && tlsMode === "starttls" && !options.auth?.allowInsecure;
  const authRequired = authOffered && !!options.auth?.required;
  const allowedWithoutLogin = authRequired ? undefined : options.auth?.allowedWithoutLogin;
  // Commands before a login are bounded where a login is needed, from everyone or from some.
  const boundUnauthenticated = authRequired || !!allowedWithoutLogin;

  /** The bare "postmaster" (RFC 5321 4.1.1.3) stands for postmaster at our host name. */
  const recipientAddress = (address: string): string => (address.toLowerCase() === "postmaster" ? `postmaster@${options.hostname}` : address);

  const stateOf = (session: SMTPServerSession): SessionState => {
    let state = states.get(session);
    if (!state) {
      state = { commands: 0, unauthenticated: 0, allowedWithoutLogin: false, releaseIp: null, connection: null, sender: null, recipients: new Map(), finalCount: 0, refusedRecipients: 0, span: null };
      states.set(session, state);
    }
    return state;
  };

  const view = (session: SMTPServerSession): IntakeSession => ({
    id: session.id,
    clientIp: session.remoteAddress,
    clientHostname: session.clientHostname && !session.clientHostname.startsWith("[") ? session.clientHostname : null,
    helo: session.hostNameAppearsAs || null,
    secure: !!session.secure,
    user: typeof session.user === "string" ? session.user : null,
    smtpUtf8: !!session.envelope?.smtpUtf8,
    raw: session,
  });

  const endSpan = (state: SessionState, outcome: string) => {
    if (!state.span) return;
    state.span.setAttribute("smtp.outcome", outcome);
    state.span.end();
    state.span = null;
  };

  // When each connection's last complete command line came in (see the command deadline below).
  const lastCommandAt = new WeakMap<GuardedConnection, number>();

  const guard: CommandGuard = (connection, command, callback, original) => {
    lastCommandAt.set(connection, Date.now());
    const next = () => connection._whenWritable(callback ?? (() => undefined));
    // The library's own checks come first while the greeting is pending, during TLS
    // negotiation and for AUTH continuation lines.
    if (!connection._ready || connection._upgrading || connection._nextHandler) {
      return original.call(connection, command, callback);
    }
    const state = stateOf(connection.session);
    state.connection = connection;
    const answer = (r: SmtpReply) => {
      connection.send(r.code, `${r.enhanced} ${r.text}`);
      if (r.code !== 421) setImmediate(next);
    };
    if (++state.commands > limits.maxCommands) return answer(R.tooManyCommands);
    if (refuseBareLf(connection, answer)) return;

    const line = command.toString("latin1");
    const verb = line.split(" ", 1)[0]!.toUpperCase();
    if (OBSOLETE.has(verb)) return answer(Replies.commandNotImplemented);
    if (verb === "VRFY") return answer(line.trim().includes(" ") ? R.vrfy : R.vrfySyntax);
    if (verb === "STARTTLS" && tlsMode === "implicit") return answer(R.tlsActive);
    if (boundUnauthenticated && !connection.session.user && verb !== "AUTH" && !state.allowedWithoutLogin && ++state.unauthenticated > MAX_UNAUTHENTICATED_COMMANDS) {
      if (!allowedWithoutLogin) return answer(R.tooManyUnauthenticated);
      allowedWithoutLogin(view(connection.session)).then(
        (allowed) => {
          if (!allowed) return answer(R.tooManyUnauthenticated);
          state.allowedWithoutLogin = true;
          return afterUnauthenticatedBound(connection, command, callback, original, line, verb, answer);
        },
        (error) => {
          logger.warn({ err: error }, "could not tell whether the client may send without a login");
          answer(R.tooManyUnauthenticated);
        },
      );
      return;
    }
    return afterUnauthenticatedBound(connection, command, callback, original, line, verb, answer);
  };

  const afterUnauthenticatedBound = (
    connection: GuardedConnection, command: Buffer, callback: (() => void) | undefined, original: Parameters<CommandGuard>[3],
    line: string, verb: string, answer: (r: SmtpReply) => void,
  ) => {
    if (verb === "AUTH" && authOffered && connection.hostNameAppearsAs) {
      if (hideAuthBeforeTls && !connection.secure) return answer(R.encryptionRequired);
      if (connection.session.envelope?.mailFrom) return answer(R.authInTransaction);
    }
    if ((verb === "MAIL" || verb === "RCPT") && connection.hostNameAppearsAs && (!authRequired || connection.session.user)) {
      // Before smtp-server, which ignores unknown parameters, decodes xtext unchecked and
      // answers a bad parameter value as a bad address. RCPT before MAIL is its 503.
      const problem = verb === "MAIL" || connection.session.envelope?.mailFrom ? checkParameters(verb, line, { auth: authOffered, smtpUtf8: !!connection.session.envelope?.smtpUtf8 }) : null;
      if (problem) return answer(problem);
    }
    if (verb === "EHLO" && hideAuthBeforeTls && !connection.secure) {
      // The library lists AUTH before STARTTLS too (AUTH itself is answered 538 above); keep it off the EHLO reply.
      const send = connection.send;
      connection.send = (code, data, context) => {
        connection.send = send;
        const lines = Array.isArray(data) ? data.filter((l) => !/^AUTH\b/i.test(l)) : data;
        send.call(connection, code, lines, context);
      };
    }
    if (verb === "RCPT") {
      const to = /^RCPT\s+TO:\s*/i.exec(line);
      const end = to ? pathEnd(line.slice(to[0].length)) : -1;
      if (to && end > 0) {
        const address = line.slice(to[0].length + 1, to[0].length + end - 1);
        if (address.startsWith("@")) return answer(Replies.relayDenied);
        const parsed = parseAddress(address, { utf8: true });
        if (!parsed.ok && RELAY_TRICKS.has(parsed.problem)) return answer(Replies.relayDenied);
      }
    }
    if (refuseEmptyData(connection, verb, answer) || refuseArguments(verb, line, answer)) return;
    return original.call(connection, command, callback);
  };

  const onConnect = (session: SMTPServerSession, callback: (error?: Error | null) => void) => {
    const state = stateOf(session);
    const ip = session.remoteAddress;
    // On an implicit TLS port the count began with the TCP connection (admitBeforeHandshake).
    if (tlsMode !== "implicit") {
      const release = perIp.admit(ip);
      if (!release) return callback(smtpError(R.tooManyFromIp));
      state.releaseIp = release;
    }
    callback();
  };

  /**
   * On an implicit TLS port smtp-server holds each socket through its TLS handshake (up to the
   * idle timeout) before a session, and onConnect, exist, bounded only by SMTP_MAX_CLIENTS in
   * all: one address that never sends a ClientHello could take every slot. There the per-IP
   * count starts with the TCP connection and ends when it closes; over the limit the socket is
   * dropped (nothing can be said before a handshake).
   */
  const admitBeforeHandshake = (listener: NetServer) => {
    const library = listener.listeners("connection") as Array<(socket: Socket) => void>;
    listener.removeAllListeners("connection");
    listener.on("connection", (socket: Socket) => {
      const ip = socket.remoteAddress ?? "";
      const release = perIp.admit(ip);
      if (!release) {
        logger.debug({ ip }, "too many connections from one address; dropped before the TLS handshake");
        socket.on("error", () => undefined);
        socket.destroy();
        return;
      }
      socket.once("close", release);
      for (const handler of library) handler.call(listener, socket);
    });
  };

  const onClose = (session: SMTPServerSession) => {
    const state = states.get(session);
    if (!state) return;
    state.releaseIp?.();
    state.releaseIp = null;
    endSpan(state, "closed");
  };

  const onAuth = (auth: SMTPServerAuthentication, session: SMTPServerSession, callback: (error: Error | null | undefined, response?: { user: string }) => void) => {
    const hook = options.auth;
    if (!hook || (auth.method !== "PLAIN" && auth.method !== "LOGIN")) return callback(smtpError(R.badAuth));
    hook
      .authenticate({ method: auth.method, username: auth.username ?? "", password: auth.password ?? "", session: view(session) })
      .then(
        (user) => (user ? callback(null, { user }) : callback(smtpError(R.badAuth))),
        (error) => {
          if (error instanceof SmtpError) return callback(smtpError(error.reply));
          logger.warn({ err: error }, "authentication backend failed");
          callback(smtpError(reply(454, "4.7.0", "Temporary authentication failure")));
        },
      );
  };

  const onMailFrom = (address: SMTPServerAddress, session: SMTPServerSession, done: (error?: Error | null) => void) => {
    const state = stateOf(session);
    endSpan(state, "abandoned");
    state.recipients.clear();
    state.finalCount = 0;
    state.sender = null;
    // smtp-server applies SMTPUTF8, BODY, RET and ENVID to the envelope before asking us; a
    // refused MAIL must not leave them for the next transaction.
    const callback = (error?: Error | null) => {
      if (error) forgetMailParameters(session);
      done(error);
    };
    let sender = "";
    if (address.address) {
      const parsed = parseAddress(address.address, { utf8: !!session.envelope.smtpUtf8 });
      if (!parsed.ok) return callback(smtpError(addressReply(parsed.problem, "MAIL")));
      sender = parsed.address;
    }
    const check = options.validateSender ? options.validateSender(sender, view(session)) : Promise.resolve();
    check.then(
      () => {
        state.sender = sender;
        state.span = tracer.startSpan("smtp transaction", {
          kind: SpanKind.SERVER,
          attributes: { "smtp.service": service, "client.address": session.remoteAddress, "smtp.mail_from": sender },
        });
        callback();
      },
      (error) => callback(hookError(error, "validateSender")),
    );
  };

  const hookError = (error: unknown, where: string): Error & { responseCode: number } => {
    if (error instanceof SmtpError) return smtpError(error.reply);
    logger.error({ err: error, where }, "SMTP hook failed");
    return smtpError(Replies.localError);
  };

  /** Where mail to postmaster goes when the directory has no such address (RFC 5321 4.5.1). */
  let postmasterWarned = false;
  const resolvePostmaster = async (): Promise<Resolution> => {
    const target = options.postmaster || `postmaster@${options.hostname}`;
    // A configured address may be anywhere, like an alias target; the default only here.
    const resolution = await resolveWithDirectory(pool, target, { allowRemote: !!options.postmaster, lookup });
    if (!resolution.ok) {
      if (!postmasterWarned) logger.warn({ target, reason: resolution.reason }, "mail to postmaster cannot be routed: set SMTP_POSTMASTER to an address that can");
      postmasterWarned = true;
      return { ok: false, reason: "unknown-user" };
    }
    return resolution;
  };

  /**
   * Which recipient an RCPT names: a mailbox in a domain we serve by its lower-cased key (ours are
   * case-insensitive, and parseAddress has undone the quoting), any other by the address as given
   * (only its own host may fold its case). The bare `<postmaster>` stands apart: it may be routed
   * elsewhere than postmaster@hostname.
   */
  const recipientKey = async (given: string, parsed: { address: string; key: string }): Promise<string> => {
    if (given.toLowerCase() === "postmaster") return "postmaster";
    return (await directory.lookup(parsed.key)).localDomain ? parsed.key : parsed.address;
  };

  const onRcptTo = (address: SMTPServerAddress, session: SMTPServerSession, callback: (error?: Error | null) => void) => {
    const refuse = (r: SmtpReply) => {
      const state = stateOf(session);
      if (r.code >= 500 && ++state.refusedRecipients > MAX_REFUSED_RECIPIENTS) return callback(smtpError(R.tooManyRefused));
      callback(smtpError(r));
    };
    const parsed = parseAddress(recipientAddress(address.address), { utf8: !!session.envelope.smtpUtf8 });
    if (!parsed.ok) {
      if (RELAY_TRICKS.has(parsed.problem)) return refuse(Replies.relayDenied);
      return refuse(addressReply(parsed.problem, "RCPT"));
    }
    addRecipient(address, session, parsed).then(
      (refusal) => (refusal ? refuse(refusal) : callback(null)),
      (error) => callback(hookError(error, "resolveRecipient")),
    );
  };

  /** Routes an RCPT and adds it to the transaction; resolves with the reply that refuses it, or null. */
  const addRecipient = async (address: SMTPServerAddress, session: SMTPServerSession, parsed: { address: string; key: string; domain: string }): Promise<SmtpReply | null> => {
    const state = stateOf(session);
    const key = await recipientKey(address.address, parsed);
    // A recipient named again is accepted again (RFC 5321 allows it) and kept as first given
    // (address form, NOTIFY, ORCPT); it counts once: toward SMTP_MAX_RECIPIENTS, the final
    // recipients, a submission rate limit (the routing hook is not asked again) and Received's `for`.
    if (state.recipients.has(key)) return null;
    if (state.recipients.size >= limits.maxRecipients) return R.tooManyRecipients;
    const s = view(session);
    const allowRemote = typeof options.allowRemote === "function" ? options.allowRemote(s) : !!options.allowRemote;
    const resolve = async (): Promise<Resolution> => {
      // The bare "postmaster" is ours whatever the session may relay to.
      if (address.address.toLowerCase() === "postmaster") return resolvePostmaster();
      const resolution = options.resolveRecipient
        ? await options.resolveRecipient(parsed.address, s)
        : await resolveWithDirectory(pool, parsed.address, { allowRemote, lookup });
      const unknownPostmaster = !resolution.ok && resolution.reason === "unknown-user" && parsed.key === `postmaster@${parsed.domain}`;
      return unknownPostmaster && (await directory.lookup(parsed.key)).localDomain ? resolvePostmaster() : resolution;
    };
    const resolution = await resolve();
    if (!resolution.ok) return refusalReply(resolution.reason);
    const finalCount = state.finalCount + resolution.routes.length;
    if (finalCount > limits.maxFinalRecipients) return R.tooManyFinal;
    state.finalCount = finalCount;
    state.recipients.set(key, {
      recipient: parsed.address,
      routes: resolution.routes,
      dsnNotify: address.dsn?.notify ?? null,
      dsnOrcpt: address.dsn?.orcpt ? storedOrcpt(address.dsn.orcpt) : null,
    });
    return null;
  };

  const onData = (stream: SMTPServerDataStream, session: SMTPServerSession, callback: (error?: Error | null, message?: string) => void) => {
    const work = receive(stream, session).then(
      (message) => {
        mailMetrics.smtpReplies.inc({ service, class: "2xx" });
        callback(null, message);
      },
      (error) => {
        const failure = error instanceof SmtpError ? smtpError(error.reply) : hookError(error, "onData");
        mailMetrics.smtpReplies.inc({ service, class: failure.responseCode >= 500 ? "5xx" : "4xx" });
        callback(failure);
      },
    );
    inFlight.add(work);
    void work.finally(() => inFlight.delete(work));
  };

  const receive = async (stream: SMTPServerDataStream, session: SMTPServerSession): Promise<string> => {
    const hold = { bytes: 0 };
    try {
      return await receiveHeld(stream, session, hold);
    } finally {
      buffered -= hold.bytes;
    }
  };

  const receiveHeld = async (stream: SMTPServerDataStream, session: SMTPServerSession, hold: { bytes: number }): Promise<string> => {
    const state = stateOf(session);
    const s = view(session);
    const busUp = busWatch.connected();
    const scanner = new BodyScanner();
    const chunks: Buffer[] = [];
    let received = 0;
    let overBudget = false;
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      const connection = state.connection;
      if (connection) connection.send(R.dataTimeout.code, `${R.dataTimeout.enhanced} ${R.dataTimeout.text}`);
      stream.destroy();
    }, limits.dataTimeoutMs);
    timer.unref();
    try {
      await new Promise<void>((resolve, reject) => {
        stream.on("data", (chunk: Buffer) => {
          received += chunk.length;
          if (received > limits.maxMessageSize || stream.sizeExceeded) return; // keep draining, store nothing
          if (!overBudget && buffered + chunk.length > limits.maxBufferedBytes) {
            // Too much mail in memory at once: drop what this message holds, drain the rest, answer 452.
            overBudget = true;
            buffered -= hold.bytes;
            hold.bytes = 0;
            chunks.length = 0;
          }
          if (overBudget) return;
          buffered += chunk.length;
          hold.bytes += chunk.length;
          scanner.push(chunk);
          chunks.push(chunk);
        });
        stream.once("end", resolve);
        stream.once("error", reject);
        stream.once("close", () => (stream.readableEnded ? resolve() : reject(new Error("connection closed during DATA"))));
      });
    } catch (error) {
      if (timedOut) throw new SmtpError(R.dataTimeout);
      throw error;
    } finally {
      clearTimeout(timer);
    }
    // Over the limit: the library answers 552 5.3.4 itself (rejectOversized); nothing is kept.
    if (stream.sizeExceeded || received > limits.maxMessageSize) throw new SmtpError(Replies.messageTooBig);
    if (overBudget) throw new SmtpError(R.busy);
    scanner.finish();
    if (scanner.nul) throw new SmtpError(R.nul);
    let raw: Buffer = Buffer.concat(chunks, received);
    let eightBitHeader = scanner.eightBitHeader;
    if (scanner.bareLineEnding) {
      if (limits.bareLineEndings === "reject") throw new SmtpError(R.bareLineEnding);
      raw = normalizeLineEndings(raw);
      // The scanner found the header section's end by CRLF CRLF only: look again at the normalised message.
      const rescan = new BodyScanner();
      rescan.push(raw);
      eightBitHeader = rescan.eightBitHeader;
    }
    if (eightBitHeader && !session.envelope.smtpUtf8) throw new SmtpError(R.eightBitHeader);
    raw = withHeaderSection(raw);
    if (receivedCount(raw) >= MAX_HOPS) throw new SmtpError(R.tooManyHops);
    if (!busUp || !busWatch.connected()) throw new SmtpError(Replies.localError);

    const recipients = [...state.recipients.values()];
    if (recipients.length === 0) throw new SmtpError(GuardReplies.noValidRecipients);

    const span = state.span ?? tracer.startSpan("smtp transaction", { kind: SpanKind.SERVER });
    state.span = null;
    try {
      let traceId = span.spanContext().traceId;
      let traceContext = trace.setSpan(context.active(), span);
      if (!trace.isSpanContextValid(span.spanContext())) {
        // No tracing SDK: still give the journey an id of its own, carried the same way.
        traceId = randomTraceId();
        traceContext = trace.setSpanContext(context.active(), { traceId, spanId: randomBytes(8).toString("hex"), traceFlags: 0 });
      }
      const queueId = newQueueId();
      span.setAttribute("smtp.queue_id", queueId);
      const transformed = options.transformMessage
        ? ((await options.transformMessage({ session: s, sender: state.sender ?? "", recipients, queueId, traceId, raw })) ?? {})
        : {};
      const body = transformed.raw ?? raw;
      // `for` only when the message goes to one mailbox (RFC 5321 4.4 privacy note), however many
      // RCPTs named it; deliveries are one per route address (acceptMessages).
      const finalAddresses = new Set(recipients.flatMap((r) => r.routes.map((route) => route.address)));
      const header = receivedHeader({
        helo: s.helo,
        clientHostname: s.clientHostname,
        clientIp: s.clientIp,
        hostname: options.hostname,
        protocol: session.transmissionType || "ESMTP",
        smtpUtf8: s.smtpUtf8,
        queueId,
        traceId,
        recipient: finalAddresses.size === 1 ? recipients[0]!.recipient : null,
        authenticatedUser: s.user,
      });
      const stored = Buffer.concat([Buffer.from(header, "utf8"), body]);
      const deliveries: NewDelivery[] = recipients.flatMap((r) =>
        r.routes.map((route) => ({
          recipient: r.recipient,
          route,
          ...(transformed.folder && route.kind === "local" ? { folder: transformed.folder } : {}),
          dsnNotify: r.dsnNotify,
          dsnOrcpt: r.dsnOrcpt,
        })),
      );
      const dsn = session.envelope.dsn;
      let accepted: AcceptedMessage;
      try {
        accepted = await batcher.accept(
          {
            raw: stored,
            envelopeFrom: state.sender ?? "",
            source: options.source,
            clientIp: s.clientIp,
            clientHelo: s.helo,
            authUser: s.user,
            messageIdHeader: headerValue(body, "message-id"),
            authResults: transformed.authResults ?? null,
            dsnEnvid: dsn?.envid ?? null,
            dsnRet: dsn?.ret === "FULL" || dsn?.ret === "HDRS" ? dsn.ret : null,
            traceId,
            traceSpanId: trace.isSpanContextValid(span.spanContext()) ? span.spanContext().spanId : null,
            queueId,
          },
          deliveries,
        );
      } catch (error) {
        logger.error({ err: error, queueId }, "accept transaction failed");
        throw new SmtpError(Replies.localError);
      }
      mailMetrics.messagesAccepted.inc({ service });
      state.refusedRecipients = 0;
      logger.info({ queueId, messageId: accepted.messageId, deliveries: accepted.deliveries.length, size: stored.length, trace_id: traceId }, "message accepted");
      // Dispatch follows the commit; if it fails the sweeper republishes.
      const dispatch = context.with(traceContext, () => dispatchAccepted(bus, pool, accepted, { markDispatched })).catch((error) =>
        logger.warn({ err: error, queueId }, "dispatch failed; the sweeper will republish"),
      );
      inFlight.add(dispatch);
      void dispatch.finally(() => inFlight.delete(dispatch));
      options.onAccepted?.(accepted);
      span.setAttribute("smtp.outcome", "accepted");
      return `2.0.0 Ok: queued as ${queueId}`;
    } catch (error) {
      span.setAttribute("smtp.outcome", "refused");
      if (error instanceof SmtpError) span.setAttribute("smtp.reply", error.message);
      throw error;
    } finally {
      span.end();
    }
  };

  const disabled = ["XCLIENT", "XFORWARD", "WIZ", "SHELL", "KILL"];
  if (!authOffered) disabled.push("AUTH");
  if (tlsMode !== "starttls") disabled.push("STARTTLS");

  const server = new SMTPServer({
    name: options.hostname,
    banner: options.banner || "",
    secure: tlsMode === "implicit",
    ...(options.tls ? { key: options.tls.key, cert: options.tls.cert } : {}),
    size: limits.maxMessageSize,
    rejectOversized: true,
    // SMTP_MAX_RECIPIENTS is counted in onRcptTo, by recipient as we tell them apart.
    maxRecipients: 0,
    maxCommandLength: limits.maxLineLength - 2,
    maxClients: limits.maxClients,
    socketTimeout: limits.idleTimeoutMs,
    closeTimeout: 30_000,
    disableReverseLookup: !limits.reverseDns,
    hideENHANCEDSTATUSCODES: false,
    hideDSN: false,
    hidePIPELINING: false,
    hide8BITMIME: false,
    hideSMTPUTF8: false,
    disabledCommands: disabled,
    authMethods: options.auth?.methods ?? ["PLAIN", "LOGIN"],
    authOptional: !options.auth?.required,
    maxAllowedUnauthenticatedCommands: Number.MAX_SAFE_INTEGER,
    allowInsecureAuth: !!options.auth?.allowInsecure,
    logger: false,
    onConnect,
    onClose,
    onAuth,
    onMailFrom,
    onRcptTo,
    onData,
    // Our settings that the patched library reads (patches/smtp-server@*.patch).
    ...({ greetingDelay: limits.greetingDelayMs } as object),
  });
  guardCommands(server, guard);
  if (tlsMode === "implicit") admitBeforeHandshake(server.server);

  // The library's idle timeout restarts with every byte, so a client that sends a command one
  // byte every few minutes (slowloris) kept its session, and a slot, for ever. A complete command
  // line is due within SMTP_IDLE_TIMEOUT of the previous one (or of the connection), the STARTTLS
  // handshake included; time spent waiting for us (a hook, a message being received or
  // decided, which has SMTP_DATA_TIMEOUT) does not count.
  const deadlineSweep = setInterval(() => {
    const now = Date.now();
    for (const connection of (server as unknown as { connections: Set<GuardedConnection & { _handlerPending?: boolean; _dataStream?: unknown; _closing?: boolean }> }).connections) {
      const since = lastCommandAt.get(connection);
      if (since === undefined || connection._handlerPending || connection._dataStream) {
        lastCommandAt.set(connection, now);
      } else if (now - since > limits.idleTimeoutMs && !connection._closing) {
        connection.send(R.commandTimeout.code, `${R.commandTimeout.enhanced} ${R.commandTimeout.text}`);
      }
    }
  }, Math.max(50, Math.min(5_000, limits.idleTimeoutMs / 10)));
  deadlineSweep.unref();

  server.on("error", (error) => logger.debug({ err: error }, "smtp connection error"));

  let boundPort = 0;
  return {
    server,
    updateTls(tls) {
      server.updateSecureContext({ key: tls.key, cert: tls.cert });
    },
    async listen() {
      await ownDirectory?.start();
      return new Promise((resolve, reject) => {
        server.server.once("error", reject);
        server.listen(options.port ?? 0, options.host ?? "127.0.0.1", () => {
          server.server.off("error", reject);
          boundPort = (server.server.address() as AddressInfo).port;
          resolve(boundPort);
        });
      });
    },
    port: () => boundPort,
    stats: () => ({ acceptTransactions: batcher.stats.transactions, largestBatch: batcher.stats.largestBatch }),
    async stop(graceMs = 10_000) {
      clearInterval(deadlineSweep);
      (server.options as { closeTimeout?: number }).closeTimeout = graceMs;
      await new Promise<void>((resolve) => server.close(() => resolve()));
      while (inFlight.size > 0) await Promise.allSettled([...inFlight]);
      await batcher.idle();
      await stamper.idle();
      busWatch.stop();
      await ownDirectory?.stop();
    },
  };
}

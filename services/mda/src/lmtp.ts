import type { AddressInfo } from "node:net";
import { SMTPServer, type SMTPServerAddress, type SMTPServerDataStream, type SMTPServerSession } from "smtp-server";
import { Replies, parseAddress, parseReply, replyClass, type SmtpReply } from "@mailstack/mail";
import { resolveRecipient, type Pool, type Route } from "@mailstack/db";
import { acceptMessage, dispatchAccepted, newQueueId, type AcceptedMessage, type NewDelivery } from "@mailstack/queue";
import { BodyScanner, addressReply, guardCommands, headerValue, normalizeLineEndings, receivedHeader, refuseArguments, refuseBareLf, refuseEmptyData, withHeaderSection, type CommandGuard } from "@mailstack/smtp-intake";
import { SpanKind, currentSpanId, currentTraceId, mailMetrics, withSpan } from "@mailstack/telemetry";
import { deliverLocal, SERVICE, type DeliverContext, type Outcome } from "./deliver.ts";
import { allowedClient, networkList } from "./networks.ts";

export interface LmtpOptions {
  port: number;
  host: string;
  /** Largest message accepted, in bytes; larger ones get 552 for every recipient. */
  maxSize: number;
  maxClients: number;
  /** RCPTs accepted per transaction, repeats included; default 1000. */
  maxRecipients?: number;
  /** Idle time before a session is closed, ms. */
  socketTimeout: number;
  hostname: string;
  /** Client networks allowed to connect (CIDR or single addresses); LMTP has no authentication. */
  allowedNetworks: string[];
  /** Bare CR or LF in a message: refused with 550 5.6.11 per recipient, or rewritten as CRLF. */
  bareLineEndings?: "reject" | "normalize";
  /** A full mailbox answers 452 4.2.2 (the client retries) instead of 552 5.2.2. */
  quotaFullTempfail?: boolean;
  /** How long (ms) a retransmission of the same message is recognised and not filed again; 0 turns it off. */
  duplicateWindow?: number;
}

export interface LmtpServer {
  port: number;
  stop(): Promise<void>;
}

type ReplyError = Error & { responseCode: number };

function replyError(code: number, text: string): ReplyError {
  const error = new Error(text) as ReplyError;
  error.responseCode = code;
  return error;
}

function refusal(r: SmtpReply): ReplyError {
  return replyError(r.code, `${r.enhanced} ${r.text}`);
}

const R = {
  notLmtp: { code: 500, enhanced: "5.5.1", text: "This is an LMTP server: say LHLO (RFC 2033)" },
  bareLineEnding: { code: 550, enhanced: "5.6.11", text: "Bare CR or LF in message is not allowed, use CRLF line endings" },
  nul: { code: 554, enhanced: "5.6.0", text: "Message contains NUL bytes" },
} satisfies Record<string, SmtpReply>;

/** The per-recipient LMTP reply (RFC 2033 §4.2) for the outcomes of that recipient's deliveries. */
export function replyFor(outcomes: Array<Outcome | "queued">): string | ReplyError {
  type Failure = Extract<Outcome, { status: "bounced" | "tempfail" }>;
  const failures = outcomes.filter((o): o is Failure => o !== "queued" && (o.status === "bounced" || o.status === "tempfail"));
  if (failures.length > 0 && failures.length === outcomes.length) return replyError(failures[0]!.code, `${failures[0]!.enhanced} ${failures[0]!.text}`);
  if (outcomes.every((o) => o !== "queued")) return "2.0.0 Delivered";
  return "2.0.0 Queued for delivery";
}

interface ReadResult {
  raw: Buffer | null;
  refusal: SmtpReply | null;
}

async function readMessage(stream: SMTPServerDataStream, options: LmtpOptions): Promise<ReadResult> {
  const chunks: Buffer[] = [];
  const scanner = new BodyScanner();
  let size = 0;
  for await (const chunk of stream) {
    size += (chunk as Buffer).length;
    // Past the limit the rest is read and dropped, never kept in memory.
    if (size > options.maxSize) continue;
    scanner.push(chunk as Buffer);
    chunks.push(chunk as Buffer);
  }
  if (stream.sizeExceeded || size > options.maxSize) return { raw: null, refusal: Replies.messageTooBig };
  scanner.finish();
  // The same guards as the SMTP ports (smuggling material, NUL); 8-bit headers are let through:
  // the MTA in front accepted them already and LMTP is its last hop.
  if (scanner.nul) return { raw: null, refusal: R.nul };
  let raw: Buffer = Buffer.concat(chunks, size);
  if (scanner.bareLineEnding) {
    if ((options.bareLineEndings ?? "reject") === "reject") return { raw: null, refusal: R.bareLineEnding };
    raw = normalizeLineEndings(raw);
  }
  return { raw, refusal: null };
}

/** Our Received: field (RFC 5321 4.4), the same builder as the SMTP ports', with "LMTP" (or "UTF8LMTP") as the "with" type (RFC 3848, RFC 6531). */
function lmtpReceived(session: SMTPServerSession, hostname: string, queueId: string, traceId: string | undefined): string {
  return receivedHeader({
    helo: session.hostNameAppearsAs || null,
    clientHostname: null,
    clientIp: session.remoteAddress.replace(/^::ffff:(?=\d+\.\d+\.\d+\.\d+$)/i, ""),
    hostname,
    protocol: "LMTP",
    smtpUtf8: Boolean((session.envelope as { smtpUtf8?: boolean }).smtpUtf8),
    queueId,
    traceId: traceId ?? null,
  });
}

interface EarlierCopy {
  queueId: string;
  state: string;
  reply: SmtpReply | null;
}

/**
 * The copies already made of the same message, by final recipient: a client that lost our
 * replies after the final dot (a dropped connection, a timeout) sends the message again, and
 * RFC 2033 clients such as Postfix then log "message may be sent more than once". The same
 * Message-ID, envelope sender and bytes through LMTP within the window is that retransmission:
 * its recipients get the earlier outcome again instead of a second copy. They are matched by
 * final recipient, not by RCPT, because a copy serves every RCPT that reached that mailbox (an
 * alias and its member named alone). A copy that was cancelled because the client was told to
 * retry (452) is not an earlier outcome.
 */
async function earlierCopies(pool: Pool, raw: Buffer, from: string, windowMs: number): Promise<Map<string, EarlierCopy[]>> {
  const found = new Map<string, EarlierCopy[]>();
  const messageId = headerValue(raw, "message-id");
  if (!messageId || windowMs <= 0) return found;
  const result = await pool.query<{ queue_id: string; final_recipient: string; state: string; last_reply: string | null }>(
    `SELECT m.queue_id, d.final_recipient, d.state, d.last_reply
       FROM messages m JOIN deliveries d ON d.message_id = m.id
      WHERE m.message_id_header = $1 AND m.source = 'lmtp' AND m.envelope_from = $2
        AND m.received_at > now() - make_interval(secs => $3) AND length(m.raw) > $4
        AND substring(m.raw from length(m.raw) - $4 + 1) = $5 AND d.state <> 'cancelled'
      ORDER BY m.id, d.id`,
    [messageId, from, windowMs / 1000, raw.length, raw],
  );
  for (const row of result.rows) {
    const list = found.get(row.final_recipient) ?? [];
    list.push({ queueId: row.queue_id, state: row.state, reply: row.last_reply ? parseReply(row.last_reply) : null });
    found.set(row.final_recipient, list);
  }
  return found;
}

/** The reply given again to an RCPT whose every final recipient has an earlier copy. */
function earlierReply(copies: EarlierCopy[]): string | ReplyError {
  const queueId = copies[0]!.queueId;
  if (copies.every((c) => c.state === "bounced" && c.reply)) return refusal(copies[0]!.reply!);
  if (copies.every((c) => c.state === "delivered" || c.state === "bounced")) return `2.0.0 Delivered (${queueId}), a copy of a message already received`;
  return `2.0.0 Queued for delivery (${queueId}), a copy of a message already received`;
}

/**
 * Screens each command line before smtp-server runs it, with the SMTP ports' checks: a command
 * line ended by a bare LF is refused, and DATA without an accepted recipient closes the
 * connection, so that a body pipelined behind it is never run as commands (a transaction
 * injected by the message's author). HELO and EHLO are not LMTP (RFC 2033 4.1).
 */
const lmtpGuard: CommandGuard = (connection, command, callback, original) => {
  if (!connection._ready || connection._upgrading || connection._nextHandler) return original.call(connection, command, callback);
  const answer = (r: SmtpReply) => {
    connection.send(r.code, `${r.enhanced} ${r.text}`);
    setImmediate(() => connection._whenWritable(callback ?? (() => undefined)));
  };
  if (refuseBareLf(connection, answer)) return;
  const line = command.toString("latin1");
  const verb = line.split(" ", 1)[0]!.toUpperCase();
  if (verb === "HELO" || verb === "EHLO") return answer(R.notLmtp);
  if (refuseEmptyData(connection, verb, answer) || refuseArguments(verb, line, answer)) return;
  original.call(connection, command, callback);
};

/**
 * The LMTP listener (RFC 2033): RCPT accepts local recipients only (aliases expand here as at
 * port 25); after DATA the message and its deliveries are committed with acceptMessage, each
 * delivery is filed at once, and every accepted RCPT gets a reply of its own, in order, e.g.
 * 552 5.2.2 for a full mailbox while the others get 250. A delivery that could not be filed at
 * once (a transient error) stays queued and is dispatched to the consumer: its recipient gets
 * 250, because the message is committed and will be delivered.
 */
export async function startLmtp(ctx: DeliverContext, options: LmtpOptions): Promise<LmtpServer> {
  const routesOf = new WeakMap<SMTPServerAddress, Route[]>();
  // Every RCPT that got 250, in order and repeats included: smtp-server merges a repeated
  // recipient, but RFC 2033 §4.2 wants one reply per successful RCPT. Keyed by the envelope,
  // which smtp-server replaces at every MAIL, RSET and after DATA.
  const acceptedOf = new WeakMap<object, SMTPServerAddress[]>();
  const allowed = networkList(options.allowedNetworks);

  const onRcptTo = (address: SMTPServerAddress, session: SMTPServerSession, callback: (err?: Error | null) => void) => {
    const parsed = parseAddress(address.address, { utf8: true });
    if (!parsed.ok) return callback(refusal(addressReply(parsed.problem, "RCPT")));
    const envelope = session.envelope;
    // Each accepted RCPT is kept, repeats too, for its own reply after DATA: without a bound a
    // client could grow that list (and the lookups) for as long as its session lasts.
    if ((acceptedOf.get(envelope)?.length ?? 0) >= (options.maxRecipients ?? 1000)) return callback(replyError(452, "4.5.3 Too many recipients"));
    resolveRecipient(ctx.pool, parsed.address)
      .then((resolution) => {
        if (!resolution.ok) {
          if (resolution.reason === "relay-denied") return callback(replyError(554, "5.7.1 Relay access denied: not a local domain"));
          if (resolution.reason === "disabled") return callback(replyError(550, "5.2.1 Mailbox disabled"));
          return callback(refusal(Replies.unknownUser));
        }
        routesOf.set(address, resolution.routes);
        const accepted = acceptedOf.get(envelope) ?? [];
        accepted.push(address);
        acceptedOf.set(envelope, accepted);
        callback();
      })
      .catch((error) => {
        ctx.logger.warn({ err: error }, "recipient lookup failed");
        callback(refusal(Replies.localError));
      });
  };

  const handleData = async (stream: SMTPServerDataStream, session: SMTPServerSession, accepted: SMTPServerAddress[]): Promise<Array<string | ReplyError>> => {
    const read = await readMessage(stream, options);
    if (!read.raw) return accepted.map(() => refusal(read.refusal!));
    const raw = read.raw;
    const from = session.envelope.mailFrom ? session.envelope.mailFrom.address : "";
    const replies = new Map<string, string | ReplyError>();
    const earlier = await earlierCopies(ctx.pool, raw, from, options.duplicateWindow ?? 0);
    // One entry per recipient (smtp-server merged repeats): one whose every final recipient has
    // an earlier copy gets that outcome again; the others are filed for the rest of theirs.
    const recipients: SMTPServerAddress[] = [];
    for (const rcpt of session.envelope.rcptTo) {
      const routes = routesOf.get(rcpt) ?? [];
      const fresh = routes.filter((route) => !earlier.has(route.address));
      if (routes.length > 0 && fresh.length === 0) {
        replies.set(rcpt.address.toLowerCase(), earlierReply(routes.flatMap((route) => earlier.get(route.address)!)));
        continue;
      }
      routesOf.set(rcpt, fresh);
      recipients.push(rcpt);
    }
    if (recipients.length > 0) {
      for (const [address, reply] of await acceptAndFile(raw, from, session, recipients)) replies.set(address, reply);
    }
    return accepted.map((rcpt) => {
      const reply = replies.get(rcpt.address.toLowerCase()) ?? refusal(Replies.localError);
      mailMetrics.smtpReplies.inc({ service: "mda-lmtp", class: typeof reply === "string" ? "2xx" : replyClass(reply.responseCode) });
      return reply;
    });
  };

  const acceptAndFile = async (raw: Buffer, from: string, session: SMTPServerSession, recipients: SMTPServerAddress[]): Promise<Map<string, string | ReplyError>> => {
    const deliveries: NewDelivery[] = [];
    for (const rcpt of recipients) {
      for (const route of routesOf.get(rcpt) ?? []) deliveries.push({ recipient: rcpt.address, route });
    }
    const queueId = newQueueId();
    const traceId = currentTraceId();
    // A message that does not begin with a header field gets an empty header section first, so
    // that its first line cannot become part of our Received: field (or a malformed field).
    const stored = Buffer.concat([Buffer.from(lmtpReceived(session, options.hostname, queueId, traceId)), withHeaderSection(raw)]);
    let accepted: AcceptedMessage;
    try {
      accepted = await acceptMessage(
        ctx.pool,
        {
          raw: stored, envelopeFrom: from, source: "lmtp", clientIp: session.remoteAddress, clientHelo: session.hostNameAppearsAs,
          messageIdHeader: headerValue(raw, "message-id"), queueId, traceId: traceId ?? null, traceSpanId: currentSpanId() ?? null,
        },
        deliveries,
        SERVICE,
      );
    } catch (error) {
      ctx.logger.error({ err: error }, "could not store an LMTP message");
      throw refusal(Replies.localError);
    }
    mailMetrics.messagesAccepted.inc({ service: "mda-lmtp" });

    const finalCount = new Map<string, number>();
    for (const rcpt of recipients) {
      for (const route of routesOf.get(rcpt) ?? []) finalCount.set(route.address, (finalCount.get(route.address) ?? 0) + 1);
    }
    // A failure is reported to the client only for a recipient that has exactly one final
    // recipient; a failed part of an alias fan-out gets a DSN like any other delivery.
    const singleFinal = new Set<string>();
    for (const rcpt of recipients) {
      const routes = routesOf.get(rcpt) ?? [];
      if (routes.length === 1 && finalCount.get(routes[0]!.address) === 1) singleFinal.add(routes[0]!.address);
    }
    const outcomes = new Map<string, Outcome | "queued">();
    const leftQueued: AcceptedMessage["deliveries"] = [];
    for (const delivery of accepted.deliveries) {
      if (delivery.kind !== "local") {
        outcomes.set(delivery.finalRecipient, "queued");
        leftQueued.push(delivery);
        continue;
      }
      try {
        const reported = singleFinal.has(delivery.finalRecipient);
        outcomes.set(delivery.finalRecipient, await deliverLocal(ctx, delivery.id, { failureReported: reported, quotaFullTempfail: options.quotaFullTempfail ?? false }));
      } catch (error) {
        ctx.logger.warn({ err: error, deliveryId: delivery.id }, "immediate LMTP delivery failed; queued for the consumer");
        outcomes.set(delivery.finalRecipient, "queued");
        leftQueued.push(delivery);
      }
    }
    if (leftQueued.length > 0 && ctx.bus) {
      await dispatchAccepted(ctx.bus, ctx.pool, { messageId: accepted.messageId, deliveries: leftQueued }).catch((error) =>
        ctx.logger.warn({ err: error }, "dispatch failed; the sweeper will publish the deliveries"),
      );
    }
    const replies = new Map<string, string | ReplyError>();
    // Final recipients whose failure a failure reply tells the client, which then bounces it.
    const told = new Set<string>();
    for (const rcpt of recipients) {
      const reply = replyFor((routesOf.get(rcpt) ?? []).map((route) => outcomes.get(route.address) ?? "queued"));
      replies.set(rcpt.address.toLowerCase(), typeof reply === "string" ? `${reply} (${accepted.queueId})` : reply);
      if (typeof reply !== "string") for (const route of routesOf.get(rcpt) ?? []) told.add(route.address);
    }
    // A copy shared by several RCPTs (an alias whose members all failed, a member also named
    // alone) was bounced with a DSN of ours; when a failure reply covers it, the client's bounce
    // is the one, so ours is dropped. (A crash just before this gives two bounces, never none.)
    const doubled = accepted.deliveries.filter((d) => d.kind === "local" && told.has(d.finalRecipient) && !singleFinal.has(d.finalRecipient)).map((d) => d.id);
    if (doubled.length > 0) {
      await ctx.pool.query(
        "UPDATE deliveries SET dsn_state = 'suppressed', updated_at = now() WHERE id = ANY($1) AND state = 'bounced' AND dsn_state = 'pending'",
        [doubled],
      ).catch((error) => ctx.logger.warn({ err: error }, "could not suppress a DSN the LMTP client will send itself"));
    }
    return replies;
  };

  const server = new SMTPServer({
    lmtp: true,
    name: options.hostname,
    banner: "mailstack LMTP",
    authOptional: true,
    disabledCommands: ["AUTH", "STARTTLS"],
    hideSTARTTLS: true,
    disableReverseLookup: true,
    size: options.maxSize,
    // The size limit is enforced by readMessage, which answers once per accepted RCPT.
    rejectOversized: false,
    // Every reply carries an enhanced status code (RFC 2034); Postfix reads them for its logs and bounces.
    hideENHANCEDSTATUSCODES: false,
    // LMTP clients are MTAs on trusted networks: no early-talker pause before the greeting.
    greetingDelay: 0,
    maxClients: options.maxClients,
    socketTimeout: options.socketTimeout,
    closeTimeout: 10_000,
    logger: false,
    onConnect(session, callback) {
      if (allowedClient(allowed, session.remoteAddress)) return callback();
      ctx.logger.warn({ client: session.remoteAddress }, "LMTP connection from a network not in LMTP_ALLOWED_NETWORKS refused");
      callback(replyError(554, "5.7.1 Not allowed to use LMTP here"));
    },
    onRcptTo,
    onData(stream, session, callback) {
      const accepted = acceptedOf.get(session.envelope) ?? session.envelope.rcptTo;
      withSpan("lmtp DATA", { kind: SpanKind.SERVER, attributes: { "network.peer.address": session.remoteAddress } }, () => handleData(stream, session, accepted))
        .then((replies) => callback(null, replies as unknown as string))
        .catch((error: Error) => {
          stream.resume();
          const failure = (error as ReplyError).responseCode ? (error as ReplyError) : refusal(Replies.localError);
          if (failure !== error) ctx.logger.error({ err: error }, "LMTP DATA failed");
          for (let i = 0; i < accepted.length; i++) mailMetrics.smtpReplies.inc({ service: "mda-lmtp", class: replyClass(failure.responseCode) });
          callback(null, accepted.map(() => failure) as unknown as string);
        });
    },
  } as ConstructorParameters<typeof SMTPServer>[0] & { greetingDelay: number });
  server.on("error", (error) => ctx.logger.error({ err: error }, "LMTP server error"));
  guardCommands(server, lmtpGuard);

  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(options.port, options.host, () => {
      server.off("error", reject);
      resolve();
    });
  });
  const port = (server.server.address() as AddressInfo).port;
  ctx.logger.info({ port }, "LMTP listening");
  return {
    port,
    stop: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}

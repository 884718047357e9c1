import type { AddressInfo } from "node:net";
import { SMTPServer, type SMTPServerAddress, type SMTPServerDataStream, type SMTPServerSession } from "smtp-server";
import { parseAddress, replyClass } from "@mailstack/mail";
import { resolveRecipient, type Route } from "@mailstack/db";
import { acceptMessage, dispatchAccepted, newQueueId, type AcceptedMessage, type NewDelivery } from "@mailstack/queue";
import { SpanKind, currentTraceId, mailMetrics, withSpan } from "@mailstack/telemetry";
import { deliverLocal, SERVICE, type DeliverContext, type Outcome } from "./deliver.ts";
import { allowedClient, networkList } from "./networks.ts";

export interface LmtpOptions {
  port: number;
  host: string;
  /** Largest message accepted, in bytes; larger ones get 552 for every recipient. */
  maxSize: number;
  maxClients: number;
  /** Idle time before a session is closed, ms. */
  socketTimeout: number;
  hostname: string;
  /** Client networks allowed to connect (CIDR or single addresses); LMTP has no authentication. */
  allowedNetworks: string[];
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

/** The per-recipient LMTP reply (RFC 2033 §4.2) for the outcomes of that recipient's deliveries. */
export function replyFor(outcomes: Array<Outcome | "queued">): string | ReplyError {
  const failures = outcomes.filter((o): o is Extract<Outcome, { status: "bounced" }> => o !== "queued" && o.status === "bounced");
  if (failures.length > 0 && failures.length === outcomes.length) return replyError(failures[0]!.code, `${failures[0]!.enhanced} ${failures[0]!.text}`);
  if (outcomes.every((o) => o !== "queued")) return "2.0.0 Delivered";
  return "2.0.0 Queued for delivery";
}

async function readMessage(stream: SMTPServerDataStream, maxSize: number): Promise<Buffer | null> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of stream) {
    size += (chunk as Buffer).length;
    // Past the limit the rest is read and dropped, never kept in memory.
    if (size <= maxSize) chunks.push(chunk as Buffer);
  }
  // smtp-server (rejectOversized) answers 552 for every recipient itself.
  if (stream.sizeExceeded || size > maxSize) return null;
  return Buffer.concat(chunks);
}

function receivedHeader(session: SMTPServerSession, hostname: string, queueId: string, traceId: string | undefined): string {
  const helo = (session.hostNameAppearsAs || "unknown").replace(/[^\x21-\x7e]/g, "");
  const ip = session.remoteAddress.replace(/^::ffff:/, "");
  const trace = traceId ? ` (trace ${traceId})` : "";
  return `Received: from ${helo} ([${ip}])\r\n\tby ${hostname} with LMTP id ${queueId}${trace};\r\n\t${new Date().toUTCString().replace("GMT", "+0000")}\r\n`;
}

/**
 * The LMTP listener (RFC 2033): RCPT accepts local recipients only (aliases expand here as at
 * port 25); after DATA the message and its deliveries are committed with acceptMessage, each
 * delivery is filed at once, and every recipient gets a reply of its own, e.g. 552 5.2.2 for a
 * full mailbox while the others get 250. A delivery that could not be filed at once (a
 * transient error) stays queued and is dispatched to the consumer: its recipient gets 250,
 * because the message is committed and will be delivered.
 */
export async function startLmtp(ctx: DeliverContext, options: LmtpOptions): Promise<LmtpServer> {
  const routesOf = new WeakMap<SMTPServerAddress, Route[]>();
  const allowed = networkList(options.allowedNetworks);

  const onRcptTo = (address: SMTPServerAddress, _session: SMTPServerSession, callback: (err?: Error | null) => void) => {
    const parsed = parseAddress(address.address, { utf8: true });
    if (!parsed.ok) return callback(replyError(553, "5.1.3 Bad recipient address syntax"));
    resolveRecipient(ctx.pool, parsed.address)
      .then((resolution) => {
        if (!resolution.ok) {
          if (resolution.reason === "relay-denied") return callback(replyError(554, "5.7.1 Relay access denied: not a local domain"));
          if (resolution.reason === "disabled") return callback(replyError(550, "5.2.1 Mailbox disabled"));
          return callback(replyError(550, "5.1.1 No such user here"));
        }
        routesOf.set(address, resolution.routes);
        callback();
      })
      .catch((error) => {
        ctx.logger.warn({ err: error }, "recipient lookup failed");
        callback(replyError(451, "4.3.0 Temporary local problem, please try again later"));
      });
  };

  const handleData = async (stream: SMTPServerDataStream, session: SMTPServerSession): Promise<Array<string | ReplyError> | undefined> => {
    const raw = await readMessage(stream, options.maxSize);
    if (!raw) return undefined;
    const recipients = session.envelope.rcptTo;
    const deliveries: NewDelivery[] = [];
    for (const rcpt of recipients) {
      for (const route of routesOf.get(rcpt) ?? []) deliveries.push({ recipient: rcpt.address, route });
    }
    const queueId = newQueueId();
    const traceId = currentTraceId();
    const from = session.envelope.mailFrom ? session.envelope.mailFrom.address : "";
    const stored = Buffer.concat([Buffer.from(receivedHeader(session, options.hostname, queueId, traceId)), raw]);
    let accepted: AcceptedMessage;
    try {
      accepted = await acceptMessage(
        ctx.pool,
        { raw: stored, envelopeFrom: from, source: "lmtp", clientIp: session.remoteAddress, clientHelo: session.hostNameAppearsAs, queueId, traceId: traceId ?? null },
        deliveries,
        SERVICE,
      );
    } catch (error) {
      ctx.logger.error({ err: error }, "could not store an LMTP message");
      throw replyError(451, "4.3.0 Temporary local problem, please try again later");
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
        outcomes.set(delivery.finalRecipient, await deliverLocal(ctx, delivery.id, { failureReported: singleFinal.has(delivery.finalRecipient) }));
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
    return recipients.map((rcpt) => {
      const reply = replyFor((routesOf.get(rcpt) ?? []).map((route) => outcomes.get(route.address) ?? "queued"));
      mailMetrics.smtpReplies.inc({ service: "mda-lmtp", class: typeof reply === "string" ? "2xx" : replyClass(reply.responseCode) });
      return typeof reply === "string" ? `${reply} (${accepted.queueId})` : reply;
    });
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
    rejectOversized: true,
    // Enhanced status codes are written into our reply texts (Postfix's LMTP client reads them there).
    hideENHANCEDSTATUSCODES: true,
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
      withSpan("lmtp DATA", { kind: SpanKind.SERVER, attributes: { "network.peer.address": session.remoteAddress } }, () => handleData(stream, session))
        .then((replies) => callback(null, replies))
        .catch((error: Error) => {
          stream.resume();
          callback((error as ReplyError).responseCode ? error : replyError(451, "4.3.0 Temporary local problem, please try again later"));
        });
    },
  });
  server.on("error", (error) => ctx.logger.error({ err: error }, "LMTP server error"));

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

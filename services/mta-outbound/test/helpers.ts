import type { AddressInfo } from "node:net";
import dns2 from "dns2";
import { SMTPServer, type SMTPServerOptions, type SMTPServerSession } from "smtp-server";
import { loadConfig } from "@mailstack/config";
import { resolveRecipient, type Pool } from "@mailstack/db";
import { acceptMessage, dispatchAccepted, type NewDelivery } from "@mailstack/queue";
import type { Bus } from "@mailstack/bus";
import { shape, type OutboundConfig } from "../src/service.ts";

const { Packet } = dns2;

export interface ZoneEntry {
  /** Answer SERVFAIL (a broken or unreachable authoritative server). */
  servfail?: boolean;
  /** Answer nothing at all (the query times out). */
  silent?: boolean;
  mx?: Array<{ exchange: string; priority: number }>;
  a?: string[];
  aaaa?: string[];
  /** An alias: answered with the CNAME and, as a recursive resolver does, the target's records. */
  cname?: string;
}

/** A real DNS server on loopback (UDP) answering from a zone that tests may change. */
export async function startDns(zone: Record<string, ZoneEntry>): Promise<{ server: string; zone: Record<string, ZoneEntry>; close(): Promise<void> }> {
  const server = dns2.createUDPServer((request, send) => {
    const response = Packet.createResponseFromRequest(request);
    const answers = response.answers as unknown[];
    response.header.aa = 1;
    const question = request.questions[0]!;
    let name = question.name.toLowerCase().replace(/\.$/, "");
    let owner = question.name;
    for (let hops = 0; zone[name]?.cname && hops < 8; hops++) {
      const target = zone[name]!.cname!;
      answers.push({ name: owner, type: Packet.TYPE.CNAME, class: Packet.CLASS.IN, ttl: 60, domain: target });
      name = target;
      owner = target;
    }
    const entry = zone[name];
    if (entry?.silent) return;
    if (!entry) {
      response.header.rcode = 3; // NXDOMAIN
    } else if (entry.servfail) {
      response.header.rcode = 2;
    } else if (question.type === Packet.TYPE.MX) {
      for (const mx of entry.mx ?? []) answers.push({ name: owner, type: Packet.TYPE.MX, class: Packet.CLASS.IN, ttl: 60, exchange: mx.exchange, priority: mx.priority });
    } else if (question.type === Packet.TYPE.A) {
      for (const address of entry.a ?? []) answers.push({ name: owner, type: Packet.TYPE.A, class: Packet.CLASS.IN, ttl: 60, address });
    } else if (question.type === Packet.TYPE.AAAA) {
      for (const address of entry.aaaa ?? []) answers.push({ name: owner, type: Packet.TYPE.AAAA, class: Packet.CLASS.IN, ttl: 60, address });
    }
    void send(response);
  });
  await server.listen(0, "127.0.0.1");
  const { port } = server.address() as AddressInfo;
  return { server: `127.0.0.1:${port}`, zone, close: () => new Promise((resolve) => server.close(() => resolve())) };
}

export interface ReceivedMessage {
  from: string;
  to: string[];
  body: Buffer;
  mailParams: Record<string, unknown>;
  rcptParams: Array<Record<string, unknown>>;
  secure: boolean;
  host: string;
  /** Date.now() when the final reply was given. */
  at: number;
  /** The AUTH user, when the client authenticated. */
  user: string | null;
}

export interface MxOptions {
  /** Return an SMTP error (code + message) for a recipient, or null to accept. */
  onRcpt?: (address: string) => { code: number; message: string } | null;
  /** Reply to the final dot: null accepts. */
  onData?: (message: ReceivedMessage) => { code: number; message: string } | null;
  /** Disable STARTTLS (smtp-server offers it with its built-in certificate otherwise). */
  noTls?: boolean;
  hideDsn?: boolean;
  hidePipelining?: boolean;
  hide8BitMime?: boolean;
  size?: number;
  auth?: { user: string; pass: string };
  /** Extra TLS options for the server's STARTTLS (e.g. a version the client refuses). */
  tls?: Record<string, unknown>;
}

/** A real SMTP server (smtp-server) acting as a remote MX on a loopback address. */
export async function startMx(host: string, port: number, options: MxOptions = {}) {
  const received: ReceivedMessage[] = [];
  let connections = 0;
  const serverOptions: SMTPServerOptions = {
    banner: `mx ${host}`,
    disabledCommands: options.auth ? [...(options.noTls ? ["STARTTLS"] : [])] : ["AUTH", ...(options.noTls ? ["STARTTLS"] : [])],
    hideSTARTTLS: options.noTls ?? false,
    hidePIPELINING: options.hidePipelining ?? false,
    hide8BITMIME: options.hide8BitMime ?? false,
    hideDSN: options.hideDsn ?? false,
    hideSMTPUTF8: false,
    size: options.size ?? 0,
    ...(options.tls ?? {}),
    authOptional: true,
    logger: false,
    disableReverseLookup: true,
    onConnect(_session, callback) {
      connections++;
      callback();
    },
    onAuth(auth, _session, callback) {
      if (options.auth && auth.username === options.auth.user && auth.password === options.auth.pass) return callback(null, { user: auth.username });
      callback(new Error("Invalid username or password"));
    },
    onRcptTo(address, _session, callback) {
      const refusal = options.onRcpt?.(address.address);
      if (refusal) return callback(Object.assign(new Error(refusal.message), { responseCode: refusal.code }));
      callback();
    },
    onData(stream, session: SMTPServerSession, callback) {
      const chunks: Buffer[] = [];
      stream.on("data", (chunk: Buffer) => chunks.push(chunk));
      stream.on("end", () => {
        const message: ReceivedMessage = {
          from: session.envelope.mailFrom ? session.envelope.mailFrom.address : "",
          to: session.envelope.rcptTo.map((r) => r.address),
          body: Buffer.concat(chunks),
          mailParams: (session.envelope.mailFrom ? session.envelope.mailFrom.args : {}) as Record<string, unknown>,
          rcptParams: session.envelope.rcptTo.map((r) => (r.args || {}) as Record<string, unknown>),
          secure: session.secure,
          host,
          at: Date.now(),
          user: (session.user as string | undefined) ?? null,
        };
        const refusal = options.onData?.(message);
        if (refusal) return callback(Object.assign(new Error(refusal.message), { responseCode: refusal.code }));
        received.push(message);
        callback(null, "Queued");
      });
    },
  };
  const server = new SMTPServer(serverOptions);
  server.on("error", () => undefined);
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, host, () => resolve());
  });
  const actualPort = (server.server.address() as AddressInfo).port;
  return {
    received,
    connections: () => connections,
    port: actualPort,
    host,
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}

/** Validated outbound settings for tests: the given overrides on top of the defaults. */
export function testConfig(env: Record<string, string>): OutboundConfig {
  return { ...loadConfig(shape, env), MAIL_HOSTNAME: "relay.test" } as OutboundConfig;
}

/** Accepts a message from sender to remote recipients the way the SMTP services do, then dispatches it. */
export async function submit(
  pool: Pool,
  bus: Bus,
  options: { from: string; to: string[]; raw?: Buffer | string; notify?: string[]; orcpt?: string; ret?: "FULL" | "HDRS"; envid?: string; beforeDispatch?: (messageId: number) => Promise<void>; dispatch?: boolean },
) {
  const raw = Buffer.isBuffer(options.raw)
    ? options.raw
    : Buffer.from(options.raw ?? `From: <${options.from}>\r\nTo: ${options.to.join(", ")}\r\nSubject: test\r\nMessage-ID: <${Math.random().toString(36).slice(2)}@sender.test>\r\n\r\nHello.\r\n`);
  const deliveries: NewDelivery[] = [];
  for (const to of options.to) {
    const resolution = await resolveRecipient(pool, to, { allowRemote: true });
    if (!resolution.ok) throw new Error(`cannot route ${to}: ${resolution.reason}`);
    for (const route of resolution.routes) deliveries.push({ recipient: to, route, dsnNotify: options.notify ?? null, dsnOrcpt: options.orcpt ?? null });
  }
  const accepted = await acceptMessage(pool, { raw, envelopeFrom: options.from, source: "submission", dsnRet: options.ret ?? null, dsnEnvid: options.envid ?? null }, deliveries, "test");
  await options.beforeDispatch?.(accepted.messageId);
  if (options.dispatch !== false) await dispatchAccepted(bus, pool, accepted);
  return accepted;
}

export async function deliveryStates(pool: Pool, messageId: number) {
  const result = await pool.query<{ final_recipient: string; state: string; attempts: number; last_reply: string | null; last_status: string | null; dsn_state: string | null; remote_mta: string | null; next_attempt_at: Date | null }>(
    "SELECT final_recipient, state, attempts, last_reply, last_status, dsn_state, remote_mta, next_attempt_at FROM deliveries WHERE message_id = $1 ORDER BY id",
    [messageId],
  );
  return result.rows;
}

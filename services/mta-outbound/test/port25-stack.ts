import assert from "node:assert/strict";
import type { SrsSettings } from "@mailstack/mail";
import type { Logger } from "@mailstack/telemetry";
import { createTestEnv, type TestEnv } from "@mailstack/testkit";
import { RawSmtp, dataPayload } from "../../../packages/smtp-intake/src/testing.ts";
import { startMda, type Mda } from "../../mda/src/mda.ts";
import { startInbound, type Inbound } from "../../mta-inbound/src/inbound.ts";
import { startOutbound, type OutboundService } from "../src/service.ts";
import { startDns, testConfig } from "./helpers.ts";
import { startScriptedMx } from "./scripted-mx.ts";

// Port 25 to the relay, end to end, for the alias, forwarding and SRS tests: PostgreSQL, NATS, a
// loopback DNS server and a loopback MX that records every command, with the inbound MTA, the
// MDA and the relay in this process.

export interface Port25Stack {
  env: TestEnv;
  dns: Awaited<ReturnType<typeof startDns>>;
  mx: Awaited<ReturnType<typeof startScriptedMx>>;
  outbound: OutboundService;
  mda: Mda;
  inbound: Inbound;
}

export interface Port25StackOptions {
  logger: Logger;
  mxAddress: string;
  /** SRS for the inbound MTA and the relay, or null for none. */
  srs: SrsSettings | null;
  /** The directory: domains, accounts, aliases, filter rules. */
  setup(env: TestEnv): Promise<void>;
  /** The MX's answer to a command, or undefined for its default. */
  mxReply?: (command: string) => string | undefined;
  /** Domains (besides dest.test and origin.test) whose MX is the loopback MX. */
  moreMxDomains?: string[];
}

/** Starts the stack; the relay retries and generates DSNs within a fraction of a second. */
export async function startPort25Stack(options: Port25StackOptions): Promise<Port25Stack> {
  const env = await createTestEnv();
  await options.setup(env);
  const mx = await startScriptedMx(options.mxAddress, 0, { reply: options.mxReply ?? (() => undefined) });
  const viaMx = { mx: [{ exchange: "mx.dest.test", priority: 10 }] };
  const zones: Parameters<typeof startDns>[0] = { "dest.test": viaMx, "origin.test": viaMx, "mx.dest.test": { a: [options.mxAddress] } };
  for (const domain of options.moreMxDomains ?? []) zones[domain] = viaMx;
  const dns = await startDns(zones);
  const srs = options.srs;
  const srsEnv: Record<string, string> = srs ? { SRS_DOMAIN: srs.domain, SRS_SECRETS: srs.secrets.join(","), SRS_MAX_AGE: `${srs.maxAgeDays}d` } : {};
  const config = testConfig({ DNS_SERVERS: dns.server, RELAY_DEST_PORT: String(mx.port), RELAY_SCHEDULER_INTERVAL: "200ms", RELAY_DSN_INTERVAL: "200ms", RELAY_BACKOFF: "300ms", ...srsEnv });
  const { logger } = options;
  const outbound = startOutbound({ pool: env.pool, bus: env.bus, logger, config });
  const mda = await startMda({ pool: env.pool, bus: env.bus, logger, config: { LMTP_ENABLED: false } });
  const inbound = await startInbound({
    pool: env.pool,
    bus: env.bus,
    logger,
    config: { MAIL_HOSTNAME: "mx.example.test", SMTP_PORT: 0, SMTP_HOST: "127.0.0.1", INBOUND_AUTH_CHECKS: false, srs },
  });
  return { env, dns, mx, outbound, mda, inbound };
}

export async function stopPort25Stack(stack: Port25Stack | undefined): Promise<void> {
  await stack?.inbound.stop();
  await stack?.mda.stop();
  await stack?.outbound.stop();
  await stack?.mx.close();
  await stack?.dns.close();
  await stack?.env.close();
}

/** One SMTP transaction on port 25; the reply to each RCPT (DATA only when one was taken). */
export async function sendOnPort25(port: number, from: string, recipients: string[], body: string): Promise<string[]> {
  const client = await RawSmtp.connect(port);
  assert.equal((await client.reply()).code, 220);
  assert.equal((await client.command("EHLO client.remote.example")).code, 250);
  assert.match((await client.command(`MAIL FROM:<${from}>`)).text, /^250 /);
  const replies: string[] = [];
  for (const to of recipients) replies.push((await client.command(`RCPT TO:<${to}>`)).text);
  if (replies.some((r) => r.startsWith("250"))) {
    assert.equal((await client.command("DATA")).code, 354);
    assert.match((await client.command(dataPayload(body))).text, /^250 /);
  }
  await client.command("QUIT");
  client.close();
  return replies;
}

/** The MAIL and RCPT lines of every transaction the MX saw, one array per MAIL. */
export function mxTransactions(mx: Port25Stack["mx"]): string[][] {
  const all: string[][] = [];
  for (const line of mx.commands()) {
    if (/^MAIL /i.test(line)) all.push([line]);
    else if (/^RCPT /i.test(line)) all.at(-1)?.push(line);
  }
  return all;
}

export function mailFrom(transaction: string[]): string {
  return /^MAIL FROM:<(.*?)>/i.exec(transaction[0]!)![1]!;
}

export function rcpts(transaction: string[]): string[] {
  return transaction.slice(1).map((line) => /^RCPT TO:<(.*?)>/i.exec(line)![1]!);
}

/** The transactions the MX saw naming the address in a RCPT (refused or not; any case). */
export function transactionsTo(mx: Port25Stack["mx"], address: string): string[][] {
  return mxTransactions(mx).filter((t) => rcpts(t).some((r) => r.toLowerCase() === address.toLowerCase()));
}

import assert from "node:assert/strict";
import type { Pool } from "@mailstack/db";
import { createLogger } from "@mailstack/telemetry";
import { createTestEnv, type TestEnv } from "@mailstack/testkit";
import { RawSmtp, dataPayload } from "../../../packages/smtp-intake/src/testing.ts";
import { startMda, type Mda } from "../../mda/src/mda.ts";
import { startInbound, type Inbound } from "../../mta-inbound/src/inbound.ts";
import { startMsa, type Msa } from "../../msa/src/server.ts";
import { testSettings, testTls } from "../../msa/test/helpers.ts";
import { startOutbound, type OutboundService } from "../src/service.ts";
import { startDns, testConfig } from "./helpers.ts";
import { startScriptedMx, type Script } from "./scripted-mx.ts";

/**
 * The whole chain over real sockets: mta-inbound (port 25), the msa (587, AUTH before TLS
 * allowed), the MDA and the relay, whose destinations dest.test and origin.test both have one
 * loopback MX that records every command line (`reply` scripts its answers).
 */
export interface Chain {
  env: TestEnv;
  inbound: Inbound;
  msa: Msa;
  /** Sends one message: EHLO, the commands given (each must get 2xx), DATA. */
  send(port: number, commands: string[], body: string): Promise<void>;
  /** The stored copies in an account's mailbox, each with the trace lines the MDA put in front. */
  mailbox(address: string): Promise<string[]>;
  /** The MAIL and RCPT lines of every transaction the MX saw, one array per MAIL. */
  transactions(): string[][];
  close(): Promise<void>;
}

/** Starts the chain; `seed` fills the directory first. */
export async function startChain(options: { seed: (pool: Pool) => Promise<void>; reply?: Script["reply"] }): Promise<Chain> {
  const logger = createLogger("test", process.env.TEST_LOG_LEVEL ?? "silent");
  const env = await createTestEnv();
  await options.seed(env.pool);
  const mx = await startScriptedMx("127.0.0.31", 0, options.reply ? { reply: options.reply } : {});
  const dns = await startDns({
    "dest.test": { mx: [{ exchange: "mx.dest.test", priority: 10 }] },
    "origin.test": { mx: [{ exchange: "mx.dest.test", priority: 10 }] },
    "mx.dest.test": { a: ["127.0.0.31"] },
  });
  const config = testConfig({ DNS_SERVERS: dns.server, RELAY_DEST_PORT: String(mx.port), RELAY_SCHEDULER_INTERVAL: "200ms", RELAY_DSN_INTERVAL: "200ms" });
  const outbound: OutboundService = startOutbound({ pool: env.pool, bus: env.bus, logger, config });
  const mda: Mda = await startMda({ pool: env.pool, bus: env.bus, logger, config: { LMTP_ENABLED: false } });
  const inbound = await startInbound({
    pool: env.pool,
    bus: env.bus,
    logger,
    config: { MAIL_HOSTNAME: "mx.example.test", SMTP_PORT: 0, SMTP_HOST: "127.0.0.1", INBOUND_AUTH_CHECKS: false },
  });
  const msa = await startMsa({ pool: env.pool, bus: env.bus, logger, tls: await testTls(), settings: testSettings({ authBeforeTls: true }) });

  return {
    env,
    inbound,
    msa,
    async send(port, commands, body) {
      const client = await RawSmtp.connect(port);
      assert.equal((await client.reply()).code, 220);
      assert.equal((await client.command("EHLO client.remote.example")).code, 250);
      for (const command of commands) assert.match((await client.command(command)).text, /^2\d\d /, command);
      assert.equal((await client.command("DATA")).code, 354);
      assert.match((await client.command(dataPayload(body))).text, /^250 /);
      await client.command("QUIT");
      client.close();
    },
    async mailbox(address) {
      const result = await env.pool.query<{ header_prefix: Buffer; raw: Buffer }>(
        `SELECT e.header_prefix, m.raw FROM mailbox_entries e JOIN accounts a ON a.id = e.account_id
           JOIN messages m ON m.id = e.message_id WHERE a.address = $1 ORDER BY e.id`,
        [address],
      );
      return result.rows.map((r) => Buffer.concat([r.header_prefix, r.raw]).toString("latin1"));
    },
    transactions() {
      const all: string[][] = [];
      for (const line of mx.commands()) {
        if (/^MAIL /i.test(line)) all.push([line]);
        else if (/^RCPT /i.test(line)) all.at(-1)!.push(line);
      }
      return all;
    },
    async close() {
      await msa.stop();
      await inbound.stop();
      await mda.stop();
      await outbound.stop();
      await mx.close();
      await dns.close();
      await env.close();
    },
  };
}

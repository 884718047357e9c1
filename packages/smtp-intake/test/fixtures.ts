import { addAccount, addAlias, addDomain, type Pool } from "@mailstack/db";
import { createLogger } from "@mailstack/telemetry";
import type { Bus } from "@mailstack/bus";
import assert from "node:assert/strict";
import { createIntakeServer, type IntakeOptions, type IntakeServer } from "../src/index.ts";
import { RawSmtp } from "../src/testing.ts";

export const logger = createLogger("test", process.env.TEST_LOG_LEVEL ?? "silent");

/** example.test with user1, user2, aliases of every shape; other.test with a catch-all. */
export async function seedDirectory(pool: Pool): Promise<void> {
  await addDomain(pool, "example.test");
  await addDomain(pool, "other.test");
  await addAccount(pool, { address: "user1@example.test", password: "secret-1" });
  await addAccount(pool, { address: "user2@example.test", password: "secret-2" });
  await addAlias(pool, "team@example.test", ["user1@example.test", "user2@example.test"]);
  await addAlias(pool, "first@example.test", ["user1@example.test"]);
  await addAlias(pool, "chain2@example.test", ["user1@example.test"]);
  await addAlias(pool, "chain1@example.test", ["chain2@example.test"]);
  // The directory refuses to create a loop, so write one directly: routing must still survive it.
  await pool.query(
    `INSERT INTO aliases (domain_id, local_part, address, targets)
     SELECT id, l, l || '@example.test', ARRAY[t || '@example.test'] FROM domains,
            (VALUES ('loop1', 'loop2'), ('loop2', 'loop1')) AS v(l, t) WHERE name = 'example.test'`,
  );
  await addAlias(pool, "fwd@example.test", ["someone@remote.example", "user2@example.test"]);
  await addAlias(pool, "*@other.test", ["user2@example.test"]);
}

export async function startIntake(pool: Pool, bus: Bus, overrides: Partial<IntakeOptions> = {}): Promise<IntakeServer> {
  const intake = createIntakeServer({
    service: "mta-inbound",
    source: "inbound",
    pool,
    bus,
    logger,
    hostname: "mx.example.test",
    tlsMode: "starttls",
    ...overrides,
    limits: { greetingDelayMs: 0, ...overrides.limits },
  });
  await intake.listen();
  return intake;
}

/** A TCP relay to a real server that a test can cut, to take PostgreSQL or NATS away for real. */
export async function messageCount(pool: Pool): Promise<number> {
  const result = await pool.query<{ n: number }>("SELECT count(*)::int AS n FROM messages");
  return result.rows[0]!.n;
}

export async function deliveryTargets(pool: Pool): Promise<string[]> {
  const result = await pool.query<{ final_recipient: string }>("SELECT final_recipient FROM deliveries ORDER BY final_recipient");
  return result.rows.map((r) => r.final_recipient);
}

/** A session past its greeting and EHLO, as a remote MTA opens one. */
export async function openSession(port: number): Promise<RawSmtp> {
  const client = await RawSmtp.connect(port);
  assert.equal((await client.reply()).code, 220);
  assert.equal((await client.command("EHLO client.remote.example")).code, 250);
  return client;
}

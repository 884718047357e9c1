/**
 * The CPU one RETR costs inside the pop3 service's session code, without sockets: a session
 * on a real maildrop (PostgreSQL, 5,000 messages of 4 KiB) whose connection is a stub that
 * only counts bytes. Separates our own per-command work from the kernel's share (the socket
 * write and the wake-ups) that bench/pop3/run.ts measures together.
 *
 *   node bench/pop3/session-cpu.ts [--count 5000] [--rounds 5] [--no-telemetry]
 */
import { parseArgs } from "node:util";
import { startTelemetry } from "../../packages/telemetry/src/index.ts";

const { values } = parseArgs({
  options: {
    count: { type: "string", default: "5000" },
    rounds: { type: "string", default: "5" },
    "no-telemetry": { type: "boolean", default: false },
  },
});
// As in the service: the SDK runs (spans are made and dropped when no endpoint is configured).
if (!values["no-telemetry"]) startTelemetry("pop3-bench");
const { addAccount, addDomain } = await import("../../packages/db/src/index.ts");
const { createTestEnv } = await import("../../packages/testkit/src/index.ts");
const { createLogger } = await import("../../packages/telemetry/src/index.ts");
const { Pop3Session } = await import("../../services/pop3/src/session.ts");

const COUNT = Number(values.count);
const USER = "user1@bench.test";
const PASSWORD = "bench-Password-1";

const env = await createTestEnv();
try {
  await addDomain(env.pool, "bench.test");
  const account = await addAccount(env.pool, { address: USER, password: PASSWORD });
  const raw = Buffer.from(`From: a@remote.example\r\nSubject: s\r\n\r\n${"line of text, line of text, line of text, line of text, line\r\n".repeat(64)}`);
  await env.pool.query(
    `WITH m AS (INSERT INTO messages (queue_id, raw, size, envelope_from, source)
                SELECT 'b' || n, $2::bytea, octet_length($2::bytea), 's@remote.example', 'inbound' FROM generate_series(1, $3::int) n RETURNING id)
     INSERT INTO mailbox_entries (account_id, folder, uid, message_id, header_prefix, size)
     SELECT $1, 'INBOX', row_number() OVER (ORDER BY id), id, '\\x'::bytea, octet_length($2::bytea) FROM m`,
    [account.id, raw, COUNT],
  );
  await env.pool.query("UPDATE folders SET uid_next = $2 WHERE account_id = $1", [account.id, COUNT + 1]);

  let bytes = 0;
  const io = {
    remoteAddress: "127.0.0.1",
    secure: false,
    write: async (data: string | Buffer) => void (bytes += data.length),
    writeNow: (data: Buffer) => void (bytes += data.length),
    writeParts: async (parts: Buffer[]) => void (bytes += parts.reduce((n, p) => n + p.length, 0)),
    startTls: async () => {},
    close: () => {},
  };
  const settings = {
    hostname: "pop3.bench.test",
    tlsAvailable: false,
    allowPlaintext: "always" as const,
    failedLoginDelayMs: 0,
    throttle: { maxFailuresPerIp: 100, maxFailuresPerAccount: 100, windowMs: 60_000 },
    chunkSize: 256 * 1024,
    popBeforeSmtp: false,
    tryAcquireSession: () => true,
    releaseSession: () => {},
  };
  const logger = createLogger("pop3-bench");
  for (let round = 0; round <= Number(values.rounds); round++) {
    const session = new Pop3Session(io, { pool: env.pool, sessionPool: env.pool, logger, settings } as never);
    await session.handle(`USER ${USER}`);
    await session.handle(`PASS ${PASSWORD}`);
    if (session.state !== "transaction") throw new Error("login failed");
    const cpu = process.cpuUsage();
    const started = performance.now();
    for (let i = 1; i <= COUNT; i++) await session.handle(`RETR ${i}`);
    const used = process.cpuUsage(cpu);
    const wall = performance.now() - started;
    await session.handle("QUIT");
    console.log(
      `round ${round}${round === 0 ? " (warm-up)" : ""}: ${((used.user + used.system) / COUNT).toFixed(1)} µs CPU and ${((wall * 1000) / COUNT).toFixed(1)} µs wall per RETR (${bytes} bytes so far)`,
    );
  }
} finally {
  await env.close();
}

// /readyz says whether the service can do its work: it must answer 503 while PostgreSQL or NATS
// is unreachable and 200 again once it is back. The service (pop3, started as its container
// starts it) reaches both through TCP relays that the test cuts, so the shared PostgreSQL and
// NATS keep running for everyone else.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createTestEnv, freePort, startServiceProcess, tcpProxy, waitFor, type TestEnv } from "../../testkit/src/index.ts";

let testEnv: TestEnv;
const tlsDir = mkdtempSync(join(tmpdir(), "mailstack-readiness-tls-"));
before(async () => {
  testEnv = await createTestEnv();
});
after(async () => {
  await testEnv?.close();
  rmSync(tlsDir, { recursive: true, force: true });
});

async function readyz(opsPort: number): Promise<number> {
  const response = await fetch(`http://127.0.0.1:${opsPort}/readyz`, { signal: AbortSignal.timeout(5_000) });
  await response.text();
  return response.status;
}

test("/readyz answers 503 while NATS or PostgreSQL is unreachable, and 200 once it is back", { timeout: 120_000 }, async () => {
  const database = new URL(testEnv.env.DATABASE_URL!);
  const nats = new URL(testEnv.env.NATS_URL!.replace(/^nats:/, "http:"));
  const postgresRelay = await tcpProxy(Number(database.port || 5432));
  const natsRelay = await tcpProxy(Number(nats.port || 4222));
  database.host = `127.0.0.1:${postgresRelay.port}`;
  const service = await startServiceProcess(
    "pop3",
    {
      ...testEnv.env,
      DATABASE_URL: database.toString(),
      NATS_URL: `nats://127.0.0.1:${natsRelay.port}`,
      POP3_PORT: String(await freePort()),
      POP3S_PORT: String(await freePort()),
      TLS_DIR: tlsDir,
      LOG_LEVEL: "info",
    },
    60_000,
  );
  try {
    assert.equal(await readyz(service.opsPort), 200);

    await natsRelay.cut();
    await waitFor(async () => (await readyz(service.opsPort)) === 503, 10_000, 200).catch(() => {
      assert.fail(`/readyz still 200 with NATS unreachable\n${service.output()}`);
    });
    await waitFor(() => service.output().includes("NATS connection lost"), 5_000).catch(() => {
      assert.fail(`no log line says the NATS connection was lost\n${service.output()}`);
    });
    await natsRelay.restore();
    await waitFor(async () => (await readyz(service.opsPort)) === 200, 20_000, 200).catch(() => {
      assert.fail(`/readyz not 200 after NATS came back\n${service.output()}`);
    });
    await waitFor(() => service.output().includes("NATS connection restored"), 5_000).catch(() => {
      assert.fail(`no log line says the NATS connection was restored\n${service.output()}`);
    });

    await postgresRelay.cut();
    await waitFor(async () => (await readyz(service.opsPort)) === 503, 10_000, 200).catch(() => {
      assert.fail(`/readyz still 200 with PostgreSQL unreachable\n${service.output()}`);
    });
    await postgresRelay.restore();
    await waitFor(async () => (await readyz(service.opsPort)) === 200, 20_000, 200).catch(() => {
      assert.fail(`/readyz not 200 after PostgreSQL came back\n${service.output()}`);
    });
  } finally {
    assert.equal(await service.stop(), 0, `exit code after SIGTERM\n${service.output()}`);
    await natsRelay.cut().catch(() => undefined);
    await postgresRelay.cut().catch(() => undefined);
  }
});

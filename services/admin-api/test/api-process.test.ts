import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { createApiToken } from "@mailstack/admin-ops";
import { createTestEnv, freePort, startOtlpReceiver, startServiceProcess, waitFor, type OtlpReceiver, type ServiceProcess, type TestEnv } from "@mailstack/testkit";

let env: TestEnv;
let otlp: OtlpReceiver;
let service: ServiceProcess;
let apiPort: number;

before(async () => {
  env = await createTestEnv();
  otlp = await startOtlpReceiver();
  apiPort = await freePort();
  service = await startServiceProcess("admin-api", {
    ...env.env,
    API_PORT: String(apiPort),
    API_HOST: "127.0.0.1",
    OTEL_EXPORTER_OTLP_ENDPOINT: otlp.url,
    OTEL_EXPORTER_OTLP_PROTOCOL: "http/json",
    OTEL_BSP_SCHEDULE_DELAY: "100",
  });
});
after(async () => {
  await service?.kill();
  await otlp?.close();
  await env?.close();
});

test("the service process serves the API on API_PORT, traced by @fastify/otel with pg spans as children", async () => {
  const { token } = await createApiToken(env.pool, "process-test");
  const traceId = "0af7651916cd43dd8448eb211c80319c";
  const response = await fetch(`http://127.0.0.1:${apiPort}/domains`, {
    headers: { authorization: `Bearer ${token}`, traceparent: `00-${traceId}-b7ad6b7169203331-01` },
  });
  assert.equal(response.status, 200);
  assert.deepEqual(await response.json(), { domains: [], next: null });
  assert.equal((await fetch(`http://127.0.0.1:${apiPort}/domains`)).status, 401);

  const metrics = await (await fetch(`http://127.0.0.1:${service.opsPort}/metrics`)).text();
  assert.match(metrics, /^admin_api_request_duration_seconds_count\{method="GET",route="\/domains",status="200"\} 1$/m);
  assert.match(metrics, /^admin_api_request_duration_seconds_count\{method="GET",route="\/domains",status="401"\} 1$/m);

  const spans = await waitFor((): ReturnType<typeof otlp.spans.filter> | null => {
    const mine = otlp.spans.filter((s) => s.traceId === traceId);
    const done = mine.some((s) => s.parentSpanId === "b7ad6b7169203331") && mine.some((s) => s.name.startsWith("pg.query"));
    return done ? mine : null;
  }) as NonNullable<Awaited<ReturnType<typeof otlp.spans.filter>>>;
  assert.ok(spans.every((s) => s.service === "admin-api"));
  const root = spans.find((s) => s.parentSpanId === "b7ad6b7169203331");
  assert.ok(root, `a span continues the caller's traceparent: ${spans.map((s) => s.name).join(", ")}`);
  assert.equal(root.kind, 2, "the request span is a SERVER span");
  assert.ok(spans.some((s) => s.name.startsWith("handler")), "the route handler has its own span");
  const ids = new Set(spans.map((s) => s.spanId));
  const db = spans.filter((s) => s.name.startsWith("pg."));
  assert.ok(db.length >= 2);
  assert.ok(db.every((s) => ids.has(s.parentSpanId)), "database spans are children of the request's spans");
});

test("SIGTERM lets an export in flight finish, then exits 0 and closes the port", async () => {
  const { token } = await createApiToken(env.pool, "shutdown-test");
  const account = (await env.pool.query(
    `WITH d AS (INSERT INTO domains (name) VALUES ('shutdown.test') RETURNING id),
          a AS (INSERT INTO accounts (domain_id, local_part, address, password_hash) SELECT id, 'big', 'big@shutdown.test', 'x' FROM d RETURNING id)
     SELECT id FROM a`,
  )).rows[0].id as number;
  await env.pool.query("INSERT INTO folders (account_id, name) VALUES ($1, 'INBOX')", [account]);
  await env.pool.query(
    `WITH m AS (
       INSERT INTO messages (queue_id, raw, size, envelope_from, source)
       SELECT 'SHUT' || n, convert_to('Subject: ' || n || E'\\r\\n\\r\\n' || repeat('z', 60000) || E'\\r\\n', 'UTF8'), 0, '', 'inbound'
       FROM generate_series(1, 200) n RETURNING id)
     INSERT INTO mailbox_entries (account_id, folder, uid, message_id, size) SELECT $1, 'INBOX', row_number() OVER (ORDER BY id), id, 0 FROM m`,
    [account],
  );
  const response = await fetch(`http://127.0.0.1:${apiPort}/accounts/big@shutdown.test/export?format=mbox&folder=INBOX`, {
    headers: { authorization: `Bearer ${token}` },
  });
  assert.equal(response.status, 200);
  const reader = response.body!.getReader();
  const first = await reader.read();
  const exited = service.stop();
  // Keep reading after SIGTERM: the whole export still arrives.
  const chunks: Buffer[] = [Buffer.from(first.value!)];
  for (;;) {
    const next = await reader.read();
    if (next.done) break;
    chunks.push(Buffer.from(next.value));
  }
  const mbox = Buffer.concat(chunks).toString("latin1");
  assert.equal(mbox.match(/^From MAILER-DAEMON /gm)?.length, 200);
  assert.ok(mbox.endsWith("Subject: 200\r\n\r\n" + "z".repeat(60000) + "\r\n\n"));
  const code = await exited;
  assert.equal(code, 0, service.output());
  await assert.rejects(fetch(`http://127.0.0.1:${apiPort}/domains`));
});

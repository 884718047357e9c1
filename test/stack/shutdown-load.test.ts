// SIGTERM while mail is pouring in loses nothing: mta-inbound (started as the stack and the
// containers start it) is stopped while 16 SMTP clients send back to back. Every message
// answered 250 is committed, nothing is committed that was not answered 250, and the process
// exits 0 within SHUTDOWN_TIMEOUT.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import net from "node:net";
import { createTestEnv, freePort, runMailctl, startServiceProcess, type TestEnv } from "@mailstack/testkit";

let env: TestEnv;
before(async () => {
  env = await createTestEnv();
  for (const args of [["domain", "add", "example.test"], ["account", "add", "ann@example.test", "--password", "a long secret"]]) {
    const result = await runMailctl(env.env.DATABASE_URL!, args);
    assert.equal(result.code, 0, result.stderr);
  }
});
after(async () => env?.close());

/** One SMTP client sending message after message until the server refuses or goes away. */
async function sender(port: number, id: number, accepted: string[]): Promise<void> {
  const socket = net.connect(port, "127.0.0.1");
  socket.on("error", () => undefined);
  let buffer = "";
  const waiting: Array<(reply: string | null) => void> = [];
  socket.on("data", (chunk) => {
    buffer += chunk.toString("latin1");
    // A complete reply ends with a line "NNN text" (a space after the code).
    const match = /(?:^|\r\n)(\d{3}) [^\r\n]*\r\n$/.exec(buffer);
    if (match) {
      const reply = buffer;
      buffer = "";
      waiting.shift()?.(reply);
    }
  });
  socket.on("close", () => {
    for (const resolve of waiting.splice(0)) resolve(null);
  });
  const reply = () => new Promise<string | null>((resolve) => waiting.push(resolve));
  const command = (line: string) => {
    const next = reply();
    socket.write(`${line}\r\n`);
    return next;
  };
  try {
    if (!(await reply())?.startsWith("220")) return;
    if (!(await command(`EHLO client${id}.example`))?.startsWith("250")) return;
    for (let n = 0; ; n++) {
      if (!(await command("MAIL FROM:<sender@remote.example>"))?.startsWith("250")) return;
      if (!(await command("RCPT TO:<ann@example.test>"))?.startsWith("250")) return;
      if (!(await command("DATA"))?.startsWith("354")) return;
      const body = `From: sender@remote.example\r\nTo: ann@example.test\r\nSubject: load ${id}/${n}\r\n\r\n${"x".repeat(2000)}\r\n.`;
      const done = await command(body);
      const queued = done && /^250 .*queued as (\S+)/m.exec(done);
      if (!queued) return;
      accepted.push(queued[1]!);
    }
  } finally {
    socket.destroy();
  }
}

test("SIGTERM under load: every 250 is committed, nothing else is, and the process exits 0", { timeout: 120_000 }, async () => {
  const smtpPort = await freePort();
  const service = await startServiceProcess("mta-inbound", { ...env.env, SMTP_PORT: String(smtpPort), INBOUND_AUTH_CHECKS: "false", MAIL_HOSTNAME: "mx.example.test" }, 60_000);
  const accepted: string[] = [];
  const senders = Array.from({ length: 16 }, (_, id) => sender(smtpPort, id, accepted));
  const started = Date.now();
  while (accepted.length < 200 && Date.now() - started < 30_000) await new Promise((resolve) => setTimeout(resolve, 50));
  assert.ok(accepted.length >= 200, `only ${accepted.length} messages accepted before SIGTERM\n${service.output()}`);

  const code = await service.stop();
  await Promise.all(senders);
  assert.equal(code, 0, service.output());

  const rows = await env.pool.query<{ queue_id: string }>("SELECT queue_id FROM messages");
  const committed = new Set(rows.rows.map((row) => row.queue_id));
  assert.deepEqual(accepted.filter((id) => !committed.has(id)), [], "answered 250 but not committed");
  const answered = new Set(accepted);
  assert.deepEqual([...committed].filter((id) => !answered.has(id)), [], "committed without a 250");
  assert.equal(committed.size, accepted.length);
});

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtemp } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import tls from "node:tls";
import nodemailer from "nodemailer";
import { createTestEnv, freePort, startServiceProcess, waitFor, type ServiceProcess, type TestEnv } from "@mailstack/testkit";
import { PASSWORDS, rawTls, seedDirectory } from "./helpers.ts";

let env: TestEnv;
let ports: { submission: number; submissions: number };
let tlsDir: string;

before(async () => {
  env = await createTestEnv();
  await seedDirectory(env.pool);
  ports = { submission: await freePort(), submissions: await freePort() };
  tlsDir = await mkdtemp(join(tmpdir(), "msa-service-tls-"));
});
after(async () => env?.close());

function start(): Promise<ServiceProcess> {
  return startServiceProcess("msa", {
    ...env.env,
    MAIL_HOSTNAME: "msa.example.test",
    SUBMISSION_LISTEN: "127.0.0.1",
    SUBMISSION_PORT: String(ports.submission),
    SUBMISSIONS_PORT: String(ports.submissions),
    TLS_DIR: tlsDir,
    AUTH_FAILURE_DELAY: "10ms",
  });
}

test("the msa process accepts authenticated submissions on 465 and 587 and reports them in /metrics", async () => {
  const msa = await start();
  try {
    for (const [port, secure] of [[ports.submissions, true], [ports.submission, false]] as const) {
      const transport = nodemailer.createTransport({
        host: "127.0.0.1", port, secure, requireTLS: !secure,
        auth: { user: "alice@example.test", pass: PASSWORDS.alice }, tls: { rejectUnauthorized: false },
      });
      const info = await transport.sendMail({ from: "alice@example.test", to: "bob@example.test", subject: `process-${port}`, text: "hi" });
      transport.close();
      assert.match(info.response, /^250 /);
    }
    const metrics = await (await fetch(`http://127.0.0.1:${msa.opsPort}/metrics`)).text();
    assert.match(metrics, /msa_auth_total\{result="ok"\} 2/);
    assert.match(metrics, /msa_dkim_signed_total 2/);
  } finally {
    assert.equal(await msa.stop(), 0);
  }
});

test("SIGTERM during DATA: the transaction in flight is committed and answered 250, then the process exits 0", async () => {
  const msa = await start();
  const client = await rawTls(ports.submissions);
  assert.match(await client.reply(), /^220 /);
  assert.match(await client.command("EHLO client.test"), /^250 /);
  const token = Buffer.from(`\0alice@example.test\0${PASSWORDS.alice}`).toString("base64");
  assert.match(await client.command(`AUTH PLAIN ${token}`), /^235 2\.7\.0/);
  assert.match(await client.command("MAIL FROM:<alice@example.test>"), /^250 /);
  assert.match(await client.command("RCPT TO:<bob@example.test>"), /^250 /);
  assert.match(await client.command("DATA"), /^354 /);
  client.socket.write("From: alice@example.test\r\nSubject: in-flight\r\n\r\nfirst half\r\n");

  const exited = msa.stop();
  await new Promise((resolve) => setTimeout(resolve, 300));
  // New connections are no longer accepted while the open transaction is finished.
  const refused = await new Promise<boolean>((resolve) => {
    const probe = tls.connect({ port: ports.submissions, host: "127.0.0.1", rejectUnauthorized: false }, () => {
      probe.destroy();
      resolve(false);
    });
    probe.once("error", () => resolve(true));
  });
  assert.ok(refused, "the listener is closed after SIGTERM");
  client.socket.write("second half\r\n.\r\n");
  assert.match(await client.reply(), /^250 2\.0\.0 Ok: queued as /);
  client.socket.end();
  assert.equal(await exited, 0);
  const stored = await waitFor(async () =>
    (await env.pool.query("SELECT raw FROM messages WHERE position('Subject: in-flight' in convert_from(raw, 'LATIN1')) > 0")).rows[0],
  );
  assert.match(stored.raw.toString(), /first half\r\nsecond half\r\n$/);
});

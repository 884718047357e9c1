import assert from "node:assert/strict";
import { execFile, spawn, type ChildProcess } from "node:child_process";
import { mkdtemp } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { addAccount, addDomain } from "@mailstack/db";
import { freePort, createTestEnv, waitFor, type TestEnv } from "@mailstack/testkit";
import { RawSmtp } from "@mailstack/smtp-intake/testing";

const run = promisify(execFile);
const main = fileURLToPath(new URL("../src/main.ts", import.meta.url));

let env: TestEnv;

before(async () => {
  env = await createTestEnv();
  await addDomain(env.pool, "example.test");
  await addAccount(env.pool, { address: "ann@example.test", password: "pw" });
});

after(async () => {
  await env.close();
});

function exited(child: ChildProcess): Promise<number | null> {
  return new Promise((resolve) => child.once("exit", (code) => resolve(code)));
}

/** The service as its own process on loopback ports; `output()` is everything it printed. */
async function spawnInbound(settings: Record<string, string>) {
  const [smtpPort, opsPort] = [await freePort(), await freePort()];
  const child = spawn(process.execPath, [main], {
    env: {
      ...process.env,
      ...env.env,
      SMTP_PORT: String(smtpPort),
      SMTP_HOST: "127.0.0.1",
      OPS_PORT: String(opsPort),
      INBOUND_AUTH_CHECKS: "false",
      TLS_DIR: await mkdtemp(join(tmpdir(), "inbound-tls-")),
      ...settings,
    },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let output = "";
  child.stdout!.on("data", (d) => (output += d));
  child.stderr!.on("data", (d) => (output += d));
  return { child, smtpPort, opsPort, exit: exited(child), output: () => output };
}

test("the service starts from its environment, accepts mail, and stops gracefully on SIGTERM", async () => {
  const { child, smtpPort, opsPort, exit, output } = await spawnInbound({ MAIL_HOSTNAME: "mx.example.test", SMTP_MAX_MESSAGE_SIZE: "1M" });
  try {
    await waitFor(async () => (await fetch(`http://127.0.0.1:${opsPort}/readyz`)).ok, 20_000, 100);
    const { stdout } = await run("swaks", ["--server", "127.0.0.1", "--port", String(smtpPort), "--from", "x@remote.example", "--to", "ann@example.test"]);
    assert.match(stdout, /250 2\.0\.0 Ok: queued as \w+/);
    const ehlo = await RawSmtp.connect(smtpPort);
    await ehlo.reply();
    assert.ok((await ehlo.command("EHLO check.example")).lines.includes(`SIZE ${1024 * 1024}`), "SMTP_MAX_MESSAGE_SIZE reaches the server");
    assert.equal((await ehlo.command("STARTTLS")).code, 220);
    await ehlo.startTls();
    const peer = (ehlo.socket as import("node:tls").TLSSocket).getPeerCertificate();
    assert.match(String(peer.subject.CN), /mx\.example\.test/, "the generated certificate names MAIL_HOSTNAME");
    assert.equal((await ehlo.command("EHLO check.example")).code, 250);
    ehlo.close();
    const metrics = await (await fetch(`http://127.0.0.1:${opsPort}/metrics`)).text();
    assert.match(metrics, /mail_messages_accepted_total\{service="mta-inbound"\} 1/);
  } finally {
    child.kill("SIGTERM");
  }
  assert.equal(await exit, 0, output());
  const rows = await env.pool.query("SELECT count(*)::int AS n FROM messages");
  assert.equal(rows.rows[0].n, 1);
});

test("a bad setting is reported by name and the process exits 78", async () => {
  const { exit, output } = await spawnInbound({ SMTP_MAX_MESSAGE_SIZE: "huge", SMTP_PORT: "99999" });
  assert.equal(await exit, 78);
  assert.match(output(), /SMTP_MAX_MESSAGE_SIZE/);
  assert.match(output(), /SMTP_PORT/);
});

test("SRS_DOMAIN without SRS_SECRETS: the process refuses to start (exit 78) and says why", async () => {
  const { exit, output } = await spawnInbound({ SRS_DOMAIN: "srs.example.test" });
  assert.equal(await exit, 78);
  assert.match(output(), /SRS_SECRETS: required when SRS_DOMAIN is set/);
});

test("a MAIL_HOSTNAME that is not fully qualified is warned about at start", async () => {
  const { child, exit, output } = await spawnInbound({ MAIL_HOSTNAME: "localhost", LOG_LEVEL: "info" });
  try {
    await waitFor(() => output().includes("mta-inbound ready"), 20_000, 50);
  } finally {
    child.kill("SIGTERM");
  }
  await exit;
  const warning = output().split("\n").find((line) => line.includes("MAIL_HOSTNAME is not a fully qualified"));
  assert.ok(warning, output());
  assert.equal(JSON.parse(warning).level, "warn");
  assert.equal(JSON.parse(warning).mailHostname, "localhost");
});

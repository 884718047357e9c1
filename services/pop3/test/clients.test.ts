import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtemp, readFile, rm, writeFile, chmod } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { createTestEnv, type TestEnv } from "@mailstack/testkit";
import type { Pop3Server } from "../src/server.ts";
import { createAccount, fileMessage, startTestServer, type TestAccount } from "./helpers.ts";

const here = fileURLToPath(new URL(".", import.meta.url));

function run(file: string, args: string[], options: { env?: NodeJS.ProcessEnv } = {}): Promise<{ code: number; stdout: Buffer; stderr: string }> {
  return new Promise((resolve) => {
    execFile(file, args, { encoding: "buffer", maxBuffer: 200 * 1024 * 1024, timeout: 60_000, env: options.env ?? process.env }, (error, stdout, stderr) => {
      resolve({ code: error ? Number((error as { code?: number }).code ?? 1) : 0, stdout, stderr: stderr.toString() });
    });
  });
}

// A mixed mailbox: plain, dot lines, bare LF, no final newline, 8-bit, a header prefix, a larger one.
const MESSAGES: Array<{ raw: Buffer; prefix: string }> = [
  { raw: Buffer.from("From: a@example.test\r\nSubject: plain\r\n\r\nHello.\r\n"), prefix: "Return-Path: <a@example.test>\r\nDelivered-To: mixed@example.test\r\n" },
  { raw: Buffer.from("Subject: dots\r\n\r\n.leading dot\r\n..two\r\n.\r\nafter\r\n"), prefix: "" },
  { raw: Buffer.from("Subject: bare lf\n\nline one\nline two"), prefix: "" },
  { raw: Buffer.concat([Buffer.from("Subject: 8bit\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"), Buffer.from("Grüße, 日本語\r\n"), Buffer.from([0xff, 0xfe, 0x0d, 0x0a])]), prefix: "" },
  { raw: Buffer.from(`Subject: big\r\n\r\n${"0123456789abcdef ".repeat(4).concat("\r\n").repeat(6000)}`), prefix: "" },
];

/** What POP3 must deliver for a stored message: CRLF everywhere, final CRLF. */
function canonical(prefix: string, raw: Buffer): Buffer {
  let text = Buffer.concat([Buffer.from(prefix), raw]).toString("latin1").replace(/\r?\n/g, "\r\n");
  if (text.length && !text.endsWith("\r\n")) text += "\r\n";
  return Buffer.from(text, "latin1");
}

let env: TestEnv;
let server: Pop3Server;
let account: TestAccount;
let dir: string;
let caFile: string;

before(async () => {
  env = await createTestEnv();
  server = await startTestServer(env);
  account = await createAccount(env.pool, "mixed@example.test", "mixed-Pw-1");
  for (const m of MESSAGES) await fileMessage(env.pool, account.id, m.raw, m.prefix);
  dir = await mkdtemp(join(tmpdir(), "pop3-clients-"));
  caFile = join(dir, "ca.pem");
  await writeFile(caFile, server.tls.cert);
});

after(async () => {
  await server?.stop();
  await env?.close();
  if (dir) await rm(dir, { recursive: true, force: true });
});

test("Python poplib over STLS and over implicit TLS: every message byte-for-byte, octets as LISTed", async () => {
  for (const [mode, port] of [["stls", server.port], ["ssl", server.tlsPort]] as const) {
    const result = await run("/usr/bin/python3", [join(here, "pop_client.py"), "127.0.0.1", String(port), mode, caFile, account.address, account.password]);
    assert.equal(result.code, 0, result.stderr);
    const out = JSON.parse(result.stdout.toString());
    if (mode === "stls") {
      assert.ok(out.capa_before.includes("STLS"));
      assert.ok(!out.capa_after.includes("STLS"));
    }
    assert.equal(out.stat[0], MESSAGES.length);
    const expected = MESSAGES.map((m) => canonical(m.prefix, m.raw));
    assert.equal(out.stat[1], expected.reduce((sum, b) => sum + b.length, 0));
    assert.deepEqual(out.list, expected.map((b, i) => `${i + 1} ${b.length}`));
    for (const [i, m] of out.messages.entries()) {
      assert.ok(Buffer.from(m.b64, "base64").equals(expected[i]!), `message ${i + 1} differs (${mode})`);
      assert.equal(m.octets, expected[i]!.length, `poplib's octet count for message ${i + 1}`);
      assert.equal(m.resp, `+OK ${expected[i]!.length} octets`);
    }
    assert.equal(out.uidl.length, MESSAGES.length);
    assert.ok(Buffer.from(out.top, "base64").toString().endsWith("Delivered-To: mixed@example.test\r\nFrom: a@example.test\r\nSubject: plain\r\n\r\n"));
  }
});

test("curl pop3:// lists and retrieves byte-for-byte; pop3s:// with the server certificate", async () => {
  const user = `${account.address}:${account.password}`;
  const list = await run("curl", ["-sS", "--user", user, `pop3://127.0.0.1:${server.port}/`]);
  assert.equal(list.code, 0, list.stderr);
  const expected = MESSAGES.map((m) => canonical(m.prefix, m.raw));
  assert.equal(list.stdout.toString(), expected.map((b, i) => `${i + 1} ${b.length}\r\n`).join(""));
  for (const i of [2, 5]) {
    const retr = await run("curl", ["-sS", "--user", user, `pop3://127.0.0.1:${server.port}/${i}`]);
    assert.equal(retr.code, 0, retr.stderr);
    assert.ok(retr.stdout.equals(expected[i - 1]!), `curl RETR ${i} differs`);
  }
  const secure = await run("curl", ["-sS", "--cacert", caFile, "--resolve", `localhost:${server.tlsPort}:127.0.0.1`, "--user", user, `pop3s://localhost:${server.tlsPort}/1`]);
  assert.equal(secure.code, 0, secure.stderr);
  assert.ok(secure.stdout.equals(expected[0]!));
  const stls = await run("curl", ["-sS", "--ssl-reqd", "--cacert", caFile, "--resolve", `localhost:${server.port}:127.0.0.1`, "--user", user, `pop3://localhost:${server.port}/4`]);
  assert.equal(stls.code, 0, stls.stderr);
  assert.ok(stls.stdout.equals(expected[3]!));
});

test("fetchmail retrieves the mixed mailbox into a local mbox byte-for-byte, then deletes on the server", async () => {
  const mbox = join(dir, "mbox");
  const rc = join(dir, "fetchmailrc");
  await writeFile(rc, [
    "set no bouncemail",
    `poll 127.0.0.1 port ${server.port} protocol POP3 auth password`,
    `  user "${account.address}" there with password "${account.password}" is "root" here`,
    `  options fetchall no rewrite sslproto "" mda "/usr/bin/python3 ${join(here, "fetchmail_mda.py")} ${mbox}"`,
    "",
  ].join("\n"));
  await chmod(rc, 0o600);
  const result = await run("fetchmail", ["-f", rc, "-i", join(dir, "fetchids"), "--nosyslog", "--invisible", "-v"], { env: { ...process.env, HOME: dir, FETCHMAILHOME: dir } });
  assert.equal(result.code, 0, `fetchmail exited ${result.code}: ${result.stderr}\n${result.stdout}`);
  const got = await readFile(mbox);
  // fetchmail hands the MDA each message with LF line endings.
  const expected = Buffer.concat(MESSAGES.map((m) => Buffer.concat([
    Buffer.from("From fetchmail@localhost Thu Jan  1 00:00:00 1970\n"),
    Buffer.from(canonical(m.prefix, m.raw).toString("latin1").replace(/\r\n/g, "\n"), "latin1"),
    Buffer.from("\n"),
  ])));
  assert.equal(got.length, expected.length, got.toString("latin1").slice(0, 600));
  assert.ok(got.equals(expected), "mbox differs");
  const left = await env.pool.query("SELECT count(*)::int AS n FROM mailbox_entries WHERE account_id = $1 AND NOT deleted", [account.id]);
  assert.equal(left.rows[0].n, 0, "fetchmail deleted what it retrieved (DELE + QUIT)");
});

// Process-level faults: the maildrop lock survives no crash (SIGKILL of the service releases it,
// since it lives on the session's PostgreSQL connection), SIGTERM shuts down gracefully, and a
// 50 MiB RETR streams within a small memory budget.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFile, type ChildProcess } from "node:child_process";
import { createHash } from "node:crypto";
import { fileURLToPath } from "node:url";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import { freePort, createTestEnv, waitFor, type TestEnv } from "@mailstack/testkit";
import { createAccount, fileMessage, PopClient, startTestServer } from "./helpers.ts";

const mainPath = fileURLToPath(new URL("../src/main.ts", import.meta.url));
let env: TestEnv;

before(async () => {
  env = await createTestEnv();
});
after(async () => {
  await env?.close();
});

async function startProcess(): Promise<{ child: ChildProcess; port: number; exited: Promise<number | null> }> {
  const port = await freePort();
  const child = spawn(process.execPath, [mainPath], {
    env: { ...process.env, ...env.env, LOG_LEVEL: "info", POP3_HOST: "127.0.0.1", POP3_PORT: String(port), POP3S_PORT: String(await freePort()), OPS_PORT: "0", TLS_DIR: "/tmp/mailstack-pop3-test-tls" },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let log = "";
  child.stdout!.on("data", (c) => (log += c));
  child.stderr!.on("data", (c) => (log += c));
  const exited = new Promise<number | null>((resolve) => child.once("exit", (code) => resolve(code)));
  await waitFor(() => log.includes("pop3 listening"), 30_000, 100).catch((error) => {
    child.kill("SIGKILL");
    throw new Error(`${error.message}\n${log}`);
  });
  return { child, port, exited };
}

test("SIGKILL of the service mid-session releases the maildrop lock and deletes nothing", async () => {
  const account = await createAccount(env.pool, "crash@example.test");
  await fileMessage(env.pool, account.id, "Subject: c\r\n\r\nd\r\n");
  const service = await startProcess();
  const { client } = await PopClient.connect(service.port);
  assert.match(await client.login(account), /^\+OK maildrop has 1/);
  assert.equal(await client.command("DELE 1"), "+OK message 1 deleted");
  service.child.kill("SIGKILL");
  await service.exited;

  const replacement = await startTestServer(env);
  try {
    const again = (await waitFor(async () => {
      const c = (await PopClient.connect(replacement.port)).client;
      const reply = await c.login(account);
      if (reply.startsWith("+OK")) return { c, reply };
      c.close();
      return null;
    }, 10_000, 200))!;
    assert.equal(again.reply.startsWith("+OK maildrop has 1 messages"), true, again.reply);
    await again.c.command("QUIT");
  } finally {
    await replacement.stop();
  }
});

test("SIGTERM: the service says goodbye to a TRANSACTION session and exits 0", async () => {
  const account = await createAccount(env.pool, "term@example.test");
  await fileMessage(env.pool, account.id, "Subject: t\r\n\r\nu\r\n");
  const service = await startProcess();
  const { client } = await PopClient.connect(service.port);
  await client.login(account);
  service.child.kill("SIGTERM");
  assert.match(await client.line(), /^-ERR \[SYS\/TEMP\] server shutting down/);
  assert.equal(await service.exited, 0);
});

test("RETR of a 50 MiB message streams: exact bytes, small memory growth", async () => {
  const line = "The quick brown fox jumps over the lazy dog. 0123456789 abcdefghijklmnopq\r\n";
  const lines: string[] = ["Subject: huge\r\n", "\r\n"];
  for (let i = 0; lines.length * line.length < 50 * 1024 * 1024; i++) lines.push(i % 1000 === 0 ? `.${line}` : line);
  const raw = Buffer.from(lines.join(""));
  const digest = createHash("sha256").update(raw).digest("hex");
  const account = await createAccount(env.pool, "huge@example.test");
  await fileMessage(env.pool, account.id, raw);
  lines.length = 0;
  const server = await startTestServer(env);
  try {
    // Measure what is retained, not garbage the collector has not got round to yet.
    setFlagsFromString("--expose-gc");
    const gc = runInNewContext("gc") as () => void;
    gc();
    const baseline = process.memoryUsage();
    const buffers: number[] = [];
    let peakHeap = 0;
    const sampler = setInterval(() => {
      gc();
      const m = process.memoryUsage();
      buffers.push(m.arrayBuffers - baseline.arrayBuffers);
      peakHeap = Math.max(peakHeap, m.heapUsed - baseline.heapUsed);
    }, 150);
    const result = await new Promise<{ hash: string; size: number }>((resolve, reject) => {
      const child = execFile("bash", ["-o", "pipefail", "-c", `f=$(mktemp) && curl -sS -o "$f" --user ${account.address}:${account.password} pop3://127.0.0.1:${server.port}/1 && sha256sum < "$f" && wc -c < "$f"; rc=$?; rm -f "$f"; exit $rc`], { timeout: 60_000 }, (error, stdout) => {
        if (error) return reject(error);
        const [hashLine, sizeLine] = stdout.trim().split("\n");
        resolve({ hash: hashLine!.split(" ")[0]!, size: Number(sizeLine) });
      });
      child.on("error", reject);
    });
    clearInterval(sampler);
    assert.equal(result.size, raw.length);
    assert.equal(result.hash, digest);
    const mib = (n: number) => Math.round(n / 1024 / 1024);
    buffers.sort((a, b) => a - b);
    const peakBuffers = buffers[buffers.length - 1] ?? 0;
    const medianBuffers = buffers[Math.floor(buffers.length / 2)] ?? 0;
    // Buffering the message would hold at least its 50 MiB (plus its encoded copy) for most of the
    // transfer. Freed buffers' memory is returned lazily, so single samples jitter: the median is
    // the steady state, the peak must still stay below the size of the message.
    assert.ok(buffers.length >= 3, "sampled during the transfer");
    assert.ok(medianBuffers < 16 * 1024 * 1024, `buffers grew by ${mib(medianBuffers)} MiB (median)`);
    assert.ok(peakBuffers < 48 * 1024 * 1024, `buffers grew by ${mib(peakBuffers)} MiB at peak`);
    assert.ok(peakHeap < 24 * 1024 * 1024, `heap grew by ${mib(peakHeap)} MiB`);
    console.log(`50 MiB RETR: buffers +${mib(medianBuffers)} MiB median, +${mib(peakBuffers)} MiB peak (${buffers.length} samples); heap +${mib(peakHeap)} MiB peak`);
  } finally {
    await server.stop();
  }
});

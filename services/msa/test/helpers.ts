import { execFile, spawn } from "node:child_process";
import { mkdtemp } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Writable } from "node:stream";
import tls from "node:tls";
import { fileURLToPath } from "node:url";
import { pino } from "pino";
import { addAccount, addAlias, addDomain, type Pool } from "@mailstack/db";
import { createDomainDkimKey, type DkimDnsRecord } from "@mailstack/dkim";
import { loadTlsCredentials } from "@mailstack/runtime";
import type { Logger } from "@mailstack/telemetry";
import type { MsaSettings } from "../src/server.ts";

export const PASSWORDS = {
  alice: "alice-Secret-pw-1",
  bob: "bob-Secret-pw-2",
  carol: "carol-Secret-pw-3",
  dave: "dave-Secret-pw-4",
  wrong: "definitely-Wrong-pw-9",
};

const clientScript = fileURLToPath(new URL("./smtp_client.py", import.meta.url));

/** Runs a scenario of smtp_client.py with Debian's Python (smtplib). */
export function python(args: string[], stdin = ""): Promise<Record<string, any>> {
  return new Promise((resolve, reject) => {
    const child = spawn("/usr/bin/python3", [clientScript, ...args]);
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (c) => (stdout += c));
    child.stderr.on("data", (c) => (stderr += c));
    child.on("close", (code) => {
      if (code !== 0) return reject(new Error(`smtp_client.py ${args.join(" ")} exited ${code}: ${stderr}`));
      resolve(JSON.parse(stdout));
    });
    child.stdin.end(stdin);
  });
}

/** Runs swaks; resolves with its exit code and output. */
export function swaks(args: string[]): Promise<{ code: number; output: string }> {
  return new Promise((resolve) => {
    execFile("swaks", args, { timeout: 30_000 }, (error, stdout, stderr) => {
      resolve({ code: error ? ((error as { code?: number }).code ?? 1) : 0, output: `${stdout}${stderr}` });
    });
  });
}

/** Verifies every DKIM-Signature with python3-dkim, serving TXT records from the given map. */
export function pythonDkimVerify(message: Buffer, records: Record<string, string>): Promise<boolean[]> {
  const script = `
import sys, json, dkim
data = sys.stdin.buffer.read()
records = json.loads(sys.argv[1])
def dnsfunc(name, timeout=5):
    value = records.get(name.decode().rstrip("."))
    return value.encode() if value else None
def check(i):
    try:
        return bool(dkim.DKIM(data).verify(idx=i, dnsfunc=dnsfunc))
    except dkim.DKIMException:
        return False
d = dkim.DKIM(data)
count = len([h for h in d.headers if h[0].lower() == b"dkim-signature"])
print(json.dumps([check(i) for i in range(count)]))
`;
  return new Promise((resolve, reject) => {
    const child = spawn("/usr/bin/python3", ["-c", script, JSON.stringify(records)]);
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (c) => (stdout += c));
    child.stderr.on("data", (c) => (stderr += c));
    child.on("close", (code) => (code === 0 ? resolve(JSON.parse(stdout)) : reject(new Error(stderr))));
    child.stdin.end(message);
  });
}

/** A logger at trace level whose lines are kept in memory (to check that no password is logged). */
export function memoryLogger(): { logger: Logger; lines: string[] } {
  const lines: string[] = [];
  const stream = new Writable({
    write(chunk, _encoding, callback) {
      lines.push(chunk.toString());
      callback();
    },
  });
  return { logger: pino({ level: "trace", base: { service: "msa" } }, stream) as unknown as Logger, lines };
}

export async function testTls(): Promise<{ key: string; cert: string }> {
  const dir = await mkdtemp(join(tmpdir(), "msa-tls-"));
  const credentials = await loadTlsCredentials({ dir, hostname: "localhost" });
  return { key: credentials.key, cert: credentials.cert };
}

/** The directory the tests use: two domains with DKIM keys, accounts and aliases. */
export async function seedDirectory(pool: Pool): Promise<Record<string, DkimDnsRecord>> {
  await addDomain(pool, "example.test");
  await addDomain(pool, "other.test");
  for (const name of ["alice", "bob", "carol", "dave"] as const) {
    await addAccount(pool, { address: `${name}@example.test`, password: PASSWORDS[name] });
  }
  await addAlias(pool, "sales@example.test", ["alice@example.test", "bob@example.test"]);
  await addAlias(pool, "alice@other.test", ["alice@example.test"]);
  await addAlias(pool, "*@other.test", ["bob@example.test"]);
  const { record: rsa } = await createDomainDkimKey(pool, "example.test", { selector: "s1", algorithm: "rsa-sha256" });
  const { record: ed } = await createDomainDkimKey(pool, "other.test", { selector: "s2", algorithm: "ed25519-sha256" });
  return { [rsa.name]: rsa, [ed.name]: ed };
}

export function testSettings(overrides: Partial<MsaSettings> = {}): MsaSettings {
  return {
    hostname: "msa.example.test",
    listen: "127.0.0.1",
    submissionPort: 0,
    submissionsPort: 0,
    authBeforeTls: false,
    intake: {},
    auth: { failureDelayMs: 20, maxFailuresPerConnection: 3, maxFailuresPerIp: 1000, maxFailuresPerAccount: 4, windowMs: 900_000 },
    submission: { maxMessages: 1000, maxRecipients: 5000, windowMs: 3_600_000 },
    popBeforeSmtp: { enabled: false, windowMs: 600_000 },
    dkimKeyCacheMs: 30_000,
    sweep: { intervalMs: 10_000, undispatchedAfterMs: 15_000 },
    ...overrides,
  };
}

/** A line-oriented client over implicit TLS, to hold a transaction open at a chosen point. */
export async function rawTls(port: number) {
  const socket = tls.connect({ port, host: "127.0.0.1", rejectUnauthorized: false });
  await new Promise<void>((resolve, reject) => socket.once("secureConnect", resolve).once("error", reject));
  let buffer = "";
  const waiting: Array<() => void> = [];
  socket.setEncoding("latin1");
  socket.on("data", (chunk: string) => {
    buffer += chunk;
    waiting.splice(0).forEach((wake) => wake());
  });
  socket.on("close", () => waiting.splice(0).forEach((wake) => wake()));
  const reply = async (): Promise<string> => {
    for (;;) {
      const match = /(?:^|\n)(\d{3}) [^\n]*\r\n/.exec(buffer);
      if (match) {
        const end = match.index + match[0].length;
        const text = buffer.slice(0, end);
        buffer = buffer.slice(end);
        return text.trim().split("\r\n").pop()!;
      }
      if (socket.destroyed) return "closed";
      await new Promise<void>((resolve) => waiting.push(resolve));
    }
  };
  const command = async (line: string) => {
    socket.write(`${line}\r\n`);
    return reply();
  };
  return { socket, reply, command };
}


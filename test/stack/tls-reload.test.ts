// Certificate renewal without a restart: mta-inbound, msa and pop3 run as their own processes
// with TLS_CERT_FILE/TLS_KEY_FILE; the files are replaced on disk (as cert-manager rewrites a
// mounted Secret) and every TLS endpoint, implicit or upgraded, presents the new certificate.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { X509Certificate } from "node:crypto";
import { mkdtemp, rename, rm, writeFile } from "node:fs/promises";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import tls from "node:tls";
import { loadTlsCredentials, type TlsCredentials } from "@mailstack/runtime";
import { createTestEnv, freePort, startServiceProcess, waitFor, type ServiceProcess, type TestEnv } from "@mailstack/testkit";

let env: TestEnv;
let dir: string;
const services: ServiceProcess[] = [];
const endpoints: Array<{ name: string; presented: () => Promise<string> }> = [];
let first: TlsCredentials;
let renewed: TlsCredentials;

/** Writes a PEM file the way a renewal does: a new file moved over the old one. */
async function replace(path: string, text: string): Promise<void> {
  await writeFile(`${path}.new`, text);
  await rename(`${path}.new`, path);
}

/** Reads one reply (the last line starts with its code and a space, or is a POP3 status line). */
function readReply(socket: net.Socket, complete: (text: string) => boolean): Promise<string> {
  return new Promise((resolve, reject) => {
    let text = "";
    const onData = (chunk: Buffer) => {
      text += chunk.toString("latin1");
      if (!complete(text)) return;
      socket.off("data", onData);
      socket.off("error", reject);
      resolve(text);
    };
    socket.on("data", onData);
    socket.once("error", reject);
  });
}

const smtpDone = (text: string) => /(^|\r\n)\d{3} [^\r\n]*\r\n$/.test(text);
const popDone = (text: string) => /^[+-][^\r\n]*\r\n$/.test(text);

function fingerprintOf(socket: tls.TLSSocket): string {
  const fingerprint = socket.getPeerCertificate().fingerprint256;
  socket.destroy();
  return fingerprint;
}

async function implicitTls(port: number): Promise<string> {
  const socket = tls.connect({ host: "127.0.0.1", port, rejectUnauthorized: false });
  await new Promise<void>((resolve, reject) => socket.once("secureConnect", resolve).once("error", reject));
  return fingerprintOf(socket);
}

async function upgraded(socket: net.Socket): Promise<string> {
  const secure = tls.connect({ socket, rejectUnauthorized: false });
  await new Promise<void>((resolve, reject) => secure.once("secureConnect", resolve).once("error", reject));
  return fingerprintOf(secure);
}

async function smtpStarttls(port: number): Promise<string> {
  const socket = net.connect(port, "127.0.0.1");
  assert.match(await readReply(socket, smtpDone), /^220 /);
  socket.write("EHLO client.test\r\n");
  assert.match(await readReply(socket, smtpDone), /STARTTLS/);
  socket.write("STARTTLS\r\n");
  assert.match(await readReply(socket, smtpDone), /^220 /);
  return upgraded(socket);
}

async function popStls(port: number): Promise<string> {
  const socket = net.connect(port, "127.0.0.1");
  assert.match(await readReply(socket, popDone), /^\+OK/);
  socket.write("STLS\r\n");
  assert.match(await readReply(socket, popDone), /^\+OK/);
  return upgraded(socket);
}

before(async () => {
  env = await createTestEnv();
  dir = await mkdtemp(join(tmpdir(), "tls-reload-"));
  first = await loadTlsCredentials({ dir: join(dir, "first"), hostname: "mail.example.test" });
  renewed = await loadTlsCredentials({ dir: join(dir, "renewed"), hostname: "mail.example.test" });
  await writeFile(join(dir, "tls.crt"), first.cert);
  await writeFile(join(dir, "tls.key"), first.key);
  const common = {
    ...env.env,
    MAIL_HOSTNAME: "mail.example.test",
    TLS_CERT_FILE: join(dir, "tls.crt"),
    TLS_KEY_FILE: join(dir, "tls.key"),
    TLS_RELOAD_INTERVAL: "200ms",
    LOG_LEVEL: "info",
  };
  const [smtp, submission, submissions, pop3, pop3s] = await Promise.all([freePort(), freePort(), freePort(), freePort(), freePort()]);
  services.push(
    ...(await Promise.all([
      startServiceProcess("mta-inbound", { ...common, SMTP_HOST: "127.0.0.1", SMTP_PORT: String(smtp), INBOUND_AUTH_CHECKS: "false" }),
      startServiceProcess("msa", { ...common, SUBMISSION_LISTEN: "127.0.0.1", SUBMISSION_PORT: String(submission), SUBMISSIONS_PORT: String(submissions) }),
      startServiceProcess("pop3", { ...common, POP3_HOST: "127.0.0.1", POP3_PORT: String(pop3), POP3S_PORT: String(pop3s) }),
    ])),
  );
  endpoints.push(
    { name: "mta-inbound STARTTLS", presented: () => smtpStarttls(smtp) },
    { name: "msa 587 STARTTLS", presented: () => smtpStarttls(submission) },
    { name: "msa 465", presented: () => implicitTls(submissions) },
    { name: "pop3 STLS", presented: () => popStls(pop3) },
    { name: "pop3 995", presented: () => implicitTls(pop3s) },
  );
});

after(async () => {
  for (const service of services) await service.stop();
  await env?.close();
  await rm(dir, { recursive: true, force: true });
});

test("a certificate renewed on disk is served by every TLS endpoint without a restart", async () => {
  const before = new X509Certificate(first.cert).fingerprint256;
  const after = new X509Certificate(renewed.cert).fingerprint256;
  assert.notEqual(before, after);
  for (const endpoint of endpoints) assert.equal(await endpoint.presented(), before, `${endpoint.name} serves the first certificate`);

  // The key first, then the certificate: in between the pair does not match and is skipped.
  await replace(join(dir, "tls.key"), renewed.key);
  await new Promise((resolve) => setTimeout(resolve, 600));
  for (const endpoint of endpoints) assert.equal(await endpoint.presented(), before, `${endpoint.name} keeps the old certificate while the pair is half-written`);
  await replace(join(dir, "tls.crt"), renewed.cert);

  for (const endpoint of endpoints) {
    const served = await waitFor(async () => ((await endpoint.presented()) === after ? "renewed" : null), 10_000, 100).catch(() => "old");
    assert.equal(served, "renewed", `${endpoint.name} serves the renewed certificate`);
  }
  for (const service of services) {
    assert.match(service.output(), /TLS certificate reloaded/, "the reload is logged");
    const metrics = await (await fetch(`http://127.0.0.1:${service.opsPort}/metrics`)).text();
    const expiry = /^tls_certificate_expiry_timestamp_seconds (\d+)/m.exec(metrics);
    assert.equal(Number(expiry?.[1]), renewed.validTo.getTime() / 1000);
  }
});

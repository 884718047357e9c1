import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { once } from "node:events";
import tls from "node:tls";
import { createPrivateKey, X509Certificate } from "node:crypto";
import { loadTlsCredentials } from "../src/tls.ts";
import { startTlsSource } from "../src/tls-reload.ts";
import { Writable } from "node:stream";
import { generate } from "selfsigned";
import { createLogger, registry } from "@mailstack/telemetry";

test("generates a self-signed pair once, caches it, and serves TLS with it", async () => {
  const dir = await mkdtemp(join(tmpdir(), "tls-"));
  try {
    const first = await loadTlsCredentials({ dir, hostname: "mail.example.test" });
    assert.equal(first.selfSigned, true);
    assert.ok(first.validTo.getTime() > Date.now() + 365 * 86_400_000);
    const second = await loadTlsCredentials({ dir, hostname: "mail.example.test" });
    assert.equal(second.cert, first.cert, "second start reuses the cached certificate");

    const server = tls.createServer(first.serverOptions, (socket) => socket.end("hello"));
    server.listen(0, "127.0.0.1");
    await once(server, "listening");
    try {
      const port = (server.address() as { port: number }).port;
      const socket = tls.connect({ port, host: "127.0.0.1", servername: "mail.example.test", ca: first.cert });
      await once(socket, "secureConnect");
      assert.equal(socket.authorized, true, "certificate valid for its hostname");
      const [data] = await once(socket, "data");
      assert.equal(String(data), "hello");
      socket.destroy();
    } finally {
      server.close();
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test("operator files: both required, and key must match certificate", async () => {
  const dir = await mkdtemp(join(tmpdir(), "tls-"));
  try {
    const a = await loadTlsCredentials({ dir: join(dir, "a") });
    const b = await loadTlsCredentials({ dir: join(dir, "b") });
    await writeFile(join(dir, "cert.pem"), a.cert);
    await writeFile(join(dir, "key.pem"), a.key);
    await writeFile(join(dir, "other-key.pem"), b.key);
    const loaded = await loadTlsCredentials({ certFile: join(dir, "cert.pem"), keyFile: join(dir, "key.pem") });
    assert.equal(loaded.selfSigned, false);
    assert.equal(loaded.cert, await readFile(join(dir, "cert.pem"), "utf8"));
    await assert.rejects(loadTlsCredentials({ certFile: join(dir, "cert.pem") }), /set together/);
    await assert.rejects(
      loadTlsCredentials({ certFile: join(dir, "cert.pem"), keyFile: join(dir, "other-key.pem") }),
      /does not match/,
    );
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test("startTlsSource: a renewed pair on disk is picked up, a half-written one is skipped", async () => {
  const dir = await mkdtemp(join(tmpdir(), "tls-"));
  const certFile = join(dir, "tls.crt");
  const keyFile = join(dir, "tls.key");
  const a = await loadTlsCredentials({ dir: join(dir, "a"), hostname: "mail.example.test" });
  const b = await loadTlsCredentials({ dir: join(dir, "b"), hostname: "mail.example.test" });
  await writeFile(certFile, a.cert);
  await writeFile(keyFile, a.key);
  const source = await startTlsSource({ certFile, keyFile, reloadIntervalMs: 0 });
  const server = tls.createServer(source.current().serverOptions, (socket) => socket.end("hello"));
  source.onChange((next) => server.setSecureContext(next.serverOptions));
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const port = (server.address() as { port: number }).port;
  const presented = async () => {
    const socket = tls.connect({ port, host: "127.0.0.1", servername: "mail.example.test", rejectUnauthorized: false });
    await once(socket, "secureConnect");
    const fingerprint = socket.getPeerCertificate().fingerprint256;
    socket.destroy();
    return fingerprint;
  };
  const fingerprintOf = (pem: string) => new X509Certificate(pem).fingerprint256;
  try {
    assert.equal(await presented(), fingerprintOf(a.cert));
    assert.equal(await source.reload(), false, "unchanged files are not a change");

    // Rotation caught halfway: the new key is there, its certificate not yet.
    await writeFile(keyFile, b.key);
    assert.equal(await source.reload(), false);
    assert.equal(source.current().cert, a.cert, "the old pair stays until a good pair replaces it");
    assert.equal(await presented(), fingerprintOf(a.cert));

    await writeFile(certFile, b.cert);
    assert.equal(await source.reload(), true);
    assert.equal(await presented(), fingerprintOf(b.cert), "new connections get the renewed certificate");

    // SIGHUP reloads at once (certbot's deploy hook, an operator).
    await writeFile(certFile, a.cert);
    await writeFile(keyFile, a.key);
    const changed = new Promise((resolve) => source.onChange(resolve));
    process.kill(process.pid, "SIGHUP");
    await changed;
    assert.equal(await presented(), fingerprintOf(a.cert));
  } finally {
    source.stop();
    server.close();
    await rm(dir, { recursive: true, force: true });
  }
});

test("the served certificate's expiry is a metric", async () => {
  const dir = await mkdtemp(join(tmpdir(), "tls-"));
  try {
    const source = await startTlsSource({ dir, hostname: "mail.example.test" });
    const text = await registry.metrics();
    const line = /^tls_certificate_expiry_timestamp_seconds (\d+)/m.exec(text);
    assert.ok(line, "metric exported");
    assert.equal(Number(line[1]), Math.floor(source.current().validTo.getTime() / 1000));
    source.stop();
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test("an operator file that holds no certificate or no key is named in the error", async () => {
  const dir = await mkdtemp(join(tmpdir(), "tls-"));
  try {
    const a = await loadTlsCredentials({ dir: join(dir, "a") });
    const certFile = join(dir, "fullchain.pem");
    const keyFile = join(dir, "privkey.pem");
    await writeFile(certFile, a.cert);
    await writeFile(keyFile, a.key);
    // The two variables swapped, the usual slip.
    await assert.rejects(loadTlsCredentials({ certFile: keyFile, keyFile: certFile }), (error: Error) => {
      assert.match(error.message, /no PEM certificate in .*privkey\.pem/);
      return true;
    });
    await assert.rejects(loadTlsCredentials({ certFile, keyFile: certFile }), /no PEM private key in .*fullchain\.pem/);
    await assert.rejects(loadTlsCredentials({ certFile, keyFile: join(dir, "missing.pem") }), /cannot read TLS_KEY_FILE .*missing\.pem/);
    // A key kept with a passphrase, which a service cannot type.
    const encrypted = createPrivateKey(a.key).export({ type: "pkcs8", format: "pem", cipher: "aes-256-cbc", passphrase: "secret" });
    await writeFile(join(dir, "encrypted.pem"), encrypted);
    await assert.rejects(loadTlsCredentials({ certFile, keyFile: join(dir, "encrypted.pem") }), /private key in .*encrypted\.pem is encrypted/);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test("an expired certificate is served, with a warning at start and after a reload", async () => {
  const dir = await mkdtemp(join(tmpdir(), "tls-"));
  const lines: Array<{ level: string; msg: string }> = [];
  const sink = new Writable({
    write(chunk, _encoding, done) {
      lines.push(JSON.parse(String(chunk)));
      done();
    },
  });
  const certFile = join(dir, "cert.pem");
  const keyFile = join(dir, "key.pem");
  const expired = await generate([{ name: "commonName", value: "mail.example.test" }], {
    keyType: "rsa",
    keySize: 2048,
    algorithm: "sha256",
    notBeforeDate: new Date("2020-01-01T00:00:00Z"),
    notAfterDate: new Date("2020-04-01T00:00:00Z"),
  });
  await writeFile(certFile, expired.cert);
  await writeFile(keyFile, expired.private);
  const source = await startTlsSource({ certFile, keyFile, reloadIntervalMs: 0, logger: createLogger("test", "info", sink) });
  try {
    assert.equal(source.current().validTo.toISOString(), "2020-04-01T00:00:00.000Z");
    const warnings = () => lines.filter((line) => line.level === "warn" && /expired on 2020-04-01/.test(line.msg));
    assert.equal(warnings().length, 1, "warned at start");

    const good = await loadTlsCredentials({ dir: join(dir, "good"), hostname: "mail.example.test" });
    await writeFile(certFile, good.cert);
    await writeFile(keyFile, good.key);
    assert.equal(await source.reload(), true);
    assert.equal(warnings().length, 1, "a valid certificate is not warned about");

    await writeFile(certFile, expired.cert);
    await writeFile(keyFile, expired.private);
    assert.equal(await source.reload(), true);
    assert.equal(warnings().length, 2, "warned again when an expired pair is loaded");
  } finally {
    source.stop();
    await rm(dir, { recursive: true, force: true });
  }
});

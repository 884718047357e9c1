import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { once } from "node:events";
import tls from "node:tls";
import { loadTlsCredentials } from "../src/tls.ts";

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

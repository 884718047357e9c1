// The per-IP limit on an implicit TLS port (465) counts connections from their TCP accept: a
// socket that never sends its ClientHello holds a slot of SMTP_MAX_CLIENTS for the whole idle
// timeout, so without it one address could keep every other client off the port.
import assert from "node:assert/strict";
import { once } from "node:events";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import tls from "node:tls";
import { after, before, test } from "node:test";
import { loadTlsCredentials } from "@mailstack/runtime";
import { createTestEnv, type TestEnv } from "@mailstack/testkit";
import type { IntakeServer } from "../src/index.ts";
import { seedDirectory, startIntake } from "./fixtures.ts";

let env: TestEnv;
let intake: IntakeServer;
const sockets: net.Socket[] = [];

before(async () => {
  env = await createTestEnv();
  await seedDirectory(env.pool);
  const credentials = await loadTlsCredentials({ dir: join(tmpdir(), "mailstack-intake-test-tls") });
  intake = await startIntake(env.pool, env.bus, {
    tlsMode: "implicit",
    tls: credentials,
    limits: { maxClients: 3, maxClientsPerIp: 2 },
  });
});

after(async () => {
  for (const socket of sockets) socket.destroy();
  await intake.stop(100);
  await env.close();
});

/** A TCP connection from `from` that never starts a TLS handshake. */
async function silent(from: string): Promise<net.Socket> {
  const socket = net.connect({ port: intake.port(), host: "127.0.0.1", localAddress: from });
  socket.on("error", () => undefined);
  sockets.push(socket);
  await once(socket, "connect");
  return socket;
}

/** The greeting over TLS from `from`, or "" when the server drops the connection first. */
function greeting(from: string): Promise<string> {
  const socket = tls.connect({ socket: net.connect({ port: intake.port(), host: "127.0.0.1", localAddress: from }), rejectUnauthorized: false });
  sockets.push(socket);
  return new Promise((resolve) => {
    let text = "";
    socket.on("data", (chunk) => {
      text += chunk.toString("latin1");
      if (text.includes("\r\n")) resolve(text.split("\r\n")[0]!);
    });
    socket.on("error", () => resolve(text));
    socket.on("close", () => resolve(text));
  });
}

const settle = () => new Promise((resolve) => setTimeout(resolve, 200));

test("sockets still before their TLS handshake count toward SMTP_MAX_CLIENTS_PER_IP on 465", async () => {
  const first = await silent("127.0.0.1");
  await silent("127.0.0.1");
  await settle();
  assert.equal(await greeting("127.0.0.1"), "", "a third connection from the address is dropped");
  // The other address still has a slot of SMTP_MAX_CLIENTS (3).
  assert.match(await greeting("127.0.0.2"), /^220 /);
  first.destroy();
  await settle();
  assert.match(await greeting("127.0.0.1"), /^220 /, "a slot comes back when a connection goes");
});

// Connection limits over real sockets: POP3_MAX_CONNECTIONS counts the connections on 995 still
// in their TLS handshake, and POP3_MAX_CONNECTIONS_PER_IP keeps one address from taking every slot.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import net from "node:net";
import tls from "node:tls";
import { once } from "node:events";
import { createTestEnv, type TestEnv } from "@mailstack/testkit";
import { startTestServer } from "./helpers.ts";
import type { Pop3Server } from "../src/server.ts";

let env: TestEnv;
const servers: Pop3Server[] = [];
const sockets: net.Socket[] = [];

before(async () => {
  env = await createTestEnv();
});
after(async () => {
  for (const socket of sockets) socket.destroy();
  for (const server of servers) await server.stop();
  await env?.close();
});

/** A TCP connection from `from` (a loopback address), kept open until the test ends. */
async function tcp(port: number, from = "127.0.0.1"): Promise<net.Socket> {
  const socket = net.connect({ port, host: "127.0.0.1", localAddress: from });
  socket.on("error", () => undefined);
  sockets.push(socket);
  await once(socket, "connect");
  return socket;
}

/** The first line the server sends on a plain connection, or "" when it closes without one. */
async function firstLine(port: number, from = "127.0.0.1"): Promise<string> {
  const socket = await tcp(port, from);
  let text = "";
  return new Promise((resolve) => {
    socket.on("data", (chunk) => {
      text += chunk.toString("latin1");
      if (text.includes("\r\n")) resolve(text.split("\r\n")[0]!);
    });
    socket.on("close", () => resolve(text));
  });
}

/** Whether a TLS handshake on 995 from `from` completes (the server's greeting arrives). */
async function tlsGreeting(port: number, from = "127.0.0.1"): Promise<string> {
  const socket = tls.connect({ socket: net.connect({ port, host: "127.0.0.1", localAddress: from }), rejectUnauthorized: false });
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

test("sockets on 995 that never start their TLS handshake count toward POP3_MAX_CONNECTIONS", async () => {
  const server = await startTestServer(env, { POP3_MAX_CONNECTIONS: 3, POP3_MAX_CONNECTIONS_PER_IP: 100 });
  servers.push(server);
  const idle = [await tcp(server.tlsPort), await tcp(server.tlsPort), await tcp(server.tlsPort)];
  await settle();
  assert.match(await firstLine(server.port), /^-ERR \[SYS\/TEMP\] too many connections/);
  assert.equal(await tlsGreeting(server.tlsPort), "", "a fourth connection on 995 is dropped");
  // A slot comes back when one of them goes.
  idle[0]!.destroy();
  await settle();
  assert.match(await firstLine(server.port), /^\+OK /);
  await server.stop();
});

test("POP3_MAX_CONNECTIONS_PER_IP: one address cannot take the slots of others, on 110 and 995", async () => {
  const server = await startTestServer(env, { POP3_MAX_CONNECTIONS: 100, POP3_MAX_CONNECTIONS_PER_IP: 2 });
  servers.push(server);
  const first = await tcp(server.port);
  await tcp(server.tlsPort);
  await settle();
  assert.match(await firstLine(server.port), /^-ERR \[SYS\/TEMP\] too many connections/);
  assert.equal(await tlsGreeting(server.tlsPort), "", "a third connection from the address on 995 is dropped");
  // Another address is served, on both ports.
  assert.match(await firstLine(server.port, "127.0.0.2"), /^\+OK /);
  assert.match(await tlsGreeting(server.tlsPort, "127.0.0.2"), /^\+OK /);
  first.destroy();
  await settle();
  assert.match(await firstLine(server.port), /^\+OK /);
  await server.stop();
});

test("a TLS handshake that fails gives its slot back", async () => {
  const server = await startTestServer(env, { POP3_MAX_CONNECTIONS: 100, POP3_MAX_CONNECTIONS_PER_IP: 1 });
  servers.push(server);
  const garbage = await tcp(server.tlsPort);
  garbage.write("this is not a ClientHello\r\n\r\n");
  await once(garbage, "close");
  await settle();
  assert.match(await tlsGreeting(server.tlsPort), /^\+OK /);
  await server.stop();
});

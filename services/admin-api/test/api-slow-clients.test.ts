// Slow and stalled HTTP clients over real sockets: Fastify turns Node's request timeouts off, so
// without an idle timeout a client that stops (or trickles) after its headers kept a connection
// for ever, and a request without a token kept reading whatever body followed its 401.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import net from "node:net";
import { once } from "node:events";
import { startHarness, type ApiHarness } from "./helpers.ts";

let h: ApiHarness;
before(async () => {
  h = await startHarness({ API_IDLE_TIMEOUT: 800 });
});
after(async () => {
  await h?.close();
});

/** A raw connection that records what it receives and when it is closed. */
async function open(): Promise<{ socket: net.Socket; received: () => string; closedAt: () => number | null }> {
  const url = new URL(h.api.url);
  const socket = net.connect(Number(url.port), url.hostname);
  let text = "";
  let closedAt: number | null = null;
  socket.on("data", (chunk) => (text += chunk.toString("latin1")));
  socket.on("close", () => (closedAt = Date.now()));
  socket.on("error", () => undefined);
  await once(socket, "connect");
  return { socket, received: () => text, closedAt: () => closedAt };
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

test("a request without a token is answered 401 and its connection closed, however slowly its body comes", async () => {
  const client = await open();
  const started = Date.now();
  client.socket.write("POST /accounts HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{");
  // A byte every 100 ms: never idle for the idle timeout.
  for (let i = 0; i < 40 && client.closedAt() === null; i++) {
    client.socket.write(" ");
    await sleep(100);
  }
  assert.match(client.received(), /^HTTP\/1\.1 401 /);
  assert.ok(client.closedAt() !== null && client.closedAt()! - started < 2_000, "the connection is closed soon after the 401");
  client.socket.destroy();
});

test("a connection that stalls in the middle of a request is closed after API_IDLE_TIMEOUT", async () => {
  const client = await open();
  const started = Date.now();
  client.socket.write(`POST /accounts HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer ${h.token}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"address":`);
  for (let i = 0; i < 40 && client.closedAt() === null; i++) await sleep(100);
  assert.ok(client.closedAt() !== null, "the stalled connection is closed");
  assert.ok(client.closedAt()! - started >= 700, `closed after ${client.closedAt()! - started} ms, not before the idle timeout`);
  client.socket.destroy();
});

test("an idle timeout does not cut a request that keeps moving", async () => {
  const client = await open();
  const body = JSON.stringify({ address: "slow@nowhere.test", password: "pw" });
  client.socket.write(`POST /accounts HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer ${h.token}\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n`);
  // Slower in total than the idle timeout, never idle for that long.
  for (const char of body.slice(0, 8)) {
    client.socket.write(char);
    await sleep(200);
  }
  client.socket.write(body.slice(8));
  for (let i = 0; i < 30 && !client.received().includes("\r\n\r\n"); i++) await sleep(100);
  // The domain does not exist: the request was read in full and answered.
  assert.match(client.received(), /^HTTP\/1\.1 404 /);
  client.socket.destroy();
});

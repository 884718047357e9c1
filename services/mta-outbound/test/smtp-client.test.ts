import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync } from "node:fs";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { loadTlsCredentials } from "@mailstack/runtime";
import { freePort, waitFor } from "@mailstack/testkit";
import { SmtpConnection, SmtpError, rfcTimeouts, type ConnectOptions, type Envelope, type Timeouts } from "../src/smtp-client.ts";
import { startScriptedMx } from "./scripted-mx.ts";

// The SMTP client against scripted servers on loopback: the answers a real server can give
// that smtp-server will not (no text after the code, silence, a 421 while idle, injected lines).

const plain = { eightBit: false, utf8Header: false };
const message = Buffer.from("Subject: hi\r\n\r\nHello.\r\n");
const envelope = (...to: string[]): Envelope => ({ from: "a@origin.test", recipients: to.map((address) => ({ address })) });

function options(server: { host: string; port: number }, extra: Partial<ConnectOptions> = {}, timeouts: Partial<Timeouts> = {}): ConnectOptions {
  return { hostname: "mx.test", address: server.host, port: server.port, heloName: "relay.test", tls: "none", timeouts: { ...rfcTimeouts, ...timeouts }, ...extra };
}

test("replies with nothing after the code ('250', '550 5.1.1') are complete replies (RFC 5321 4.2)", async () => {
  const server = await startScriptedMx("127.0.1.1", 0, {
    reply: (command) => (command.startsWith("RCPT TO:<bad") ? "550 5.1.1" : command.startsWith("MAIL") ? "250" : undefined),
    dataReply: () => "250",
  });
  try {
    const connection = await SmtpConnection.open(options(server));
    const result = await connection.send(envelope("good@x.test", "bad@x.test"), message, plain);
    assert.deepEqual(
      result.recipients.map((r) => [r.address, r.accepted, r.permanent, r.reply.code, r.reply.enhanced]),
      [
        ["good@x.test", true, false, 250, null],
        ["bad@x.test", false, true, 550, "5.1.1"],
      ],
    );
    assert.equal(connection.reusable, true);
    await connection.quit();
  } finally {
    await server.close();
  }
});

test("a multi-line reply whose lines disagree is read to its last line, whose code counts", async () => {
  const server = await startScriptedMx("127.0.1.2", 0, {
    reply: (command) => (command.startsWith("MAIL") ? "250-2.1.0 fine\r\n451-4.3.0 but\r\n451 4.3.0 not now" : undefined),
  });
  try {
    const connection = await SmtpConnection.open(options(server));
    await assert.rejects(connection.send(envelope("x@x.test"), message, plain), (error) => {
      assert.ok(error instanceof SmtpError);
      assert.equal(error.reply?.code, 451);
      assert.equal(error.temporary, true);
      return true;
    });
    await connection.quit();
  } finally {
    await server.close();
  }
});

test("a 554 greeting: the client says QUIT before it closes (RFC 5321 3.1, 3.8)", async () => {
  const server = await startScriptedMx("127.0.1.3", 0, { greeting: "554 5.7.1 no service for you" });
  try {
    await assert.rejects(SmtpConnection.open(options(server)), (error) => {
      assert.ok(error instanceof SmtpError);
      assert.equal(error.stage, "greeting");
      assert.equal(error.temporary, true, "about this host, not the message: next MX, then defer");
      assert.equal(error.status, "4.7.1", "the server's detail, in the class of the outcome");
      return true;
    });
    await waitFor(() => server.commands().includes("QUIT"), 2_000);
    assert.deepEqual(server.commands(), ["QUIT"]);
  } finally {
    await server.close();
  }
});

test("a refused RSET: the connection is not reused, and it still ends with QUIT", async () => {
  const server = await startScriptedMx("127.0.1.4", 0, {
    reply: (command) => (command.startsWith("RCPT") ? "550 5.1.1 no" : command === "RSET" ? "502 5.5.2 no RSET here" : undefined),
  });
  try {
    const connection = await SmtpConnection.open(options(server));
    const result = await connection.send(envelope("x@x.test"), message, plain);
    assert.equal(result.recipients[0]!.accepted, false);
    assert.equal(connection.reusable, false);
    await connection.quit();
    assert.deepEqual(server.commands().slice(-2), ["RSET", "QUIT"]);
  } finally {
    await server.close();
  }
});

test("STARTTLS: replies sent in clear after the 220 are discarded, not read as the answers to later commands", async () => {
  const credentials = await loadTlsCredentials({ dir: mkdtempSync(join(tmpdir(), "relay-tls-")), hostname: "mx.test" });
  const server = await startScriptedMx("127.0.1.5", 0, {
    tls: { key: credentials.key, cert: credentials.cert },
    // A man in the middle appends an EHLO answer of its own and a MAIL answer.
    reply: (command) => (command === "STARTTLS" ? "220 2.0.0 Ready\r\n250-injected\r\n250 INJECTED\r\n250 2.1.0 injected" : undefined),
  });
  try {
    const connection = await SmtpConnection.open(options(server, { tls: "required" }));
    assert.equal(connection.secure, true);
    assert.equal(connection.extensions.has("INJECTED"), false);
    assert.equal(connection.extensions.has("PIPELINING"), true, "the extensions are the ones the server gave over TLS");
    const result = await connection.send(envelope("x@x.test"), message, plain);
    assert.equal(result.recipients[0]!.accepted, true);
    assert.equal(server.connections[0]!.messages.length, 1);
    await connection.quit();
  } finally {
    await server.close();
  }
});

test("a server refusing our TLS after a TLS 1.3 handshake (no client certificate): a failed STARTTLS, which opportunistic TLS retries in clear", async () => {
  const credentials = await loadTlsCredentials({ dir: mkdtempSync(join(tmpdir(), "relay-tls-")), hostname: "mx.test" });
  const server = await startScriptedMx("127.0.1.18", 0, { tls: { key: credentials.key, cert: credentials.cert, requestCert: true } });
  try {
    // TLS 1.3 ends the client's handshake before the server has checked it: the refusal (an alert)
    // comes at the first read, the reply to the EHLO over TLS.
    await assert.rejects(SmtpConnection.open(options(server, { tls: "opportunistic" })), (error) => {
      assert.ok(error instanceof SmtpError);
      assert.equal(error.stage, "starttls", error.message);
      assert.equal(error.temporary, true);
      return true;
    });
    const clear = await SmtpConnection.open(options(server, { tls: "none" }));
    assert.equal(clear.secure, false);
    await clear.quit();
  } finally {
    await server.close();
  }
});

test("a reply nobody asked for while idle (421 idle timeout) makes the connection unusable; the next send fails before writing", async () => {
  const server = await startScriptedMx("127.0.1.6", 0);
  try {
    const connection = await SmtpConnection.open(options(server));
    await connection.send(envelope("x@x.test"), message, plain);
    // The server gives up on the idle connection but has not closed it yet.
    server.connections[0]!.write("421 4.4.2 mx.test idle timeout, closing\r\n");
    await waitFor(() => !connection.reusable, 2_000);
    const commands = server.commands().length;
    await assert.rejects(connection.send(envelope("y@x.test"), message, plain), (error) => {
      assert.ok(error instanceof SmtpError);
      assert.equal(error.stage, "mail");
      assert.equal(error.reply, null, "the 421 is not taken as the answer to a MAIL never sent");
      return true;
    });
    assert.equal(server.commands().length, commands, "nothing was sent");
    connection.destroy();
  } finally {
    await server.close();
  }
});

test("a pipelined MAIL answered 421 (and the connection closed) fails at MAIL at once, not at a later RCPT", async () => {
  const server = await startScriptedMx("127.0.1.13", 0, {
    reply(command, connection) {
      if (!command.startsWith("MAIL") || connection.commands.filter((c) => c.startsWith("MAIL")).length < 2) return undefined;
      connection.close();
      return "421 4.7.0 Too many messages on this connection";
    },
  });
  try {
    const connection = await SmtpConnection.open(options(server, {}, { command: 60_000 }));
    await connection.send(envelope("x@x.test"), message, plain);
    const started = Date.now();
    await assert.rejects(connection.send(envelope("y@x.test", "z@x.test"), message, plain), (error) => {
      assert.ok(error instanceof SmtpError);
      assert.equal(error.stage, "mail", "the stage a relay retries on a fresh connection");
      assert.equal(error.reply?.code, 421);
      return true;
    });
    assert.ok(Date.now() - started < 1_000, "no wait for replies that will never come");
    assert.ok(!server.commands().includes("RSET"), "no RSET to a server that is closing");
  } finally {
    await server.close();
  }
});

test("a 421 to RCPT: the server is closing, so no DATA, every recipient deferred, the connection unusable", async () => {
  const server = await startScriptedMx("127.0.1.7", 0, {
    extensions: ["8BITMIME"],
    reply: (command) => (command.startsWith("RCPT TO:<second") ? "421 4.3.2 shutting down" : undefined),
  });
  try {
    const connection = await SmtpConnection.open(options(server));
    const result = await connection.send(envelope("first@x.test", "second@x.test"), message, plain);
    // Nothing more is said to a server that is closing: the accepted recipient is deferred too.
    assert.deepEqual(result.recipients.map((r) => [r.accepted, r.permanent, r.reply.code]), [[false, false, 421], [false, false, 421]]);
    assert.equal(connection.reusable, false);
    assert.ok(!server.commands().includes("DATA"));
    connection.destroy();
  } finally {
    await server.close();
  }
});

test("552 to RCPT is the old 'too many recipients' and not permanent (RFC 5321 4.5.3.1.10); 2xx other than 250 accepts", async () => {
  const server = await startScriptedMx("127.0.1.8", 0, {
    reply: (command) =>
      command.startsWith("RCPT TO:<c") ? "552 5.5.3 too many recipients" : command.startsWith("RCPT TO:<b") ? "251 2.1.5 will forward" : undefined,
  });
  try {
    const connection = await SmtpConnection.open(options(server));
    const result = await connection.send(envelope("a@x.test", "b@x.test", "c@x.test"), message, plain);
    assert.deepEqual(result.recipients.map((r) => [r.address, r.accepted, r.permanent]), [
      ["a@x.test", true, false],
      ["b@x.test", true, false],
      ["c@x.test", false, false],
    ]);
    await connection.quit();
  } finally {
    await server.close();
  }
});

test("UTF-8 header fields need SMTPUTF8: refused before MAIL without it (5.6.9, RFC 6531 3.2, 3.5), declared with it", async () => {
  const withoutUtf8 = await startScriptedMx("127.0.1.9", 0, { extensions: ["PIPELINING", "8BITMIME"] });
  const withUtf8 = await startScriptedMx("127.0.1.10", 0);
  const international = { eightBit: true, utf8Header: true };
  const raw = Buffer.from("Subject: caf\u00e9\r\n\r\nBody.\r\n", "utf8");
  try {
    const refusing = await SmtpConnection.open(options(withoutUtf8));
    await assert.rejects(refusing.send(envelope("x@x.test"), raw, international), (error) => error instanceof SmtpError && error.status === "5.6.9" && !error.temporary);
    await assert.rejects(refusing.send(envelope("j\u00fcrgen@x.test"), message, plain), (error) => error instanceof SmtpError && error.status === "5.6.7");
    assert.equal(withoutUtf8.commands().filter((c) => c.startsWith("MAIL")).length, 0, "nothing sent");
    await refusing.quit();
    const accepting = await SmtpConnection.open(options(withUtf8));
    await accepting.send(envelope("x@x.test"), raw, international);
    const mail = withUtf8.commands().find((c) => c.startsWith("MAIL"))!;
    assert.match(mail, / BODY=8BITMIME/);
    assert.match(mail, / SMTPUTF8/);
    await accepting.quit();
  } finally {
    await Promise.all([withoutUtf8.close(), withUtf8.close()]);
  }
});

test("timeouts per stage (RFC 5321 4.5.3.2): the DATA reply and the final dot's reply each have their own", async () => {
  const noDataReply = await startScriptedMx("127.0.1.11", 0, { extensions: ["8BITMIME"], reply: (command) => (command === "DATA" ? null : undefined) });
  const noFinalReply = await startScriptedMx("127.0.1.12", 0, { dataReply: () => null });
  try {
    const first = await SmtpConnection.open(options(noDataReply, {}, { dataInit: 300, dataEnd: 60_000 }));
    await assert.rejects(first.send(envelope("x@x.test"), message, plain), (error) => error instanceof SmtpError && error.stage === "data" && error.status === "4.4.2" && /300 ms/.test(error.message));
    assert.equal(first.reusable, false);
    const second = await SmtpConnection.open(options(noFinalReply, {}, { dataInit: 60_000, dataEnd: 300 }));
    await assert.rejects(second.send(envelope("x@x.test"), message, plain), (error) => error instanceof SmtpError && error.stage === "message" && /300 ms/.test(error.message));
  } finally {
    await Promise.all([noDataReply.close(), noFinalReply.close()]);
  }
});

test("replies split into one TCP segment per byte (a UTF-8 character and CR LF cut apart) are read whole", async () => {
  const server = await startScriptedMx("127.0.1.19", 0, {
    greeting: "220-mx.test ESMTP\r\n220 ready",
    reply: (command) => (command.startsWith("RCPT TO:<bad") ? "550-5.1.1 no such\r\n550 5.1.1 utilisat\u00e9ur here" : undefined),
    trickle: true,
  });
  try {
    const connection = await SmtpConnection.open(options(server));
    assert.equal(connection.greeting, "220 ready");
    assert.ok(connection.extensions.has("PIPELINING") && connection.extensions.get("SIZE") === "10000000");
    const result = await connection.send(envelope("good@x.test", "bad@x.test"), message, plain);
    assert.deepEqual(
      result.recipients.map((r) => [r.address, r.accepted, r.reply.code, r.reply.enhanced, r.reply.text]),
      [
        ["good@x.test", true, 250, "2.0.0", "queued"],
        ["bad@x.test", false, 550, "5.1.1", "no such utilisat\u00e9ur here"],
      ],
    );
    await connection.quit();
  } finally {
    await server.close();
  }
});

/** A message of some megabytes: more than the socket takes at once, so the client waits for it to drain. */
const bigBody = Buffer.from(`${"x".repeat(70)}\r\n`.repeat(60_000));

test("a server that answers during the data and closes: its refusal counts at once, not a data block timeout later", async () => {
  const refusing = await startScriptedMx("127.0.1.14", 0, {
    reply(command, connection) {
      if (command !== "DATA") return undefined;
      setTimeout(() => {
        connection.write("552 5.3.4 Message size exceeds fixed limit\r\n");
        connection.close();
      }, 20);
      return "354 go ahead";
    },
  });
  const hangingUp = await startScriptedMx("127.0.1.15", 0, {
    reply(command, connection) {
      if (command !== "DATA") return undefined;
      setTimeout(() => connection.close(), 20);
      return "354 go ahead";
    },
  });
  try {
    const first = await SmtpConnection.open(options(refusing, {}, { dataBlock: 10_000 }));
    let started = Date.now();
    const result = await first.send(envelope("x@x.test"), bigBody, plain);
    assert.ok(Date.now() - started < 5_000, `took ${Date.now() - started} ms`);
    assert.deepEqual(result.recipients.map((r) => [r.accepted, r.permanent, r.reply.code, r.reply.enhanced]), [[false, true, 552, "5.3.4"]]);
    assert.equal(first.reusable, false);

    const second = await SmtpConnection.open(options(hangingUp, {}, { dataBlock: 10_000 }));
    started = Date.now();
    await assert.rejects(second.send(envelope("x@x.test"), bigBody, plain), (error) => error instanceof SmtpError && error.temporary && error.stage === "message");
    assert.ok(Date.now() - started < 5_000, `took ${Date.now() - started} ms`);
  } finally {
    await Promise.all([refusing.close(), hangingUp.close()]);
  }
});

test("a second reply to the final dot: the connection is not reused, so later replies are never read for the wrong command", async () => {
  const server = await startScriptedMx("127.0.1.16", 0, {
    dataReply: () => "250 2.0.0 queued\r\n250 2.0.0 queued as well",
    reply: (command) => (command.startsWith("RCPT TO:<bad") ? "550 5.1.1 no such user" : undefined),
  });
  try {
    const connection = await SmtpConnection.open(options(server));
    const first = await connection.send(envelope("x@x.test"), message, plain);
    assert.equal(first.recipients[0]!.accepted, true);
    // Reused, the extra 250 would answer the next MAIL, MAIL's 250 the first RCPT, and "bad"'s 550
    // the DATA: "good" would bounce with another recipient's 550.
    assert.equal(connection.reusable, false);
    const commands = server.commands().length;
    await assert.rejects(connection.send(envelope("good@x.test", "bad@x.test"), message, plain), (error) => error instanceof SmtpError && error.temporary && error.reply === null);
    assert.equal(server.commands().length, commands, "nothing was sent");
    connection.destroy();
  } finally {
    await server.close();
  }
});

test("a greeting of two replies ('220 ...' twice): the session stops before a reply is read for the wrong command", async () => {
  const server = await startScriptedMx("127.0.1.17", 0, {
    greeting: "220 mx.test ESMTP\r\n220 welcome to mx.test",
    reply: (command) => (command.startsWith("RCPT TO:<bad") ? "550 5.1.1 no such user" : undefined),
  });
  try {
    // Read out of step, the second 220 answered EHLO, EHLO's 250 the MAIL, MAIL's the first RCPT,
    // and so on: "good" took the 550 of "bad" and bounced.
    const outcome = await SmtpConnection.open(options(server)).then(
      (connection) => connection.send(envelope("good@x.test", "bad@x.test"), message, plain),
      (error: unknown) => error,
    );
    assert.ok(outcome instanceof SmtpError, "no transaction result from a session out of step");
    assert.equal(outcome.temporary, true);
    assert.equal(outcome.reply, null);
    assert.match(outcome.message, /unasked: 220 welcome/);
    assert.ok(!server.commands().some((c) => c.startsWith("RCPT")), "no recipient was given a reply meant for another command");
  } finally {
    await server.close();
  }
});

/** Postfix's smtp-sink on host with the given options; resolves once it accepts connections. */
async function smtpSink(host: string, options: string[]): Promise<{ host: string; port: number; child: ChildProcess }> {
  const port = await freePort();
  const child = spawn("smtp-sink", ["-u", "postfix", ...options, `${host}:${port}`, "10"], { stdio: "ignore" });
  await waitFor(
    () =>
      new Promise<boolean>((resolve) => {
        const probe = connect(port, host);
        probe.once("connect", () => {
          probe.destroy();
          resolve(true);
        });
        probe.once("error", () => resolve(false));
      }),
    5_000,
  );
  return { host, port, child };
}

test("Postfix's smtp-sink: a 5xx greeting, HELO without 8BITMIME, a hang-up after RCPT, 4xx and 5xx after the dot", { skip: !existsSync("/usr/sbin/smtp-sink") }, async () => {
  const sinks = await Promise.all([
    smtpSink("127.0.1.20", ["-f", "connect"]),
    smtpSink("127.0.1.21", ["-e", "-8", "-B", "550 5.7.1 go away", "-f", "."]),
    smtpSink("127.0.1.22", ["-q", "rcpt"]),
    smtpSink("127.0.1.23", ["-r", "."]),
  ]);
  const [refusing, helo, hangUp, soft] = sinks;
  try {
    await assert.rejects(SmtpConnection.open(options(refusing!)), (error) => error instanceof SmtpError && error.stage === "greeting" && error.temporary && error.status === "4.3.0");

    const old = await SmtpConnection.open(options(helo!));
    assert.equal(old.extensions.size, 0, "EHLO refused: HELO, no extensions");
    await assert.rejects(old.send(envelope("x@x.test"), Buffer.from("Subject: x\r\n\r\ncaf\u00e9\r\n", "utf8"), { eightBit: true, utf8Header: false }), (error) => error instanceof SmtpError && error.status === "5.6.3");
    const refused = await old.send(envelope("x@x.test"), message, plain);
    assert.deepEqual(refused.recipients.map((r) => [r.accepted, r.permanent, r.reply.code, r.reply.enhanced]), [[false, true, 550, "5.7.1"]]);
    await old.quit();

    const dropped = await SmtpConnection.open(options(hangUp!));
    await assert.rejects(dropped.send(envelope("x@x.test"), message, plain), (error) => error instanceof SmtpError && error.temporary && error.stage === "rcpt");
    assert.equal(dropped.reusable, false);

    const later = await SmtpConnection.open(options(soft!));
    const deferred = await later.send(envelope("x@x.test"), message, plain);
    assert.deepEqual(deferred.recipients.map((r) => [r.accepted, r.permanent, r.reply.code]), [[false, false, 450]]);
    await later.quit();
  } finally {
    for (const sink of sinks) sink.child.kill();
  }
});

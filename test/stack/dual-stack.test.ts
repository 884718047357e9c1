// By default every listener answers on IPv6 and IPv4 (an MX published with an AAAA record must
// accept mail over IPv6; probes in IPv6-only clusters reach the ops port).
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import net from "node:net";
import { createTestEnv, freePort, startServiceProcess, type ServiceProcess, type TestEnv } from "@mailstack/testkit";

let env: TestEnv;
const services: ServiceProcess[] = [];
const listeners: Array<{ name: string; port: number; greeting: RegExp }> = [];

function greeting(host: string, port: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host, port });
    socket.setTimeout(5_000, () => socket.destroy(new Error(`no greeting from ${host}:${port}`)));
    socket.once("data", (chunk) => {
      socket.destroy();
      resolve(chunk.toString("latin1"));
    });
    socket.once("error", reject);
  });
}

before(async () => {
  env = await createTestEnv();
  const [smtp, submission, submissions, pop3, pop3s, lmtp] = [await freePort(), await freePort(), await freePort(), await freePort(), await freePort(), await freePort()];
  const common = { ...env.env, MAIL_HOSTNAME: "mail.example.test", INBOUND_AUTH_CHECKS: "false" };
  services.push(
    ...(await Promise.all([
      startServiceProcess("mta-inbound", { ...common, SMTP_PORT: String(smtp) }),
      startServiceProcess("msa", { ...common, SUBMISSION_PORT: String(submission), SUBMISSIONS_PORT: String(submissions) }),
      startServiceProcess("pop3", { ...common, POP3_PORT: String(pop3), POP3S_PORT: String(pop3s) }),
      startServiceProcess("mda", { ...common, LMTP_PORT: String(lmtp) }),
    ])),
  );
  listeners.push(
    { name: "mta-inbound", port: smtp, greeting: /^220 / },
    { name: "msa 587", port: submission, greeting: /^220 / },
    { name: "pop3", port: pop3, greeting: /^\+OK/ },
    { name: "mda LMTP", port: lmtp, greeting: /^220 / },
  );
});

after(async () => {
  for (const service of services) await service.stop();
  await env?.close();
});

test("with no listen address set, every protocol port and ops port answers on ::1 and 127.0.0.1", async () => {
  for (const { name, port, greeting: expected } of listeners) {
    for (const host of ["127.0.0.1", "::1"]) assert.match(await greeting(host, port), expected, `${name} on ${host}`);
  }
  for (const service of services) {
    for (const host of ["127.0.0.1", "[::1]"]) {
      const response = await fetch(`http://${host}:${service.opsPort}/healthz`);
      assert.equal(response.status, 200, `ops port ${service.opsPort} on ${host}`);
    }
  }
});

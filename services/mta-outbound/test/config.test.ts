import assert from "node:assert/strict";
import { test } from "node:test";
import { ConfigError, loadConfig } from "@mailstack/config";
import { relayConfig, shape } from "../src/service.ts";

const config = (env: Record<string, string>) => relayConfig({ ...loadConfig(shape, env), MAIL_HOSTNAME: "relay.test" });

test("defaults: RFC timeouts, 1/5/15/30 min then hourly backoff, 5 days, 4 hours, port 25, system resolver", () => {
  const c = config({});
  assert.deepEqual(c.backoffMs, [60_000, 300_000, 900_000, 1_800_000, 3_600_000]);
  assert.equal(c.maxQueueLifetimeMs, 5 * 86_400_000);
  assert.equal(c.delayNoticeAfterMs, 4 * 3_600_000);
  assert.deepEqual(c.timeouts, { connect: 30_000, greeting: 300_000, command: 300_000, dataInit: 120_000, dataBlock: 180_000, dataEnd: 600_000 });
  assert.equal(c.destination.destPort, 25);
  assert.deepEqual(c.destination.dnsServers, []);
  assert.equal(c.destination.smartHost, null);
});

test("smart hosts, DNS servers and a bad backoff", () => {
  const c = config({
    DNS_SERVERS: "127.0.0.1:5353, [::1]:53",
    RELAY_SMARTHOST: "relay.example:587",
    RELAY_SMARTHOST_DOMAINS: "Big.Example=10.0.0.1:2525,other.example=mx.other.example",
    RELAY_SMARTHOST_USER: "u",
    RELAY_SMARTHOST_PASSWORD: "p",
    RELAY_SMARTHOST_TLS: "none",
  });
  assert.deepEqual(c.destination.dnsServers, ["127.0.0.1:5353", "[::1]:53"]);
  assert.deepEqual(c.destination.smartHost, { host: "relay.example", port: 587, tls: "required", tlsVerify: true, auth: { user: "u", pass: "p" } });
  assert.equal(c.destination.domainSmartHosts.get("big.example")!.port, 2525);
  assert.equal(c.destination.domainSmartHosts.get("other.example")!.port, 25);
  assert.equal(c.destination.smartHost!.tls, "required", "credentials never go out in clear");
  assert.throws(() => config({ RELAY_BACKOFF: "1m,soon" }), (error) => error instanceof ConfigError && /RELAY_BACKOFF/.test(error.message));
});

test("SRS: off by default; SRS_DOMAIN with its secrets turns it on; SRS_DOMAIN without a secret is refused", () => {
  assert.equal(config({}).srs, null);
  assert.deepEqual(config({ SRS_DOMAIN: "srs.example.org", SRS_SECRETS: "new,old" }).srs, { domain: "srs.example.org", secrets: ["new", "old"], maxAgeDays: 21 });
  assert.throws(() => config({ SRS_DOMAIN: "srs.example.org" }), (error: unknown) => error instanceof ConfigError && /^SRS_SECRETS: /.test(error.problems.join("\n")));
});

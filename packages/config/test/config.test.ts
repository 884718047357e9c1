import { test } from "node:test";
import assert from "node:assert/strict";
import { ConfigError, commonShape, defaultMailHostname, isFullyQualified, loadConfig, parseDuration, parseSize, port, size, srsShape } from "../src/index.ts";

test("defaults apply when variables are absent", () => {
  const config = loadConfig(commonShape, {});
  assert.equal(config.NATS_URL, "nats://127.0.0.1:4222");
  assert.match(config.DATABASE_URL, /^postgres:/);
  assert.equal(config.SHUTDOWN_TIMEOUT, 25_000);
});

test("every bad variable is named in one error", () => {
  const shape = { ...commonShape, SMTP_PORT: port(25), MAX_SIZE: size("50M") };
  assert.throws(
    () => loadConfig(shape, { DATABASE_URL: "mysql://x", SMTP_PORT: "abc", MAX_SIZE: "lots", LOG_LEVEL: "loud" }),
    (error: unknown) => {
      assert.ok(error instanceof ConfigError);
      const names = error.problems.map((problem) => problem.split(":")[0]);
      assert.deepEqual(names.sort(), ["DATABASE_URL", "LOG_LEVEL", "MAX_SIZE", "SMTP_PORT"]);
      assert.match(error.message, /SMTP_PORT: .*got "abc"/);
      return true;
    },
  );
});

test("sizes and durations parse with units", () => {
  assert.equal(parseSize("50M"), 50 * 1024 * 1024);
  assert.equal(parseSize("1024"), 1024);
  assert.equal(parseSize("2 KiB"), 2048);
  assert.equal(parseSize("ten"), null);
  assert.equal(parseDuration("5m"), 300_000);
  assert.equal(parseDuration("250ms"), 250);
  assert.equal(parseDuration("30"), 30_000);
  assert.equal(parseDuration("soon"), null);
});

test("MAIL_HOSTNAME defaults to the system's name only when it is fully qualified", () => {
  assert.equal(defaultMailHostname("MX1.Example.ORG"), "mx1.example.org");
  assert.equal(defaultMailHostname("mx1.example.org."), "mx1.example.org");
  assert.equal(defaultMailHostname("vm", "127.0.0.1 localhost\n127.0.0.1 vm\n"), "localhost");
  assert.equal(defaultMailHostname("mta-outbound-7d9f8-abcde", ""), "localhost");
  assert.equal(defaultMailHostname("10.0.0.7", ""), "localhost");
  assert.equal(defaultMailHostname("bad_name.example", ""), "localhost");
  // A short name is completed from the hosts file as the resolver does: the line's first name.
  const hosts = "127.0.0.1\tlocalhost\n# 127.0.1.1 old.example.org mx1\n127.0.1.1\tMX1.Example.org.  mx1 # this host\n::1 localhost ip6-localhost\n";
  assert.equal(defaultMailHostname("mx1", hosts), "mx1.example.org");
  assert.equal(defaultMailHostname("mx2", hosts), "localhost");
  assert.equal(defaultMailHostname("box", "127.0.1.1 box\n"), "localhost", "a line without a qualified first name");
  assert.equal(loadConfig(commonShape, { MAIL_HOSTNAME: "mail.example.net" }).MAIL_HOSTNAME, "mail.example.net");
  assert.equal(isFullyQualified("mail.example.net"), true);
  assert.equal(isFullyQualified("localhost"), false);
});

test("SRS is off by default; SRS_DOMAIN without a secret is refused at start", () => {
  const off = loadConfig(srsShape, {});
  assert.deepEqual(off, { SRS_DOMAIN: "", SRS_SECRETS: [], SRS_MAX_AGE: 21 * 86_400_000 });
  const on = loadConfig(srsShape, { SRS_DOMAIN: "SRS.Example.ORG.", SRS_SECRETS: "new-secret, old-secret", SRS_MAX_AGE: "30d" });
  assert.deepEqual(on, { SRS_DOMAIN: "srs.example.org", SRS_SECRETS: ["new-secret", "old-secret"], SRS_MAX_AGE: 30 * 86_400_000 });
  assert.throws(
    () => loadConfig(srsShape, { SRS_DOMAIN: "srs.example.org" }),
    (error: unknown) => error instanceof ConfigError && error.problems.length === 1 && /^SRS_SECRETS: required when SRS_DOMAIN is set/.test(error.problems[0]!),
  );
  assert.throws(() => loadConfig(srsShape, { SRS_DOMAIN: "localhost", SRS_SECRETS: "s" }), /SRS_DOMAIN: expected a fully qualified domain name/);
  assert.throws(() => loadConfig(srsShape, { SRS_DOMAIN: "srs.example.org", SRS_SECRETS: "s", SRS_MAX_AGE: "2000d" }), /SRS_MAX_AGE: expected between 1d and 1023d/);
  // Secrets without a domain change nothing (SRS stays off) and are not an error.
  assert.equal(loadConfig(srsShape, { SRS_SECRETS: "s" }).SRS_DOMAIN, "");
});

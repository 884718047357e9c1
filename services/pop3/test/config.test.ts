import { test } from "node:test";
import assert from "node:assert/strict";
import { ConfigError, commonShape, loadConfig } from "@mailstack/config";
import { pop3Shape } from "../src/config.ts";

test("defaults: ports 110/995, 10-minute autologout, plaintext only on loopback, POP-before-SMTP off", () => {
  const config = loadConfig(pop3Shape, {});
  assert.equal(config.POP3_PORT, 110);
  assert.equal(config.POP3S_PORT, 995);
  assert.equal(config.POP3_AUTOLOGOUT, 600_000);
  assert.equal(config.POP3_ALLOW_PLAINTEXT, "loopback");
  assert.equal(config.POP_BEFORE_SMTP, false);
  assert.equal(config.TLS_DIR, ".data/tls");
  // As runService combines them: pop3 keeps V8's own heap growth, the other services cap it.
  assert.equal(loadConfig({ ...commonShape, ...pop3Shape }, {}).HEAP_GROWING_PERCENT, 0);
  assert.equal(loadConfig(commonShape, {}).HEAP_GROWING_PERCENT, 50);
});

test("an autologout under RFC 1939's 10 minutes and a bad plaintext mode are refused, by name", () => {
  assert.throws(
    () => loadConfig(pop3Shape, { POP3_AUTOLOGOUT: "5m", POP3_ALLOW_PLAINTEXT: "sometimes" }),
    (error: unknown) =>
      error instanceof ConfigError &&
      error.problems.some((p) => p.startsWith("POP3_AUTOLOGOUT")) &&
      error.problems.some((p) => p.startsWith("POP3_ALLOW_PLAINTEXT")),
  );
  assert.equal(loadConfig(pop3Shape, { POP3_AUTOLOGOUT: "30m" }).POP3_AUTOLOGOUT, 1_800_000);
});

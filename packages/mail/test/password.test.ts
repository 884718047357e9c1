import { test } from "node:test";
import assert from "node:assert/strict";
import { hashPassword, verifyAccountPassword } from "../src/index.ts";

test("verifyAccountPassword: the stored hash decides; no account is false after the same scrypt work", async () => {
  const stored = await hashPassword("s3cret");
  assert.equal(await verifyAccountPassword("s3cret", stored), true);
  assert.equal(await verifyAccountPassword("wrong", stored), false);
  assert.equal(await verifyAccountPassword("s3cret", null), false);
  assert.equal(await verifyAccountPassword("", undefined), false);

  const timed = async (check: () => Promise<boolean>) => {
    const started = performance.now();
    await check();
    return performance.now() - started;
  };
  const median = (values: number[]) => values.sort((a, b) => a - b)[Math.floor(values.length / 2)]!;
  const wrong: number[] = [];
  const missing: number[] = [];
  for (let i = 0; i < 5; i++) {
    missing.push(await timed(() => verifyAccountPassword("guess", null)));
    wrong.push(await timed(() => verifyAccountPassword("guess", stored)));
  }
  const ratio = median(missing) / median(wrong);
  assert.ok(ratio > 1 / 3 && ratio < 3, `no account: ${median(missing).toFixed(1)} ms, wrong password: ${median(wrong).toFixed(1)} ms`);
});

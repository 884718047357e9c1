import { test } from "node:test";
import assert from "node:assert/strict";
import { dkimVerify } from "mailauth/lib/dkim/verify.js";
import { createSigningPool, dkimDnsRecord, generateDkimKey } from "../src/index.ts";

const message = Buffer.from("From: a@example.org\r\nTo: b@example.net\r\nSubject: pooled\r\nDate: Fri, 27 Nov 2026 10:00:00 +0000\r\n\r\nbody line\r\n");

test("signatures from the worker-thread pool verify, concurrently, and a bad key fails only its own message", async () => {
  const key = await generateDkimKey("rsa-sha256");
  const record = dkimDnsRecord("example.org", "sel", "rsa-sha256", key.publicKey);
  const resolver = async (name: string, type: string) => {
    if (type === "TXT" && name === record.name) return [record.strings];
    throw Object.assign(new Error("NXDOMAIN"), { code: "ENOTFOUND" });
  };
  const pool = createSigningPool(2);
  try {
    const signingKey = { domain: "example.org", selector: "sel", algorithm: "rsa-sha256" as const, privateKey: key.privateKeyPem };
    const results = await Promise.all(Array.from({ length: 20 }, () => pool.sign(message, [signingKey])));
    for (const headers of results) {
      const verified = await dkimVerify(Buffer.concat([Buffer.from(headers), message]), { resolver });
      assert.equal(verified.results[0]?.status.result, "pass");
    }
    await assert.rejects(pool.sign(message, [{ ...signingKey, privateKey: "not a key" }]), /DKIM signing failed|key/i);
    assert.equal(await pool.sign(message, []), "", "no keys, no signature");
    const after = await pool.sign(message, [signingKey]);
    assert.match(after, /^DKIM-Signature: /, "the pool still works after a failure");
  } finally {
    await pool.close();
  }
  await assert.rejects(pool.sign(message, [{ domain: "example.org", selector: "sel", algorithm: "rsa-sha256", privateKey: key.privateKeyPem }]), /closed/);
});

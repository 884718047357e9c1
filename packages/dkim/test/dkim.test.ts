import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { promisify } from "node:util";
import { Readable } from "node:stream";
import { dkimVerify } from "mailauth/lib/dkim/verify.js";
import { addDomain, DirectoryError } from "@mailstack/db";
import { createTestDatabase, type TestDatabase } from "@mailstack/testkit";
import {
  activateDomainDkimKey, createDomainDkimKey, dkimDnsRecord, dkimSignatures, generateDkimKey, getDomainDkimRecord, getDomainDkimRecords, isValidSelector,
  loadDkimKeys, publicKeyValue, type DkimAlgorithm,
} from "../src/index.ts";

const run = promisify(execFile);

const message = Buffer.from(
  "From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: hello\r\n" +
    "Date: Fri, 27 Nov 2026 09:00:00 +0000\r\nMessage-ID: <1@example.org>\r\n\r\nHello  there \r\nsecond line\r\n",
);

/** Verifies with Debian's python3-dkim, answering its DNS query with the given TXT value. */
async function pythonVerify(signed: Buffer, name: string, txt: string): Promise<string> {
  const script = `
import sys, dkim
data = sys.stdin.buffer.read()
name, txt = sys.argv[1].encode(), sys.argv[2].encode()
def dnsfunc(q, timeout=5):
    return txt if q.rstrip(b".") == name else None
print("pass" if dkim.verify(data, dnsfunc=dnsfunc) else "fail")
`;
  const child = run("/usr/bin/python3", ["-c", script, name, txt]);
  child.child.stdin!.end(signed);
  return (await child).stdout.trim();
}

let db: TestDatabase;
before(async () => {
  db = await createTestDatabase();
});
after(async () => {
  await db.drop();
});

test("selectors are DNS labels", () => {
  assert.ok(isValidSelector("ms20261127"));
  assert.ok(isValidSelector("a.b-c"));
  assert.ok(!isValidSelector("-bad"));
  assert.ok(!isValidSelector("has space"));
  assert.ok(!isValidSelector(""));
});

test("the TXT record is split into 255-character strings", async () => {
  const key = await generateDkimKey("rsa-sha256");
  const record = dkimDnsRecord("example.org", "s1", "rsa-sha256", key.publicKey);
  assert.equal(record.name, "s1._domainkey.example.org");
  assert.match(record.value, /^v=DKIM1; k=rsa; p=[A-Za-z0-9+/=]+$/);
  assert.ok(record.strings.length >= 2 && record.strings.every((s) => s.length <= 255));
  assert.equal(record.strings.join(""), record.value);
  const ed = await generateDkimKey("ed25519-sha256");
  assert.equal(Buffer.from(ed.publicKey, "base64").length, 32);
  assert.throws(() => publicKeyValue(ed.privateKeyPem, "rsa-sha256"), /ed25519/);
});

for (const algorithm of ["rsa-sha256", "ed25519-sha256"] as DkimAlgorithm[]) {
  test(`a ${algorithm} signature verifies with mailauth and python3-dkim`, async () => {
    const key = await generateDkimKey(algorithm);
    const record = dkimDnsRecord("example.org", "sel", algorithm, key.publicKey);
    const headers = await dkimSignatures(message, [{ domain: "example.org", selector: "sel", algorithm, privateKey: key.privateKeyPem }]);
    assert.match(headers, /^DKIM-Signature: /);
    assert.match(headers, new RegExp(`a=${algorithm}`));
    assert.match(headers, /c=relaxed\/relaxed/);
    const signed = Buffer.concat([Buffer.from(headers), message]);

    const resolver = async (name: string, type: string) => {
      if (type === "TXT" && name === record.name) return [record.strings];
      throw Object.assign(new Error("NXDOMAIN"), { code: "ENOTFOUND" });
    };
    const verified = await dkimVerify(signed, { resolver });
    assert.equal(verified.results[0]?.status.result, "pass");
    assert.equal(await pythonVerify(signed, record.name, record.value), "pass");

    // A changed body must fail both verifiers: the check can fail.
    const tampered = Buffer.from(signed.toString().replace("second line", "second line!"));
    // mailauth reports a body hash mismatch as "neutral" (RFC 6376 6.1.3 leaves the label open).
    assert.notEqual((await dkimVerify(tampered, { resolver })).results[0]?.status.result, "pass");
    assert.equal(await pythonVerify(tampered, record.name, record.value), "fail");
  });
}

test("signing a message in memory gives the same signatures as mailauth's own streamed signer", async () => {
  // Ed25519 and RSA PKCS#1 v1.5 signatures are deterministic, so the two paths must produce
  // identical header fields, for one key and for two.
  const key = await generateDkimKey("ed25519-sha256");
  const signing = { domain: "example.org", selector: "sel", algorithm: "ed25519-sha256" as const, privateKey: key.privateKeyPem };
  const rsaKey = await generateDkimKey("rsa-sha256");
  const rsa = { domain: "example.org", selector: "rsa", algorithm: "rsa-sha256" as const, privateKey: rsaKey.privateKeyPem };
  const signTime = new Date("2026-11-27T12:00:00Z");
  const awkward = [
    message,
    // folded header, tabs and runs of spaces, trailing white space and trailing empty lines
    "From: a@example.org\r\nSubject: a\r\n  folded\tsubject  \r\nTo: b@example.net\r\n\r\n\ta  b\t \r\n\r\n.dot\r\n\r\n\r\n",
    // bare LF line endings throughout
    "From: a@example.org\nSubject: lf\n\nline one\nline  two \n\n",
    // LF-terminated header block followed by CRLF body lines, and a last line without a line break
    "From: a@example.org\r\nSubject: mixed\r\n\nbody\r\nno newline at end",
    // an empty body
    "From: a@example.org\r\nSubject: empty body\r\n\r\n",
    // 8-bit body
    "From: a@example.org\r\nSubject: 8bit\r\n\r\nGr\u00fc\u00dfe  aus K\u00f6ln \r\n",
    // an empty line first (no header fields), then what looks like header fields
    "\r\nFrom: a@example.org\r\nSubject: empty first line\r\n\r\nbody\r\n",
  ].map((text) => (Buffer.isBuffer(text) ? text : Buffer.from(text, "utf8")));
  for (const raw of awkward) {
    for (const keys of [[signing], [rsa], [rsa, signing]]) {
      const fast = await dkimSignatures(raw, keys, signTime);
      const streamed = await dkimSignatures(Readable.from([raw]), keys, signTime);
      assert.match(fast, /^DKIM-Signature: .*bh=/s);
      assert.equal(fast.match(/^DKIM-Signature: /gm)?.length, keys.length);
      assert.equal(fast, streamed, `signatures differ for ${JSON.stringify(raw.toString())} with ${keys.map((k) => k.algorithm)}`);
    }
  }
  // A message of header fields only: mailauth's streamed signer gives no signature at all; this
  // path signs it with the empty body's hash (mailauth's verifier, with the same parser, sees no
  // signature either; python3-dkim verifies it).
  const headersOnly = Buffer.from("From: a@example.org\r\nSubject: headers only\r\n");
  const record = dkimDnsRecord("example.org", "sel", "ed25519-sha256", key.publicKey);
  const signed = Buffer.concat([Buffer.from(await dkimSignatures(headersOnly, [signing], signTime)), headersOnly]);
  assert.equal(await pythonVerify(signed, record.name, record.value), "pass");
});

test("keys are stored per domain and the published record matches the stored key", async () => {
  await addDomain(db.pool, "keys.test");
  await addDomain(db.pool, "nokey.test");
  const created = await createDomainDkimKey(db.pool, "Keys.Test", { selector: "jan", algorithm: "ed25519-sha256" });
  const { record } = created;
  assert.equal(created.state, "active", "a domain's first key signs at once");
  assert.equal(record.name, "jan._domainkey.keys.test");
  assert.deepEqual(await getDomainDkimRecord(db.pool, "keys.test"), record);
  assert.equal(await getDomainDkimRecord(db.pool, "nokey.test"), null);
  const keys = await loadDkimKeys(db.pool, ["keys.test", "nokey.test", "elsewhere.test"]);
  assert.equal(keys.length, 1);
  assert.equal(keys[0]!.selector, "jan");
  assert.equal(publicKeyValue(keys[0]!.privateKey, "ed25519-sha256"), record.value.split("p=")[1]);
  await assert.rejects(createDomainDkimKey(db.pool, "missing.test"), (e: unknown) => e instanceof DirectoryError && e.code === "not-found");
  await assert.rejects(createDomainDkimKey(db.pool, "keys.test", { selector: "bad selector" }), /invalid DKIM selector/);
});

test("a new key for a domain that has one waits as pending until activated; the msa's keys stay the current one", async () => {
  await addDomain(db.pool, "rotate.test");
  const first = await createDomainDkimKey(db.pool, "rotate.test", { selector: "old", algorithm: "ed25519-sha256" });
  const second = await createDomainDkimKey(db.pool, "rotate.test", { selector: "new", algorithm: "rsa-sha256" });
  assert.equal(second.state, "pending");
  assert.equal(second.record.name, "new._domainkey.rotate.test");
  assert.match(second.record.value, /^v=DKIM1; k=rsa; p=/);
  assert.deepEqual(await getDomainDkimRecords(db.pool, "rotate.test"), { current: first.record, pending: second.record });
  const signing = async () => (await loadDkimKeys(db.pool, ["rotate.test"])).map((k) => [k.selector, k.algorithm]);
  assert.deepEqual(await signing(), [["old", "ed25519-sha256"]]);

  // The pending key keeps a selector of its own, so both records can be in DNS at once.
  await assert.rejects(createDomainDkimKey(db.pool, "rotate.test", { selector: "OLD" }), (e: unknown) => e instanceof DirectoryError && e.code === "duplicate");
  const activated = await activateDomainDkimKey(db.pool, "rotate.test");
  assert.deepEqual(activated, { record: second.record, replaced: first.record });
  assert.deepEqual(await signing(), [["new", "rsa-sha256"]]);
  const [key] = await loadDkimKeys(db.pool, ["rotate.test"]);
  assert.equal(`v=DKIM1; k=rsa; p=${publicKeyValue(key!.privateKey, "rsa-sha256")}`, second.record.value, "the activated private key is the pending one's");
  assert.deepEqual(await getDomainDkimRecords(db.pool, "rotate.test"), { current: second.record, pending: null });
  await assert.rejects(activateDomainDkimKey(db.pool, "rotate.test"), (e: unknown) => e instanceof DirectoryError && e.code === "not-found");

  // activateNow replaces at once (a compromised key) and drops a pending one.
  await createDomainDkimKey(db.pool, "rotate.test", { selector: "later", algorithm: "ed25519-sha256" });
  const now = await createDomainDkimKey(db.pool, "rotate.test", { selector: "urgent", algorithm: "ed25519-sha256", activateNow: true });
  assert.equal(now.state, "active");
  assert.deepEqual(now.replaced, second.record);
  assert.deepEqual(await getDomainDkimRecords(db.pool, "rotate.test"), { current: now.record, pending: null });
  assert.deepEqual(await signing(), [["urgent", "ed25519-sha256"]]);

  // The default selector is the day's; a second key on one day gets a suffix instead of the same name.
  await addDomain(db.pool, "daily.test");
  const today = await createDomainDkimKey(db.pool, "daily.test", { algorithm: "ed25519-sha256" });
  const again = await createDomainDkimKey(db.pool, "daily.test", { algorithm: "ed25519-sha256" });
  assert.match(today.record.selector, /^ms\d{8}$/);
  assert.equal(again.record.selector, `${today.record.selector}-2`);
});

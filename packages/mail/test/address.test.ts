import { test } from "node:test";
import assert from "node:assert/strict";
import { addressKey, normalizeAddress, normalizeDomain, parseAddress, parseReply, hashPassword, verifyPassword } from "../src/index.ts";

test("addresses are normalised: domain lower-case IDNA, the local part's case kept (RFC 5321 2.4); the lookup key lower-case", () => {
  const parsed = parseAddress("Alice.Smith@Example.TEST");
  assert.deepEqual(parsed, { ok: true, local: "Alice.Smith", domain: "example.test", address: "Alice.Smith@example.test", key: "alice.smith@example.test" });
  assert.equal(addressKey("Alice.Smith@example.test"), "alice.smith@example.test");
  assert.equal(normalizeAddress("Bob.Sender@Origin.Test"), "Bob.Sender@origin.test");
  assert.equal(normalizeDomain("bücher.example"), "xn--bcher-kva.example");
  const idn = parseAddress("bob@Bücher.Example");
  assert.ok(idn.ok && idn.domain === "xn--bcher-kva.example");
});

test("relay tricks are reported by kind", () => {
  const cases: Array<[string, string]> = [
    ["user%other.test@local.test", "percent-hack"],
    ["other.test!user@local.test", "bang-path"],
    ["@a.test:user@other.test", "source-route"],
    ['"user@other.test"@local.test', "quoted-at"],
    ["user@[127.0.0.1]", "ip-literal"],
    ["no-at-sign", "syntax"],
    ["a..b@x.test", "syntax"],
    ["user@-bad-.test", "bad-domain"],
    ["üser@x.test", "utf8-not-allowed"],
  ];
  for (const [input, problem] of cases) {
    const parsed = parseAddress(input);
    assert.equal(parsed.ok, false, input);
    assert.equal(!parsed.ok && parsed.problem, problem, input);
  }
  assert.ok(parseAddress("üser@x.test", { utf8: true }).ok);
});

test("quoted local parts without tricks are accepted", () => {
  const parsed = parseAddress('"john doe"@x.test');
  assert.ok(parsed.ok);
  assert.equal(parsed.ok && parsed.address, '"john doe"@x.test');
  const plain = parseAddress('"john"@x.test');
  assert.equal(plain.ok && plain.address, "john@x.test");
});

test("a quoted local part is canonical: unescaped, bare when a dot-atom, else quoted with only \\ and \" escaped", () => {
  const cases: Array<[string, string]> = [
    ['"John\\ Doe"@X.test', '"John Doe"@x.test'],
    ['"j\\ohn"@x.test', "john@x.test"],
    ['"a.b"@x.test', "a.b@x.test"],
    ['"a..b"@x.test', '"a..b"@x.test'],
    ['"say \\"hi\\""@x.test', '"say \\"hi\\""@x.test'],
    ['"back\\\\slash"@x.test', '"back\\\\slash"@x.test'],
    ['"a>b <c>"@x.test', '"a>b <c>"@x.test'],
    ['""@x.test', '""@x.test'],
  ];
  for (const [input, canonical] of cases) {
    const parsed = parseAddress(input);
    assert.equal(parsed.ok && parsed.address, canonical, input);
    // The canonical form parses to itself.
    assert.equal(parsed.ok && (parseAddress(canonical) as { address: string }).address, canonical, canonical);
  }
  // However it is quoted and cased, a local part has one lookup key.
  const keys = ['"John\\ Doe"@x.test', '"john doe"@X.TEST', '"JOHN DOE"@x.test'].map((input) => (parseAddress(input) as { key: string }).key);
  assert.deepEqual(keys, ['"john doe"@x.test', '"john doe"@x.test', '"john doe"@x.test']);
});

test("lengths are octets as sent: local part 64, mailbox 254", () => {
  assert.ok(parseAddress(`${"a".repeat(64)}@x.test`).ok);
  assert.deepEqual(parseAddress(`${"a".repeat(65)}@x.test`), { ok: false, problem: "too-long" });
  // 64 octets quoted, 62 unquoted: the limit is on the local part as sent.
  assert.ok(parseAddress(`"${"a b".repeat(20)}ab"@x.test`).ok);
  assert.deepEqual(parseAddress(`"${"a".repeat(63)}"@x.test`), { ok: false, problem: "too-long" });
  assert.ok(parseAddress(`${"é".repeat(32)}@x.test`, { utf8: true }).ok);
  assert.deepEqual(parseAddress(`${"é".repeat(33)}@x.test`, { utf8: true }), { ok: false, problem: "too-long" });
  const domain = (n: number) => `${"b".repeat(63)}.${"c".repeat(63)}.${"d".repeat(n - 128 - 5)}.test`;
  assert.ok(parseAddress(`${"a".repeat(64)}@${domain(189)}`).ok);
  assert.deepEqual(parseAddress(`${"a".repeat(64)}@${domain(190)}`), { ok: false, problem: "too-long" });
});

test("replies parse with and without enhanced codes", () => {
  assert.deepEqual(parseReply("550 5.1.1 no such user"), { code: 550, enhanced: "5.1.1", text: "no such user" });
  assert.deepEqual(parseReply("451 try later"), { code: 451, enhanced: "4.0.0", text: "try later" });
  assert.equal(parseReply("hello"), null);
});

test("passwords hash with scrypt and verify", async () => {
  const hash = await hashPassword("s3cret");
  assert.match(hash, /^scrypt\$/);
  assert.ok(!hash.includes("s3cret"));
  assert.equal(await verifyPassword("s3cret", hash), true);
  assert.equal(await verifyPassword("wrong", hash), false);
  assert.equal(await verifyPassword("s3cret", "garbage"), false);
});

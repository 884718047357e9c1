import { test } from "node:test";
import assert from "node:assert/strict";
import { addressesNamedIn, parseMailboxList } from "../src/index.ts";

function addresses(value: string, options = {}): string[] {
  const result = parseMailboxList(value, options);
  assert.ok(result.ok, `${JSON.stringify(value)}: ${!result.ok && result.problem}`);
  return result.mailboxes.map((m) => m.address);
}

function problem(value: string, options = {}): string {
  const result = parseMailboxList(value, options);
  assert.ok(!result.ok, `${JSON.stringify(value)} was accepted`);
  return result.problem;
}

test("what mail clients write is read as they mean it: names, spans, folding, UTF-8", () => {
  const parsed = parseMailboxList(' "Last, First" <a@ours.test>,\r\n =?UTF-8?Q?J=C3=B6rg?= <j@ours.test>, b@ours.test (Bee)');
  assert.ok(parsed.ok);
  assert.deepEqual(parsed.mailboxes.map((m) => [m.name, m.address]), [
    ['"Last, First"', "a@ours.test"],
    ["=?UTF-8?Q?J=C3=B6rg?=", "j@ours.test"],
    ["", "b@ours.test"],
  ]);
  const text = ' Jörg Müller <jörg@ours.test>';
  const utf8 = parseMailboxList(text);
  assert.ok(utf8.ok);
  const [mailbox] = utf8.mailboxes;
  assert.equal(text.slice(mailbox!.start, mailbox!.end), "jörg@ours.test");
  assert.equal(mailbox!.name, "Jörg Müller");
  assert.deepEqual(addresses(' "b@bank.test" <a@ours.test>'), ["a@ours.test"]);
  assert.deepEqual(addresses(" John Q. Public <a@ours.test>"), ["a@ours.test"]);
  assert.deepEqual(addresses(' "a b"@ours.test'), ['"a b"@ours.test']);
  assert.deepEqual(addresses(' "Folded\r\n name" <a@ours.test>'), ["a@ours.test"]);
  assert.deepEqual(addresses(" =?UTF-8?Q?Hans_=22Hansi=22_M=C3=BCller?= <a@ours.test>"), ["a@ours.test"]);
});

test("an address without a domain only when allowed, and one mailbox only when asked", () => {
  assert.match(problem(" Alice <alice>"), /without '@'/);
  assert.deepEqual(addresses(" Alice <alice>, bob", { allowNoDomain: true }), ["alice", "bob"]);
  assert.match(problem(" Alice Smith", { allowNoDomain: true }), /display name without an address/);
  assert.match(problem(" a@ours.test, b@ours.test", { single: true }), /more than one mailbox/);
  assert.deepEqual(addresses(" <a@ours.test>", { single: true }), ["a@ours.test"]);
});

test("fields where another reader could find another address are refused, each with its reason", () => {
  const cases: Array<[string, RegExp]> = [
    ["<a@ours.test>b@bank.test", /text after the address/],
    ['"x" <a@ours.test> <b@bank.test>', /more than one address/],
    ["a@ours.test <b@bank.test>", /'@' outside an address/],
    ["a@ours.test (b@bank.test)", /'@' in a comment/],
    ["a@ours.test (nested (b\\@bank.test))", /'@' in a comment/],
    ["=?UTF-8?Q?b=40bank.test?= <a@ours.test>", /decodes to '@'/],
    ["=?utf-16be?B?AGIAQABiAGEAbgBrAC4AdABlAHMAdA==?= <a@ours.test>", /decodes to '@'/],
    ["=?x-unknown?Q?b?= <a@ours.test>", /cannot be decoded/],
    ["G: a@ours.test, b@bank.test;", /a group/],
    ["a@ours.test\x00b@bank.test", /control character/],
    ["a@ours.test\nb@bank.test", /control character or a line break/],
    ["Alice\u2028<a@ours.test>", /control character/],
    ["a@ours.test garbage", /text after the address/],
    ["a@ours.test@bank.test", /text after the address/],
    ["<@bank.test:a@ours.test>", /source route/],
    ["<a@ours.test\u00a0>", /a space or comment inside an address/],
    ["a\u3000b@ours.test", /a space or comment inside an address/],
    ["a@ours.test,,b@ours.test", /an empty entry/],
    ['"b@bank.test" (x) <a@ours.test>', /display name with '@'/],
    ['"b@bank.test\\"" <a@ours.test>', /display name with '@'/],
    ['"<b@bank.test>" <a@ours.test>', /display name with '@'/],
    ['"b@bank.test" <a@ours.test>, =?UTF-8?Q?x?= <c@ours.test>', /display name with '@'/],
    ["\\a@ours.test", /'\\' outside a quoted string/],
    ["a@ours.test)", /a '\)' without its '\('/],
    ["a@ours.test (unclosed", /a comment is not closed/],
    ["", /no address/],
  ];
  for (const [value, reason] of cases) assert.match(problem(` ${value}`), reason, value);
});

test("pathological input is handled in linear time", () => {
  const started = Date.now();
  problem(` ${"=?a?q?".repeat(100_000)}`);
  problem(` ${"=?a?q?x".repeat(100_000)}?=`);
  problem(` ${"(".repeat(300_000)}`);
  problem(` ${'"'.repeat(300_001)}`);
  assert.ok(Date.now() - started < 2_000, `${Date.now() - started} ms`);
});

test("addressesNamedIn finds every address-like text, in names, comments and encoded-words, in linear time", () => {
  assert.deepEqual(addressesNamedIn(' "x" <a@remote.example> (ceo@bank.example) =?UTF-8?Q?boss=40Bank.Example?= b@nodot'), [
    "a@remote.example",
    "ceo@bank.example",
    "boss@Bank.Example",
  ]);
  assert.deepEqual(addressesNamedIn(" plain text, no address"), []);
  const started = Date.now();
  addressesNamedIn(`${"a".repeat(200_000)}@${"b".repeat(200_000)}`);
  addressesNamedIn("a@".repeat(200_000));
  assert.ok(Date.now() - started < 2_000, `${Date.now() - started} ms`);
});

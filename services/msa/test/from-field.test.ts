// From: and Sender: are read strictly (RFC 5322 3.4): fields where a lenient parser (a mail
// client, a receiver's DMARC check) could find another address than the msa's are refused, and
// what real mail clients write still goes through. Real sockets: raw SMTP over TLS, Python's
// email package with smtplib, nodemailer.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import nodemailer from "nodemailer";
import { dkimVerify } from "mailauth/lib/dkim/verify.js";
import { addAlias } from "@mailstack/db";
import type { DkimDnsRecord } from "@mailstack/dkim";
import { createTestEnv, type TestEnv } from "@mailstack/testkit";
import { startMsa, type Msa } from "../src/server.ts";
import { memoryLogger, PASSWORDS, python, rawTls, seedDirectory, testSettings, testTls } from "./helpers.ts";

let env: TestEnv;
let msa: Msa;
let records: Record<string, DkimDnsRecord>;

before(async () => {
  env = await createTestEnv();
  records = await seedDirectory(env.pool);
  // A UTF-8 address alice may send as (SMTPUTF8).
  await addAlias(env.pool, "jörg@example.test", ["alice@example.test"]);
  msa = await startMsa({ pool: env.pool, bus: env.bus, logger: memoryLogger().logger, settings: testSettings(), tls: await testTls() });
});

after(async () => {
  await msa?.stop();
  await env?.close();
});

const resolver = async (name: string, type: string) => {
  const record = records[name];
  if (type === "TXT" && record) return [record.strings];
  throw Object.assign(new Error(`no TXT for ${name}`), { code: "ENOTFOUND" });
};

async function storedWithSubject(subject: string): Promise<Buffer[]> {
  const rows = (await env.pool.query("SELECT raw FROM messages WHERE position($1 in convert_from(raw, 'LATIN1')) > 0", [`Subject: ${subject}\r\n`])).rows;
  return rows.map((row) => row.raw as Buffer);
}

/** The unfolded value of the first `name:` field of a stored message, as UTF-8. */
function fieldOf(raw: Buffer, name: string): string | null {
  const head = raw.toString("utf8").split("\r\n\r\n")[0]!.replace(/\r\n(?=[ \t])/g, "");
  const line = head.split("\r\n").find((l) => l.toLowerCase().startsWith(`${name.toLowerCase()}:`));
  return line ? line.slice(name.length + 1).trim() : null;
}

/** One SMTP session on 465, logged in as alice; `send` runs a transaction with the given header lines and returns the reply to the data. */
async function aliceSession() {
  const client = await rawTls(msa.submissionsPort);
  assert.match(await client.reply(), /^220 /);
  assert.match(await client.command("EHLO client.test"), /^250 /);
  assert.match(await client.command(`AUTH PLAIN ${Buffer.from(`\0alice@example.test\0${PASSWORDS.alice}`).toString("base64")}`), /^235 /);
  const send = async (header: string | Buffer, options: { sender?: string; smtputf8?: boolean } = {}): Promise<string> => {
    const mail = `MAIL FROM:<${options.sender ?? "alice@example.test"}>${options.smtputf8 ? " SMTPUTF8" : ""}`;
    client.socket.write(Buffer.from(`${mail}\r\n`, "utf8"));
    assert.match(await client.reply(), /^250 /);
    assert.match(await client.command("RCPT TO:<bob@example.test>"), /^250 /);
    assert.match(await client.command("DATA"), /^354 /);
    client.socket.write(Buffer.concat([typeof header === "string" ? Buffer.from(header, "utf8") : header, Buffer.from("\r\n\r\nbody\r\n.\r\n")]));
    // The reply is read back as latin1; UTF-8 never appears in a reply (RFC 5321 4.2).
    return client.reply();
  };
  return { send, close: () => client.socket.end() };
}

test("ambiguous or malformed From: and Sender: fields are refused with 554 5.6.0 and nothing is stored", async () => {
  // [field lines, what the reply names]. The msa owns alice@example.test; bank.test is the address a
  // lenient reader could take.
  const cases: Array<[string, RegExp]> = [
    ["From: <alice@example.test>bob@bank.test", /text after the address/],
    ['From: "x" <alice@example.test> <bob@bank.test>', /more than one address in '<>'/],
    ["From: alice@example.test <bob@bank.test>", /an '@' outside an address/],
    ["From: bob@bank.test <alice@example.test>", /an '@' outside an address/],
    ["From: bob@bank.test\r\n <alice@example.test>", /an '@' outside an address/],
    ["From: alice@example.test (bob@bank.test)", /an '@' in a comment/],
    ["From: <alice@example.test> (Alice \\@ bob@bank.test)", /an '@' in a comment/],
    ["From: =?UTF-8?Q?bob=40bank.test?= <alice@example.test>", /encoded-word .* decodes to '@'/],
    ["From: =?UTF-8?B?PGJvYkBiYW5rLnRlc3Q+?= <alice@example.test>", /encoded-word .* decodes to '@'/],
    ['From: "=?UTF-8?Q?bob=40bank.test?=" <alice@example.test>', /encoded-word .* decodes to '@'/],
    ["From: =?UTF-7?Q?bob+AEA-bank.test?= <alice@example.test>", /encoded-word .* charset that cannot be decoded/],
    ["From: alice@example.test\r\nFrom: bob@bank.test", /more than one From: field/],
    ["From: Team: alice@example.test, bob@bank.test;", /a group/],
    ["From: Team: alice@example.test;", /a group/],
    ["From: <@bank.test:alice@example.test>", /source route/],
    ["From: alice@example.test\x01bob@bank.test", /control character/],
    ["From: Alice\x7f <alice@example.test>", /control character/],
    ["From: alice@example.test garbage", /text after the address/],
    ["From: alice@example.test, ", /an empty entry/],
    ["From: Alice <alice@example.test", /a '<' without its '>'/],
    ["From: < alice@example.test>", /a space or comment inside an address/],
    ["From: alice @example.test", /a space or comment inside an address/],
    ["From: alice@[127.0.0.1]", /a domain literal/],
    ['From: "Alice', /a quoted string is not closed/],
    ["From: Alice Example", /a display name without an address/],
    ['From: "bob@bank.test" (Alice) <alice@example.test>', /a display name with '@' in a field that also has comments/],
    ['From: "bob@bank.test\\" <x" <alice@example.test>', /a display name with '@' in a field that also has comments, encoded-words, '\\' escapes/],
    ['From: "<bob@bank.test>" <alice@example.test>', /a display name with '@' .* '<' '>' in a name/],
    ['From: "bob@bank.test" =?UTF-8?Q?=22?= <alice@example.test>', /a display name with '@' in a field that also has comments, encoded-words/],
    ["From: alice@example.test\r\nSender: alice@example.test, bob@bank.test", /Sender: field is not one mailbox .*more than one mailbox/],
    ["From: alice@example.test\r\nSender: <alice@example.test> bob@bank.test", /Sender: field .*text after the address/],
  ];
  const session = await aliceSession();
  try {
    for (const [fields, problem] of cases) {
      const answer = await session.send(`${fields}\r\nSubject: ambiguous-from`);
      assert.match(answer, /^554 5\.6\.0 Message refused: /, fields);
      assert.match(answer, problem, fields);
    }
    // NUL never gets this far: the SMTP layer refuses it first, with the same code.
    assert.match(await session.send("From: alice@example.test\0bob@bank.test\r\nSubject: ambiguous-from"), /^554 5\.6\.0 .*NUL/);
    // Not UTF-8: a byte a lenient decoder would merge with the quote after it.
    assert.match(await session.send(Buffer.from('From: "x\xc0" <alice@example.test>\r\nSubject: ambiguous-from', "latin1"), { smtputf8: true }), /^554 5\.6\.0 .*not valid UTF-8/);
  } finally {
    session.close();
  }
  assert.deepEqual(await storedWithSubject("ambiguous-from"), []);
});

test("the From: forms of Thunderbird, Outlook, Apple Mail and mutt are accepted as written, folded or not, and DKIM-signed", async () => {
  const forms = [
    "From: Alice Example <alice@example.test>", // Thunderbird, Apple Mail, mutt
    '"Example, Alice" <alice@example.test>', // Thunderbird and mutt quote a comma
    '"Alice Example" <alice@example.test>', // Outlook quotes every name
    "=?UTF-8?Q?J=C3=B6rg_M=C3=BCller?= <alice@example.test>", // Thunderbird, Apple Mail
    "=?UTF-8?Q?M=C3=BCller=2C_J=C3=B6rg?= <alice@example.test>", // Thunderbird: an encoded comma
    "=?iso-8859-1?Q?J=F6rg_M=FCller?= <alice@example.test>", // Outlook, mutt in latin1
    "=?utf-8?B?SsO2cmcgTcO8bGxlcg==?= <alice@example.test>", // Outlook, Apple Mail
    "=?UTF-8?Q?Hans_=22Hansi=22_M=C3=BCller?= <alice@example.test>", // a quoted nickname, encoded
    "=?iso-8859-1?Q?J=F6rg?= M=?iso-8859-1?Q?=FCller?= <alice@example.test>", // mutt: words encoded one by one
    '"bob@bank.test" <alice@example.test>', // a name that is an address: shown, but nobody reads it as the address
    "John Q. Public <alice@example.test>", // RFC 5322 obs-phrase: an unquoted "."
    "alice@example.test",
    "<alice@example.test>",
    "alice@example.test (Alice Example)", // the old comment style
    "Alice Example\r\n <alice@example.test>",
    '"Example, Alice (Sales department,\r\n Berlin office)" <alice@example.test>',
    "\r\n =?UTF-8?Q?J=C3=B6rg_M=C3=BCller?=\r\n <alice@example.test>",
    "Alice <alice@example.test>, Sales <sales@example.test>",
    "Alice <alice>", // completed with the account's domain (RFC 6409 8.6)
  ].map((form) => (form.startsWith("From: ") ? form : `From: ${form}`));
  const session = await aliceSession();
  try {
    for (const [i, form] of forms.entries()) {
      assert.match(await session.send(`${form}\r\nSubject: client-form-${i}`), /^250 /, form);
    }
    // UTF-8 under SMTPUTF8 (RFC 6532): a UTF-8 name and a UTF-8 address.
    assert.match(await session.send("From: Jörg Müller <jörg@example.test>\r\nSubject: client-form-utf8", { sender: "jörg@example.test", smtputf8: true }), /^250 /);
    assert.match(await session.send('From: "Müller, Jörg" <alice@example.test>\r\nSubject: client-form-utf8-quoted', { smtputf8: true }), /^250 /);
  } finally {
    session.close();
  }
  for (const [i, form] of forms.entries()) {
    const [raw] = await storedWithSubject(`client-form-${i}`);
    assert.ok(raw, form);
    const written = form.slice("From: ".length).replace(/\r\n(?=[ \t])/g, "").trim();
    assert.equal(fieldOf(raw, "From"), written === "Alice <alice>" ? "Alice <alice@example.test>" : written, form);
    const verified = await dkimVerify(raw, { resolver });
    assert.deepEqual(verified.results.map((r) => [r.signingDomain, r.status.result]), [["example.test", "pass"]], form);
  }
  assert.equal(fieldOf((await storedWithSubject("client-form-utf8"))[0]!, "From"), "Jörg Müller <jörg@example.test>");
  assert.equal((await storedWithSubject("client-form-utf8-quoted")).length, 1);
});

test("Python's email package: headerregistry and formataddr output, ASCII and SMTPUTF8, is accepted", async () => {
  const messages: Array<[string, string, string, string]> = [
    ["py-plain", "Alice Example", "alice@example.test", "smtp"],
    ["py-comma", "Example, Alice", "alice@example.test", "smtp"],
    ["py-utf8-name", "Jörg Müller", "alice@example.test", "smtp"],
    ["py-utf8-comma", "Müller, Jörg", "alice@example.test", "smtp"],
    ["py-parens", "Hans (Work) Müller", "alice@example.test", "smtp"],
    ["py-at-name", "bob@bank.test", "alice@example.test", "smtp"],
    ["py-long", "A rather long display name that the email package will certainly have to fold", "alice@example.test", "smtp"],
    ["py-no-name", "", "alice@example.test", "smtp"],
    ["py-formataddr", "Müller, Jörg", "alice@example.test", "formataddr"],
    ["py-smtputf8-name", "Müller, Jörg", "alice@example.test", "smtputf8"],
    ["py-smtputf8-address", "Jörg Müller", "jörg@example.test", "smtputf8"],
  ];
  const result = await python(["compose", String(msa.submissionPort), "alice@example.test", PASSWORDS.alice, "bob@example.test"], JSON.stringify(messages));
  for (const [subject] of messages) {
    assert.deepEqual(result.results[subject], { result: "sent" }, subject);
    assert.equal((await storedWithSubject(subject)).length, 1, subject);
  }
  // The refusal reaches smtplib as such, and the session goes on.
  const refused = await python(["compose", String(msa.submissionPort), "alice@example.test", PASSWORDS.alice, "bob@example.test"], JSON.stringify([
    ["py-forged", "x <bob@bank.test>", "alice@example.test", "formataddr"],
    ["py-after", "Alice", "alice@example.test", "smtp"],
  ]));
  assert.equal(refused.results["py-after"].result, "sent");
  // formataddr quotes the name, so this one is the legitimate '"x <bob@bank.test>" <alice@...>' form, except
  // that a name with '@' and '<' '>' is one a quote-blind reader takes the first address from.
  assert.equal(refused.results["py-forged"].code, 554);
  assert.match(refused.results["py-forged"].message, /^5\.6\.0 .*a display name with '@'/);
});

test("nodemailer's From: (name objects, UTF-8 names, long names) is accepted; a Sender: it writes is checked strictly too", async () => {
  const transport = nodemailer.createTransport({
    host: "127.0.0.1",
    port: msa.submissionPort,
    secure: false,
    requireTLS: true,
    auth: { user: "alice@example.test", pass: PASSWORDS.alice },
    tls: { rejectUnauthorized: false },
  });
  try {
    const names = ["Alice Example", "Example, Alice", "Jörg Müller", "Müller, Jörg", "bob@bank.test", "A rather long display name that nodemailer will have to encode and fold for sure, Jörg"];
    for (const [i, name] of names.entries()) {
      const info = await transport.sendMail({ from: { name, address: "alice@example.test" }, to: "bob@example.test", subject: `nm-${i}`, text: "hi" });
      assert.match(info.response, /^250 /, name);
    }
    const withSender = await transport.sendMail({ from: "Sales <sales@example.test>", sender: "Alice <alice@example.test>", to: "bob@example.test", subject: "nm-sender", text: "hi" });
    assert.match(withSender.response, /^250 /);
    // A raw message is sent as it is: its ambiguous Sender: gets the msa's refusal.
    await assert.rejects(
      transport.sendMail({ envelope: { from: "alice@example.test", to: ["bob@example.test"] }, raw: "From: alice@example.test\r\nSender: alice@example.test (bob@bank.test)\r\nSubject: nm-bad-sender\r\n\r\nhi\r\n" }),
      (error: { responseCode?: number; response?: string }) => error.responseCode === 554 && /5\.6\.0 .*Sender: field .*an '@' in a comment/.test(error.response ?? ""),
    );
  } finally {
    transport.close();
  }
  const stored = (await env.pool.query("SELECT count(*)::int AS n FROM messages WHERE position('Subject: nm-' in convert_from(raw, 'LATIN1')) > 0")).rows[0].n;
  assert.equal(stored, 7);
});

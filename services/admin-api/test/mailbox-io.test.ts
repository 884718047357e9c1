import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { addAccount, addDomain, transaction } from "@mailstack/db";
import { insertMessage } from "@mailstack/queue";
import { waitFor } from "@mailstack/testkit";
import { mailctl, startHarness, type ApiHarness } from "./helpers.ts";

let h: ApiHarness;
let work: string;

// Messages chosen to break naive mbox handling: From lines at every quoting depth, bare LF,
// 8-bit bytes, a message without a final newline, trailing blank lines.
const MESSAGES: { folder: string; prefix: string; raw: Buffer; from: string }[] = [
  { folder: "INBOX", prefix: "Return-Path: <a@x.test>\r\nDelivered-To: alice@io.test\r\n", from: "a@x.test",
    raw: Buffer.from("Message-ID: <m1@x.test>\r\nSubject: one\r\n\r\nFrom the top\r\n>From once\r\n>>From twice\r\n") },
  { folder: "INBOX", prefix: "", from: "",
    raw: Buffer.from("Subject: bounce\r\n\r\n\r\nFrom \r\nbody\r\n\r\n\r\n") },
  { folder: "INBOX", prefix: "Delivered-To: alice@io.test\r\n", from: "b@y.test",
    raw: Buffer.from("Subject: =?utf-8?q?caf=C3=A9?=\nContent-Transfer-Encoding: 8bit\n\ncaf\xc3\xa9 \x00\xff\nno final newline", "latin1") },
  { folder: "Archive/2024", prefix: "Return-Path: <c@z.test>\r\n", from: "c@z.test",
    raw: Buffer.from(`Subject: big\r\n\r\n${"From line\r\n".repeat(2000)}`) },
  { folder: "Archive/2024", prefix: "", from: "d@z.test", raw: Buffer.from("Subject: last\r\n\r\nbye\r\n") },
];

async function accountId(address: string): Promise<number> {
  return (await h.db.pool.query("SELECT id FROM accounts WHERE address = $1", [address])).rows[0].id;
}

/** What the mailbox holds, in order: folder, UID and the exact bytes a client would get. */
async function contents(address: string): Promise<{ folder: string; bytes: Buffer }[]> {
  const result = await h.db.pool.query(
    `SELECT e.folder, e.uid, e.header_prefix || m.raw AS bytes FROM mailbox_entries e JOIN messages m ON m.id = e.message_id
     WHERE e.account_id = $1 ORDER BY e.folder, e.uid`,
    [await accountId(address)],
  );
  return result.rows.map((r) => ({ folder: r.folder, bytes: r.bytes }));
}

function expected(folderMap: (folder: string) => string = (f) => f) {
  return MESSAGES.map((m) => ({ folder: folderMap(m.folder), bytes: Buffer.concat([Buffer.from(m.prefix, "latin1"), m.raw]) }))
    .sort((a, b) => (a.folder < b.folder ? -1 : a.folder > b.folder ? 1 : 0));
}

function assertSame(actual: { folder: string; bytes: Buffer }[], wanted: { folder: string; bytes: Buffer }[]) {
  assert.deepEqual(actual.map((e) => e.folder), wanted.map((e) => e.folder));
  actual.forEach((entry, i) => assert.ok(entry.bytes.equals(wanted[i]!.bytes), `message ${i} in ${entry.folder} differs`));
}

before(async () => {
  h = await startHarness();
  work = await mkdtemp(path.join(tmpdir(), "mailbox-io-"));
  await addDomain(h.db.pool, "io.test");
  for (const name of ["alice", "bob", "carol", "dave", "erin", "frank"]) {
    await addAccount(h.db.pool, { address: `${name}@io.test`, password: "pw" });
  }
  // Room for the first message of a whole-mailbox export (Archive/2024 UID 1), not the second.
  await addAccount(h.db.pool, { address: "tiny@io.test", password: "pw", quotaBytes: expected()[0]!.bytes.length + 10 });
  // File alice's mail the way the MDA does: a stored message plus a per-recipient header prefix.
  const alice = await accountId("alice@io.test");
  for (const m of MESSAGES) {
    await transaction(h.db.pool, async (client) => {
      const stored = await insertMessage(client, { raw: m.raw, envelopeFrom: m.from, source: "inbound" }, [], "test");
      await client.query("INSERT INTO folders (account_id, name) VALUES ($1, $2) ON CONFLICT DO NOTHING", [alice, m.folder]);
      const uid = await client.query("UPDATE folders SET uid_next = uid_next + 1 WHERE account_id = $1 AND name = $2 RETURNING uid_next - 1 AS uid", [alice, m.folder]);
      const prefix = Buffer.from(m.prefix, "latin1");
      await client.query(
        "INSERT INTO mailbox_entries (account_id, folder, uid, message_id, header_prefix, size) VALUES ($1, $2, $3, $4, $5, $6)",
        [alice, m.folder, uid.rows[0].uid, stored.messageId, prefix, prefix.length + m.raw.length],
      );
    });
  }
  assertSame(await contents("alice@io.test"), expected());
});
after(async () => {
  if (work) await rm(work, { recursive: true, force: true });
  await h?.close();
});

test("mailctl: one folder to mbox and back is byte for byte, and re-exporting gives the identical file", async () => {
  const file = path.join(work, "inbox.mbox");
  const exported = await mailctl(h.db.url, ["mailbox", "export", "alice@io.test", "--format", "mbox", "--folder", "INBOX", "--output", file]);
  assert.equal(exported.code, 0, exported.stderr);
  const mbox = await readFile(file);
  assert.ok(mbox.toString("latin1").startsWith("From a@x.test "));
  assert.ok(mbox.includes(">From the top\r\n>>From once\r\n>>>From twice\r\n"), "mboxrd quoting");
  assert.ok(mbox.includes("\nFrom MAILER-DAEMON "), "null sender");

  const imported = await mailctl(h.db.url, ["mailbox", "import", "bob@io.test", "--format", "mbox", "--input", file]);
  assert.equal(imported.code, 0, imported.stderr);
  assert.match(imported.stdout, /imported 3 message\(s\)/);
  assertSame(await contents("bob@io.test"), expected().filter((e) => e.folder === "INBOX"));

  const again = path.join(work, "inbox-again.mbox");
  assert.equal((await mailctl(h.db.url, ["mailbox", "export", "bob@io.test", "--format", "mbox", "--folder", "INBOX", "--output", again])).code, 0);
  assert.ok((await readFile(again)).equals(mbox), "re-exported mbox is identical");

  // Imported rows: source 'import', UIDs from the folders table, usage counted.
  const bob = await accountId("bob@io.test");
  const rows = await h.db.pool.query(
    "SELECT e.uid, m.source, m.message_id_header FROM mailbox_entries e JOIN messages m ON m.id = e.message_id WHERE e.account_id = $1 ORDER BY e.uid",
    [bob],
  );
  assert.deepEqual(rows.rows.map((r) => r.uid), [1, 2, 3]);
  assert.ok(rows.rows.every((r) => r.source === "import"));
  assert.equal(rows.rows[0].message_id_header, "<m1@x.test>");
  const folder = await h.db.pool.query("SELECT uid_next FROM folders WHERE account_id = $1 AND name = 'INBOX'", [bob]);
  assert.equal(folder.rows[0].uid_next, 4);
  const used = await h.db.pool.query("SELECT used_bytes FROM accounts WHERE id = $1", [bob]);
  assert.equal(used.rows[0].used_bytes, expected().filter((e) => e.folder === "INBOX").reduce((n, e) => n + e.bytes.length, 0));
});

test("mailctl: a whole mailbox to mbox files and to .eml folders, and back", async () => {
  const mboxDir = path.join(work, "all-mbox");
  assert.equal((await mailctl(h.db.url, ["mailbox", "export", "alice@io.test", "--format", "mbox", "--output", mboxDir])).code, 0);
  assert.deepEqual((await readdir(mboxDir, { recursive: true })).sort(), ["Archive", "Archive/2024.mbox", "INBOX.mbox"]);
  const mboxImport = await mailctl(h.db.url, ["mailbox", "import", "dave@io.test", "--format", "mbox", "--input", mboxDir]);
  assert.equal(mboxImport.code, 0, mboxImport.stderr);
  assertSame(await contents("dave@io.test"), expected());

  const emlDir = path.join(work, "all-eml");
  const emlExport = await mailctl(h.db.url, ["mailbox", "export", "alice@io.test", "--format", "eml", "--output", emlDir]);
  assert.equal(emlExport.code, 0, emlExport.stderr);
  assert.deepEqual((await readdir(emlDir, { recursive: true })).sort(), ["Archive", "Archive/2024", "Archive/2024/1.eml", "Archive/2024/2.eml", "INBOX", "INBOX/1.eml", "INBOX/2.eml", "INBOX/3.eml"]);
  assert.ok((await readFile(path.join(emlDir, "INBOX/3.eml"))).equals(expected()[4]!.bytes));
  const emlImport = await mailctl(h.db.url, ["mailbox", "import", "erin@io.test", "--format", "eml", "--input", emlDir]);
  assert.equal(emlImport.code, 0, emlImport.stderr);
  assertSame(await contents("erin@io.test"), expected());

  // A folder of .eml files into a named folder.
  const one = path.join(work, "archive-eml");
  assert.equal((await mailctl(h.db.url, ["mailbox", "export", "alice@io.test", "--format", "eml", "--folder", "Archive/2024", "--output", one])).code, 0);
  assert.deepEqual((await readdir(one)).sort(), ["1.eml", "2.eml"]);

  const refused = await mailctl(h.db.url, ["mailbox", "import", "nobody@io.test", "--format", "mbox", "--input", path.join(work, "inbox.mbox")]);
  assert.equal(refused.code, 1);
  assert.match(refused.stderr, /no such account/);
  const bad = await mailctl(h.db.url, ["mailbox", "export", "alice@io.test", "--format", "zip", "--output", one]);
  assert.equal(bad.code, 2);
});

test("a folder stored with a name that climbs out of a path (an old filter rule's '../x') is never written outside the export", async () => {
  await addAccount(h.db.pool, { address: "gina@io.test", password: "pw" });
  await addAccount(h.db.pool, { address: "hana2@io.test", password: "pw" });
  const gina = await accountId("gina@io.test");
  for (const folder of ["INBOX", "../../escape"]) {
    await transaction(h.db.pool, async (client) => {
      const raw = Buffer.from(`Subject: in ${folder}\r\n\r\nhi\r\n`);
      const stored = await insertMessage(client, { raw, envelopeFrom: "x@y.test", source: "inbound" }, [], "test");
      await client.query("INSERT INTO folders (account_id, name, uid_next) VALUES ($1, $2, 2) ON CONFLICT (account_id, name) DO UPDATE SET uid_next = 2", [gina, folder]);
      await client.query(
        "INSERT INTO mailbox_entries (account_id, folder, uid, message_id, header_prefix, size) VALUES ($1, $2, 1, $3, ''::bytea, $4)",
        [gina, folder, stored.messageId, raw.length],
      );
    });
  }
  const root = path.join(work, "escape-test");
  await mkdir(path.join(root, "out"), { recursive: true });
  for (const format of ["eml", "mbox"]) {
    const output = path.join(root, "out", format);
    const result = await mailctl(h.db.url, ["mailbox", "export", "gina@io.test", "--format", format, "--output", output]);
    assert.equal(result.code, 1, `${format}: ${result.stdout}`);
    assert.match(result.stderr, /invalid folder name: "\.\.\/\.\.\/escape"/);
    const written = await readdir(root, { recursive: true });
    assert.ok(!written.some((name) => name.includes("escape")), `${format} wrote outside its output: ${written.join(", ")}`);
  }
  const tar = await h.call("GET", "/accounts/gina@io.test/export?format=eml");
  assert.equal(tar.status, 409, await tar.text());
  // A folder name too long for a tar entry (ustar: 255 bytes) is refused the same way, as JSON.
  const longName = "L".repeat(200);
  const imported = await h.call("POST", `/accounts/hana2@io.test/import?format=eml&folder=${longName}`, { raw: Buffer.from("Subject: l\r\n\r\nl\r\n"), contentType: "message/rfc822" });
  assert.equal(imported.status, 200, await imported.clone().text());
  const longTar = await h.call("GET", "/accounts/hana2@io.test/export?format=eml");
  assert.equal(longTar.status, 409, await longTar.clone().text());
  assert.match(longTar.headers.get("content-type") ?? "", /^application\/json/);
  assert.match(((await longTar.json()) as { message: string }).message, /cannot be a path in an archive/);
  // One folder at a time still works for the folders that are fine.
  const inbox = await h.call("GET", "/accounts/gina@io.test/export?format=eml&folder=INBOX");
  assert.equal(inbox.status, 200);
  await inbox.arrayBuffer();
});

test("INBOX is one folder however it is written, and exporting a folder that does not exist is refused, not an empty export", async () => {
  await addAccount(h.db.pool, { address: "hana@io.test", password: "pw" });
  const eml = Buffer.from("Subject: one\r\n\r\nhi\r\n");
  const viaEml = await h.call("POST", "/accounts/hana@io.test/import?format=eml&folder=inbox", { raw: eml, contentType: "message/rfc822" });
  assert.deepEqual(await viaEml.json(), { imported: 1, bytes: eml.length, folders: ["INBOX"] });
  const mbox = Buffer.from("From a@b.test Thu Jan  1 00:00:00 1970\nSubject: two\n\nbody\n\n");
  const viaMbox = await h.call("POST", "/accounts/hana@io.test/import?format=mbox&folder=Inbox", { raw: mbox, contentType: "application/mbox" });
  assert.equal(viaMbox.status, 200, await viaMbox.clone().text());
  assert.deepEqual(((await viaMbox.json()) as { folders: string[] }).folders, ["INBOX"]);
  const file = path.join(work, "hana.mbox");
  await writeFile(file, mbox);
  const viaCli = await mailctl(h.db.url, ["mailbox", "import", "hana@io.test", "--format", "mbox", "--input", file, "--folder", "iNbOx"]);
  assert.equal(viaCli.code, 0, viaCli.stderr);
  const folders = await h.db.pool.query("SELECT DISTINCT folder FROM mailbox_entries WHERE account_id = $1", [await accountId("hana@io.test")]);
  assert.deepEqual(folders.rows.map((r) => r.folder), ["INBOX"]);
  const exported = await h.call("GET", "/accounts/hana@io.test/export?format=mbox&folder=inbox");
  assert.equal(exported.status, 200);
  assert.equal((await exported.text()).match(/^From /gm)?.length, 3);

  // An empty message/rfc822 upload (curl's @file that could not be read) imports nothing.
  const empty = await h.call("POST", "/accounts/hana@io.test/import?format=eml", { raw: Buffer.alloc(0), contentType: "message/rfc822" });
  assert.equal(empty.status, 400, await empty.clone().text());
  assert.equal((await h.db.pool.query("SELECT count(*)::int AS n FROM mailbox_entries WHERE account_id = $1", [await accountId("hana@io.test")])).rows[0].n, 3);

  for (const format of ["mbox", "eml"]) {
    const missing = await h.call("GET", `/accounts/hana@io.test/export?format=${format}&folder=Archive`);
    assert.equal(missing.status, 404, format);
    assert.match(((await missing.json()) as { message: string }).message, /no such folder: Archive/);
    const output = path.join(work, `hana-missing-${format}`);
    const cli = await mailctl(h.db.url, ["mailbox", "export", "hana@io.test", "--format", format, "--folder", "Archive", "--output", output]);
    assert.equal(cli.code, 1, `${format}: ${cli.stdout}`);
    assert.match(cli.stderr, /no such folder: Archive/);
    await assert.rejects(readdir(output).catch(async () => readFile(output)), `${format}: nothing written`);
  }
});

test("API: mbox export streams the same bytes mailctl writes, and import through the API round-trips", async () => {
  const response = await h.call("GET", "/accounts/alice@io.test/export?format=mbox&folder=INBOX");
  assert.equal(response.status, 200);
  assert.equal(response.headers.get("content-type"), "application/mbox");
  const mbox = Buffer.from(await response.arrayBuffer());
  assert.ok(mbox.equals(await readFile(path.join(work, "inbox.mbox"))), "API and mailctl export the same bytes");

  const imported = await h.call("POST", "/accounts/carol@io.test/import?format=mbox&folder=Restored", { raw: mbox, contentType: "application/mbox" });
  assert.equal(imported.status, 200, await imported.clone().text());
  const inboxBytes = expected().filter((e) => e.folder === "INBOX").reduce((n, e) => n + e.bytes.length, 0);
  assert.deepEqual(await imported.json(), { imported: 3, bytes: inboxBytes, folders: ["Restored"] });
  assertSame(await contents("carol@io.test"), expected().filter((e) => e.folder === "INBOX").map((e) => ({ ...e, folder: "Restored" })));
  const back = await h.call("GET", "/accounts/carol@io.test/export?format=mbox&folder=Restored");
  assert.ok(Buffer.from(await back.arrayBuffer()).equals(mbox));

  assert.equal((await h.call("GET", "/accounts/alice@io.test/export?format=mbox&folder=Nope")).status, 404);
  const notMbox = await h.call("POST", "/accounts/carol@io.test/import?format=mbox", { raw: Buffer.from("Subject: x\r\n\r\nhi\r\n"), contentType: "application/mbox" });
  assert.equal(notMbox.status, 400);
  const badFolder = await h.call("POST", "/accounts/carol@io.test/import?format=mbox&folder=a/../b", { raw: mbox, contentType: "application/mbox" });
  assert.equal(badFolder.status, 400);
  assert.equal(((await badFolder.json()) as { field: string }).field, "folder");
});

test("API: the whole mailbox as a tar of .eml files and back; quota refusals say how far the import got", async () => {
  const response = await h.call("GET", "/accounts/alice@io.test/export?format=eml");
  assert.equal(response.status, 200);
  assert.equal(response.headers.get("content-type"), "application/x-tar");
  const tar = Buffer.from(await response.arrayBuffer());
  const imported = await h.call("POST", "/accounts/frank@io.test/import?format=eml", { raw: tar, contentType: "application/x-tar" });
  assert.equal(imported.status, 200, await imported.clone().text());
  assert.equal(((await imported.json()) as { imported: number }).imported, MESSAGES.length);
  assertSame(await contents("frank@io.test"), expected());
  // Same files, same bytes, same mtimes (import keeps each file's mtime as the message's received time).
  assert.ok(Buffer.from(await (await h.call("GET", "/accounts/frank@io.test/export?format=eml")).arrayBuffer()).equals(tar));

  // One .eml file on its own, as message/rfc822.
  const single = await h.call("POST", "/accounts/frank@io.test/import?format=eml&folder=Single", { raw: expected()[4]!.bytes, contentType: "message/rfc822" });
  assert.equal(single.status, 200, await single.clone().text());
  assert.deepEqual(await single.json(), { imported: 1, bytes: expected()[4]!.bytes.length, folders: ["Single"] });
  const filed = (await contents("frank@io.test")).filter((e) => e.folder === "Single");
  assert.equal(filed.length, 1);
  assert.ok(filed[0]!.bytes.equals(expected()[4]!.bytes));

  const overQuota = await h.call("POST", "/accounts/tiny@io.test/import?format=eml", { raw: tar, contentType: "application/x-tar" });
  assert.equal(overQuota.status, 413);
  const tooBig = await h.call("POST", "/accounts/frank@io.test/import?format=eml", { raw: Buffer.alloc(60 * 1024 * 1024 + 1, 0x61), contentType: "message/rfc822" });
  assert.equal(tooBig.status, 413);
  assert.match(((await tooBig.json()) as { message: string }).message, /larger than the limit of 52428800 bytes/);
  assert.match(((await overQuota.json()) as { message: string }).message, /quota .* \(after 1 message\(s\) imported\)/);
  assert.equal((await contents("tiny@io.test")).length, 1);
});

test("API: a client that goes away mid-export releases the cursor and its database connection", async () => {
  const big = await addAccount(h.db.pool, { address: "big@io.test", password: "pw" });
  await h.db.pool.query(
    `WITH m AS (
       INSERT INTO messages (queue_id, raw, size, envelope_from, source)
       SELECT 'BIGIO' || n, convert_to(repeat(E'Subject: big\\r\\n\\r\\n' || repeat('y', 70000) || E'\\r\\n', 1), 'UTF8'), 70016, '', 'inbound'
       FROM generate_series(1, 300) n RETURNING id, size)
     INSERT INTO mailbox_entries (account_id, folder, uid, message_id, size) SELECT $1, 'INBOX', row_number() OVER (ORDER BY id), id, size FROM m`,
    [big.id],
  );
  const controller = new AbortController();
  const response = await h.call("GET", "/accounts/big@io.test/export?format=mbox&folder=INBOX", { signal: controller.signal });
  assert.equal(response.status, 200);
  const reader = response.body!.getReader();
  const first = await reader.read();
  assert.ok(first.value && first.value.length > 0);
  controller.abort();
  await reader.cancel().catch(() => undefined);
  // The export's connection goes back to the pool: nothing stays checked out.
  await waitFor(() => h.db.pool.totalCount === h.db.pool.idleCount, 10_000);
  const active = await h.db.pool.query("SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() AND state = 'active' AND query LIKE '%FROM mailbox_entries e JOIN messages%'");
  assert.equal(active.rows[0].n, 0);
  // And the API still answers.
  assert.equal((await h.call("GET", "/accounts/big@io.test")).status, 200);
});

test("API: an SMTPUTF8 envelope sender survives the mbox From_ line and the .eml Return-Path round trip", async () => {
  const sender = "用户@例子.test";
  for (const name of ["utf-src", "utf-mbox", "utf-eml"]) await addAccount(h.db.pool, { address: `${name}@io.test`, password: "pw" });
  const source = await accountId("utf-src@io.test");
  const raw = Buffer.from("Subject: from far away\r\n\r\nFrom the other side\r\n");
  await transaction(h.db.pool, async (client) => {
    const stored = await insertMessage(client, { raw, envelopeFrom: sender, source: "inbound" }, [], "test");
    const prefix = Buffer.from(`Return-Path: <${sender}>\r\nDelivered-To: utf-src@io.test\r\n`);
    await client.query("INSERT INTO folders (account_id, name) VALUES ($1, 'INBOX') ON CONFLICT DO NOTHING", [source]);
    const uid = await client.query("UPDATE folders SET uid_next = uid_next + 1 WHERE account_id = $1 AND name = 'INBOX' RETURNING uid_next - 1 AS uid", [source]);
    await client.query(
      "INSERT INTO mailbox_entries (account_id, folder, uid, message_id, header_prefix, size) VALUES ($1, 'INBOX', $2, $3, $4, $5)",
      [source, uid.rows[0].uid, stored.messageId, prefix, prefix.length + raw.length],
    );
  });
  const envelopeOf = async (address: string) => (await h.db.pool.query(
    "SELECT m.envelope_from FROM mailbox_entries e JOIN messages m ON m.id = e.message_id WHERE e.account_id = $1",
    [await accountId(address)],
  )).rows.map((r) => r.envelope_from);

  const mbox = Buffer.from(await (await h.call("GET", "/accounts/utf-src@io.test/export?format=mbox")).arrayBuffer());
  assert.ok(mbox.toString("utf8").startsWith(`From ${sender} `), mbox.subarray(0, 60).toString("utf8"));
  assert.equal((await h.call("POST", "/accounts/utf-mbox@io.test/import?format=mbox", { raw: mbox, contentType: "application/mbox" })).status, 200);
  assert.deepEqual(await envelopeOf("utf-mbox@io.test"), [sender]);

  const tar = Buffer.from(await (await h.call("GET", "/accounts/utf-src@io.test/export?format=eml")).arrayBuffer());
  assert.equal((await h.call("POST", "/accounts/utf-eml@io.test/import?format=eml", { raw: tar, contentType: "application/x-tar" })).status, 200);
  assert.deepEqual(await envelopeOf("utf-eml@io.test"), [sender]);
});

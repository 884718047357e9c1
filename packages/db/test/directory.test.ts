import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { createTestDatabase, type TestDatabase } from "@mailstack/testkit";
import { verifyPassword } from "@mailstack/mail";
import {
  DirectoryError, addAccount, addAlias, addDomain, getAccount, listAccounts, removeAccount, removeAlias,
  removeDomain, resolveRecipient, setAccountDisabled, setAccountPassword,
} from "../src/index.ts";

let db: TestDatabase;
before(async () => {
  db = await createTestDatabase();
  await addDomain(db.pool, "Example.TEST");
  await addDomain(db.pool, "other.test");
  for (const name of ["alice", "bob", "carol"]) await addAccount(db.pool, { address: `${name}@example.test`, password: `pw-${name}` });
});
after(async () => db.drop());

async function rejects(fn: () => Promise<unknown>, code: DirectoryError["code"]) {
  await assert.rejects(fn, (error: unknown) => error instanceof DirectoryError && error.code === code);
}

test("domains are stored normalised and unique", async () => {
  await rejects(() => addDomain(db.pool, "example.test"), "duplicate");
  await rejects(() => addDomain(db.pool, "not a domain"), "invalid");
  await rejects(() => removeDomain(db.pool, "example.test"), "in-use");
  await rejects(() => removeDomain(db.pool, "missing.test"), "not-found");
});

test("accounts need an existing domain, a unique address and store only a hash", async () => {
  await rejects(() => addAccount(db.pool, { address: "x@nowhere.test", password: "p" }), "not-found");
  await rejects(() => addAccount(db.pool, { address: "Alice@Example.test", password: "p" }), "duplicate");
  await rejects(() => addAccount(db.pool, { address: "bad@@example.test", password: "p" }), "invalid");
  const alice = await getAccount(db.pool, "ALICE@example.test");
  assert.ok(alice);
  assert.notEqual(alice.password_hash, "pw-alice");
  assert.ok(await verifyPassword("pw-alice", alice.password_hash));
  await setAccountPassword(db.pool, "alice@example.test", "new-secret");
  const changed = await getAccount(db.pool, "alice@example.test");
  assert.ok(await verifyPassword("new-secret", changed!.password_hash));
  const count = (await listAccounts(db.pool)).length;
  await rejects(() => addAccount(db.pool, { address: "dave@example.test", password: "" }), "invalid");
  assert.equal((await listAccounts(db.pool)).length, count, "a refused add changes nothing");
});

test("the schema itself refuses inconsistent rows", async () => {
  const alice = (await getAccount(db.pool, "alice@example.test"))!;
  await assert.rejects(db.pool.query("INSERT INTO accounts (domain_id, local_part, address, password_hash) VALUES ($1, 'Upper', 'Upper@example.test', 'x')", [alice.domain_id]));
  const message = await db.pool.query("INSERT INTO messages (queue_id, raw, size, envelope_from, source) VALUES ('Q1', 'x', 1, '', 'inbound') RETURNING id");
  await assert.rejects(
    db.pool.query("INSERT INTO deliveries (message_id, recipient, final_recipient, kind, account_id, state) VALUES ($1, 'a', 'a', 'local', $2, 'lost')", [message.rows[0].id, alice.id]),
    /check constraint/,
  );
  await db.pool.query("INSERT INTO folders (account_id, name) VALUES ($1, 'X')", [alice.id]);
  await db.pool.query("INSERT INTO mailbox_entries (account_id, folder, uid, message_id, size) VALUES ($1, 'X', 1, $2, 1)", [alice.id, message.rows[0].id]);
  await assert.rejects(
    db.pool.query("INSERT INTO mailbox_entries (account_id, folder, uid, message_id, size) VALUES ($1, 'X', 1, $2, 1)", [alice.id, message.rows[0].id]),
    /duplicate key/,
  );
});

test("aliases resolve one-to-many, many-to-one, catch-all and remote; loops are detected", async () => {
  await addAlias(db.pool, "team@example.test", ["alice@example.test", "bob@example.test", "friend@remote.test"]);
  await addAlias(db.pool, "sales@example.test", ["team@example.test", "alice@example.test"]);
  await addAlias(db.pool, "*@other.test", ["carol@example.test"]);
  const sales = await resolveRecipient(db.pool, "sales@example.test");
  assert.ok(sales.ok);
  assert.deepEqual(sales.routes.map((r) => r.address).sort(), ["alice@example.test", "bob@example.test", "friend@remote.test"]);
  const catchAll = await resolveRecipient(db.pool, "anyone@other.test");
  assert.ok(catchAll.ok && catchAll.routes.length === 1 && catchAll.routes[0]!.address === "carol@example.test");
  assert.deepEqual(await resolveRecipient(db.pool, "nobody@example.test"), { ok: false, reason: "unknown-user" });
  assert.deepEqual(await resolveRecipient(db.pool, "someone@remote.test"), { ok: false, reason: "relay-denied" });
  const remote = await resolveRecipient(db.pool, "someone@remote.test", { allowRemote: true });
  assert.ok(remote.ok && remote.routes[0]!.kind === "remote");

  await addAlias(db.pool, "loop-a@example.test", ["carol@example.test"]);
  await addAlias(db.pool, "loop-b@example.test", ["loop-a@example.test"]);
  await db.pool.query("UPDATE aliases SET targets = '{loop-b@example.test}' WHERE address = 'loop-a@example.test'");
  assert.deepEqual(await resolveRecipient(db.pool, "loop-a@example.test"), { ok: false, reason: "loop" });

  for (let i = 0; i < 12; i++) await addAlias(db.pool, `chain${i}@example.test`, [i === 0 ? "alice@example.test" : `chain${i - 1}@example.test`]);
  assert.deepEqual(await resolveRecipient(db.pool, "chain11@example.test"), { ok: false, reason: "too-deep" });
  assert.ok((await resolveRecipient(db.pool, "chain5@example.test")).ok);

  await rejects(() => addAlias(db.pool, "x@example.test", ["ghost@example.test"]), "not-found");
  await rejects(() => addAlias(db.pool, "alice@example.test", ["bob@example.test"]), "duplicate");
  await removeAlias(db.pool, "*@other.test");
  assert.deepEqual(await resolveRecipient(db.pool, "anyone@other.test"), { ok: false, reason: "unknown-user" });
});

test("a disabled account refuses mail; a removed one is gone", async () => {
  await setAccountDisabled(db.pool, "carol@example.test", true);
  assert.deepEqual(await resolveRecipient(db.pool, "carol@example.test"), { ok: false, reason: "disabled" });
  await addAccount(db.pool, { address: "temp@example.test", password: "x" });
  await removeAccount(db.pool, "temp@example.test");
  assert.equal(await getAccount(db.pool, "temp@example.test"), null);
});

test("our local parts are found however cased; remote alias targets and recipients keep theirs (RFC 5321 2.4)", async () => {
  const alias = await addAlias(db.pool, "Mixed.Case@Example.test", ["BOB@example.test", "Ann.Other@Dest.Test", "ann.other@dest.test"]);
  // The alias is named by its key, a local target too; remote targets are kept as written (two of them).
  assert.equal(alias.address, "mixed.case@example.test");
  assert.deepEqual(alias.targets, ["bob@example.test", "Ann.Other@dest.test", "ann.other@dest.test"]);
  await rejects(() => addAlias(db.pool, "self@example.test", ["SELF@Example.test"]), "invalid");
  await rejects(() => addAlias(db.pool, "x@example.test", ["GHOST@example.test"]), "not-found");

  const resolved = await resolveRecipient(db.pool, "MIXED.case@example.test");
  assert.ok(resolved.ok);
  assert.deepEqual(resolved.routes.map((r) => `${r.kind} ${r.address}`).sort(), ["local bob@example.test", "remote Ann.Other@dest.test", "remote ann.other@dest.test"]);
  const account = await resolveRecipient(db.pool, "ALICE@example.test");
  assert.ok(account.ok && account.routes[0]!.kind === "local" && account.routes[0]!.address === "alice@example.test");
  const remote = await resolveRecipient(db.pool, "Some.One@remote.test", { allowRemote: true });
  assert.ok(remote.ok && remote.routes[0]!.address === "Some.One@remote.test");

  // Rows written before local parts kept their case (every target lower-cased) are found as before.
  await db.pool.query("INSERT INTO aliases (domain_id, local_part, address, targets) SELECT domain_id, 'legacy', 'legacy@example.test', '{alice@example.test,old@remote.test}' FROM accounts WHERE address = 'alice@example.test'");
  const legacy = await resolveRecipient(db.pool, "Legacy@EXAMPLE.test");
  assert.ok(legacy.ok);
  assert.deepEqual(legacy.routes.map((r) => r.address).sort(), ["alice@example.test", "old@remote.test"]);
  await removeAlias(db.pool, "LEGACY@example.test");
  await removeAlias(db.pool, "mixed.CASE@example.test");
});

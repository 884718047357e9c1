import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { addDomain } from "@mailstack/db";
import { publicKeyValue } from "@mailstack/dkim";
import { createTestDatabase, runMailctl, type TestDatabase } from "@mailstack/testkit";

let db: TestDatabase;
before(async () => {
  db = await createTestDatabase();
  await addDomain(db.pool, "signed.test");
});
after(async () => db.drop());

function mailctl(args: string[]) {
  return runMailctl(db.url, args);
}

test("domain dkim generates a key, stores it and prints the TXT record of that key", async () => {
  const result = await mailctl(["domain", "dkim", "signed.test", "--selector", "mail2026", "--algorithm", "ed25519-sha256"]);
  assert.equal(result.code, 0, result.stderr);
  assert.match(result.stdout, /name: {2}mail2026\._domainkey\.signed\.test/);
  const row = (await db.pool.query("SELECT dkim_selector, dkim_algorithm, dkim_private_key FROM domains WHERE name = 'signed.test'")).rows[0];
  assert.equal(row.dkim_selector, "mail2026");
  assert.equal(row.dkim_algorithm, "ed25519-sha256");
  const p = publicKeyValue(row.dkim_private_key, "ed25519-sha256");
  assert.ok(result.stdout.includes(`value: v=DKIM1; k=ed25519; p=${p}`));
  assert.ok(!result.stdout.includes("PRIVATE KEY"));

  const shown = await mailctl(["domain", "dkim", "signed.test", "--show"]);
  assert.equal(shown.code, 0, shown.stderr);
  assert.ok(shown.stdout.includes(`p=${p}`));
});

test("domain dkim defaults to rsa-sha256 and refuses bad input", async () => {
  const rsa = await mailctl(["domain", "dkim", "signed.test"]);
  assert.equal(rsa.code, 0, rsa.stderr);
  assert.match(rsa.stdout, /k=rsa; p=/);
  const unknown = await mailctl(["domain", "dkim", "nowhere.test"]);
  assert.equal(unknown.code, 1);
  assert.match(unknown.stderr, /no such domain/);
  const badAlgorithm = await mailctl(["domain", "dkim", "signed.test", "--algorithm", "rsa-sha1"]);
  assert.equal(badAlgorithm.code, 2);
});

test("domain dkim rotates in two steps: a pending key to publish, then --activate", async () => {
  await addDomain(db.pool, "rotating.test");
  const signingSelector = async () => (await db.pool.query("SELECT dkim_selector FROM domains WHERE name = 'rotating.test'")).rows[0].dkim_selector;
  const first = await mailctl(["domain", "dkim", "rotating.test", "--selector", "one", "--algorithm", "ed25519-sha256"]);
  assert.equal(first.code, 0, first.stderr);
  assert.match(first.stdout, /New key, signing now/);
  const second = await mailctl(["domain", "dkim", "rotating.test", "--selector", "two"]);
  assert.equal(second.code, 0, second.stderr);
  assert.match(second.stdout, /New key, pending/);
  assert.match(second.stdout, /name: {2}two\._domainkey\.rotating\.test/);
  assert.match(second.stdout, /mailctl domain dkim rotating\.test --activate/);
  assert.equal(await signingSelector(), "one", "the msa keeps signing with the published key");

  const shown = await mailctl(["domain", "dkim", "rotating.test", "--show"]);
  assert.match(shown.stdout, /Current \(the msa signs with it\): DKIM ed25519-sha256 key for rotating\.test, selector one/);
  assert.match(shown.stdout, /Pending .*selector two/);

  const reused = await mailctl(["domain", "dkim", "rotating.test", "--selector", "one"]);
  assert.equal(reused.code, 1);
  assert.match(reused.stderr, /selector one is the current key's/);

  const activated = await mailctl(["domain", "dkim", "rotating.test", "--activate"]);
  assert.equal(activated.code, 0, activated.stderr);
  assert.match(activated.stdout, /Activated selector two/);
  assert.match(activated.stdout, /one\._domainkey\.rotating\.test\) published for a few days/);
  assert.equal(await signingSelector(), "two");
  const nothingPending = await mailctl(["domain", "dkim", "rotating.test", "--activate"]);
  assert.equal(nothingPending.code, 1);
  assert.match(nothingPending.stderr, /no pending DKIM key/);

  const urgent = await mailctl(["domain", "dkim", "rotating.test", "--selector", "three", "--now"]);
  assert.equal(urgent.code, 0, urgent.stderr);
  assert.match(urgent.stdout, /New key, signing now/);
  assert.equal(await signingSelector(), "three");
  const mixed = await mailctl(["domain", "dkim", "rotating.test", "--activate", "--selector", "x"]);
  assert.equal(mixed.code, 2);
});

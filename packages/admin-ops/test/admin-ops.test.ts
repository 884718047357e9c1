import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { createDomainDkimKey } from "@mailstack/dkim";
import { addAccount, addDomain, DirectoryError } from "@mailstack/db";
import { acceptMessage } from "@mailstack/queue";
import { createTestDatabase, type TestDatabase } from "@mailstack/testkit";
import { authenticateApiToken, createApiToken, domainDnsRecords, listApiTokens, messageJourney, revokeApiToken } from "../src/index.ts";

let db: TestDatabase;
before(async () => {
  db = await createTestDatabase();
  await addDomain(db.pool, "a.test");
  await addDomain(db.pool, "b.test");
});
after(async () => db?.drop());

test("tokens: random, stored as sha256, scoped, refused once revoked or when malformed", async () => {
  const operator = await createApiToken(db.pool, "ops");
  const tenant = await createApiToken(db.pool, "tenant-a", { domain: "A.TEST" });
  assert.notEqual(operator.token, tenant.token);
  assert.deepEqual(await authenticateApiToken(db.pool, operator.token), { tokenId: operator.row.id, name: "ops", domain: null });
  assert.deepEqual(await authenticateApiToken(db.pool, tenant.token), { tokenId: tenant.row.id, name: "tenant-a", domain: "a.test" });
  assert.equal(await authenticateApiToken(db.pool, `${operator.token}x`), null);
  assert.equal(await authenticateApiToken(db.pool, operator.token.slice(4)), null);
  assert.equal(await authenticateApiToken(db.pool, "mst_" + "A".repeat(300)), null);
  const stored = await db.pool.query("SELECT encode(token_hash, 'hex') AS h FROM api_tokens WHERE name = 'ops'");
  const { createHash } = await import("node:crypto");
  assert.equal(stored.rows[0].h, createHash("sha256").update(operator.token).digest("hex"));
  await assert.rejects(createApiToken(db.pool, "bad name"), DirectoryError);
  await assert.rejects(createApiToken(db.pool, "x", { domain: "none.test" }), /no such domain/);
  await revokeApiToken(db.pool, "ops");
  assert.equal(await authenticateApiToken(db.pool, operator.token), null);
  await assert.rejects(revokeApiToken(db.pool, "ops"), /no such active token/);
  const listed = await listApiTokens(db.pool);
  assert.deepEqual(listed.map((t) => [t.name, t.revoked_at !== null, t.last_used_at !== null]), [["ops", true, true], ["tenant-a", false, true]]);

  // A revoked token's name can be given to a new token; two active tokens cannot share one.
  const again = await createApiToken(db.pool, "ops");
  assert.deepEqual(await authenticateApiToken(db.pool, again.token), { tokenId: again.row.id, name: "ops", domain: null });
  assert.equal(await authenticateApiToken(db.pool, operator.token), null, "the revoked one stays revoked");
  await assert.rejects(createApiToken(db.pool, "ops"), (e: unknown) => e instanceof DirectoryError && e.code === "duplicate");
  await revokeApiToken(db.pool, "ops");
  assert.equal(await authenticateApiToken(db.pool, again.token), null);
});

test("DNS records: MX and SPF always, DKIM from the stored key, DMARC with the chosen policy", async () => {
  const none = await domainDnsRecords(db.pool, "b.test", { mxHost: "mx.example.net.", dmarcPolicy: "none" });
  assert.deepEqual(none.map((r) => `${r.type} ${r.name} ${r.priority ?? ""} ${r.value}`), [
    "MX b.test 10 mx.example.net",
    "TXT b.test  v=spf1 mx -all",
    "TXT _dmarc.b.test  v=DMARC1; p=none; rua=mailto:postmaster@b.test",
  ]);
  const { record } = await createDomainDkimKey(db.pool, "b.test", { selector: "k1", algorithm: "ed25519-sha256" });
  const withKey = await domainDnsRecords(db.pool, "b.test", { mxHost: "mx.example.net" });
  assert.deepEqual(withKey.filter((r) => r.purpose === "dkim"), [{ purpose: "dkim", type: "TXT", name: "k1._domainkey.b.test", value: record.value }]);
  // A rotation: the pending key's record is to be published next to the current one.
  const next = await createDomainDkimKey(db.pool, "b.test", { selector: "k2", algorithm: "ed25519-sha256" });
  const rotating = await domainDnsRecords(db.pool, "b.test", { mxHost: "mx.example.net" });
  assert.deepEqual(rotating.filter((r) => r.purpose === "dkim").map((r) => [r.name, r.value]), [
    ["k1._domainkey.b.test", record.value],
    ["k2._domainkey.b.test", next.record.value],
  ]);
});

test("journey: operator sees all; the sender's tenant sees all; a recipient's tenant sees its own recipients only", async () => {
  const ann = await addAccount(db.pool, { address: "ann@a.test", password: "pw" });
  const bea = await addAccount(db.pool, { address: "bea@b.test", password: "pw" });
  const accepted = await acceptMessage(
    db.pool,
    { raw: Buffer.from("Message-ID: <j@a.test>\r\n\r\nx\r\n"), envelopeFrom: "ann@a.test", source: "submission", messageIdHeader: "<j@a.test>", traceId: "ab".repeat(16) },
    [
      { recipient: "bea@b.test", route: { kind: "local", accountId: bea.id, address: "bea@b.test" } },
      { recipient: "ann@a.test", route: { kind: "local", accountId: ann.id, address: "ann@a.test" } },
      { recipient: "x@remote.test", route: { kind: "remote", address: "x@remote.test", domain: "remote.test" } },
    ],
    "msa",
  );
  const all = await messageJourney(db.pool, { queueId: accepted.queueId }, { jaegerUrl: "http://j:16686/" });
  assert.equal(all[0]!.recipients.length, 3);
  assert.equal(all[0]!.traceUrl, `http://j:16686/trace/${"ab".repeat(16)}`);
  const sender = await messageJourney(db.pool, { messageId: "j@a.test" }, { domain: "a.test" });
  assert.equal(sender[0]!.recipients.length, 3);
  const recipient = await messageJourney(db.pool, { messageId: "<j@a.test>" }, { domain: "b.test" });
  assert.deepEqual(recipient[0]!.recipients.map((r) => r.finalRecipient), ["bea@b.test"]);
  assert.deepEqual(await messageJourney(db.pool, { queueId: accepted.queueId }, { domain: "c.test" }), []);
  assert.deepEqual(await messageJourney(db.pool, {}), []);

  // The limit counts a tenant's own messages: others' copies of the same Message-ID do not crowd it out.
  const copy = (from: string, to: string) => acceptMessage(
    db.pool,
    { raw: Buffer.from("Message-ID: <shared@x.test>\r\n\r\nx\r\n"), envelopeFrom: from, source: "inbound", messageIdHeader: "<shared@x.test>" },
    [{ recipient: to, route: { kind: "remote", address: to, domain: to.split("@")[1]! } }],
    "mta-inbound",
  );
  await copy("z@other.test", "y@other.test");
  await copy("z@other.test", "y@other.test");
  const mine = await copy("z@other.test", "bea@b.test");
  const scoped = await messageJourney(db.pool, { messageId: "shared@x.test" }, { domain: "b.test", limit: 1 });
  assert.deepEqual(scoped.map((m) => m.queueId), [mine.queueId]);
});

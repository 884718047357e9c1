import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { createTestDatabase, type TestDatabase } from "@mailstack/testkit";
import {
  DirectoryCache, addAccount, addAlias, addDomain, removeAlias, resolveRecipient, setAccountDisabled, setAccountPassword,
} from "../src/index.ts";

let db: TestDatabase;
let cache: DirectoryCache;
before(async () => {
  db = await createTestDatabase();
  await addDomain(db.pool, "cache.test");
  await addAccount(db.pool, { address: "dana@cache.test", password: "pw-dana" });
  await addAccount(db.pool, { address: "eli@cache.test", password: "pw-eli" });
  cache = new DirectoryCache(db.pool, { reconnectMs: 50 });
  await cache.start();
});
after(async () => {
  await cache.stop();
  await db.drop();
});

const resolve = (address: string, allowRemote = false) =>
  resolveRecipient(db.pool, address, { allowRemote, lookup: (a) => cache.lookup(a) });

async function until(condition: () => boolean, what: string): Promise<void> {
  const deadline = Date.now() + 5_000;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** Runs a change and waits until its notification emptied the cache. */
async function change(fn: () => Promise<unknown>): Promise<void> {
  const seen = cache.stats.invalidations;
  await fn();
  await until(() => cache.stats.invalidations > seen, "the directory notification");
}

test("a known address is answered from memory after the first lookup", async () => {
  assert.ok(cache.isListening());
  const first = await resolve("dana@cache.test");
  const hits = cache.stats.hits;
  const second = await resolve("dana@cache.test");
  assert.deepEqual(second, first);
  assert.equal(cache.stats.hits, hits + 1);
});

test("disabling an account, adding an alias or a domain reaches the cache at once", async () => {
  await resolve("eli@cache.test");
  await change(() => setAccountDisabled(db.pool, "eli@cache.test", true));
  assert.deepEqual(await resolve("eli@cache.test"), { ok: false, reason: "disabled" });

  assert.deepEqual(await resolve("sales@cache.test"), { ok: false, reason: "unknown-user" });
  await change(() => addAlias(db.pool, "sales@cache.test", ["dana@cache.test"]));
  const viaAlias = await resolve("sales@cache.test");
  assert.ok(viaAlias.ok && viaAlias.routes[0]!.address === "dana@cache.test");
  await resolve("sales@cache.test");
  await change(() => removeAlias(db.pool, "sales@cache.test"));
  assert.deepEqual(await resolve("sales@cache.test"), { ok: false, reason: "unknown-user" });

  const remote = await resolve("fay@later.test", true);
  assert.ok(remote.ok && remote.routes[0]!.kind === "remote");
  await change(() => addDomain(db.pool, "later.test"));
  assert.deepEqual(await resolve("fay@later.test", true), { ok: false, reason: "unknown-user" });
});

test("an unknown user in a served domain is never kept, so a new account is found at once", async () => {
  assert.deepEqual(await resolve("gus@cache.test"), { ok: false, reason: "unknown-user" });
  // No wait for the notification here: the negative answer was not stored.
  await addAccount(db.pool, { address: "gus@cache.test", password: "pw-gus" });
  const found = await resolve("gus@cache.test");
  assert.ok(found.ok && found.routes[0]!.kind === "local");
});

test("quota accounting and password changes do not empty the cache", async () => {
  await resolve("dana@cache.test");
  const seen = cache.stats.invalidations;
  await db.pool.query("UPDATE accounts SET used_bytes = used_bytes + 100 WHERE address = 'dana@cache.test'");
  await setAccountPassword(db.pool, "dana@cache.test", "another-password");
  // A notification would arrive within milliseconds; give it ample time.
  await new Promise((r) => setTimeout(r, 200));
  assert.equal(cache.stats.invalidations, seen);
  const hits = cache.stats.hits;
  await resolve("dana@cache.test");
  assert.equal(cache.stats.hits, hits + 1);
});

test("while the listening connection is lost, lookups go to the database; it listens again", async () => {
  await resolve("dana@cache.test");
  await db.pool.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'mailstack-directory-cache' AND datname = current_database()");
  await until(() => !cache.isListening(), "the connection loss");
  const hits = cache.stats.hits;
  await setAccountDisabled(db.pool, "dana@cache.test", true);
  // No notification can arrive now; the answer must still be current.
  assert.deepEqual(await resolve("dana@cache.test"), { ok: false, reason: "disabled" });
  assert.equal(cache.stats.hits, hits);
  await until(() => cache.isListening(), "listening again");
  await setAccountDisabled(db.pool, "dana@cache.test", false);
  assert.ok((await resolve("dana@cache.test")).ok);
});

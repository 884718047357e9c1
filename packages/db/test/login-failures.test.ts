import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { createTestDatabase, type TestDatabase } from "@mailstack/testkit";
import { addAccount, addDomain, clientAddress, failureIpKey, loginFailures, loginKey, pruneLoginFailures, recordLoginFailure, recordPopLogin } from "../src/index.ts";

let db: TestDatabase;
before(async () => {
  db = await createTestDatabase();
});
after(async () => db.drop());

const WINDOW = 15 * 60_000;

test("one key form for a login name, whichever service counts the failure", () => {
  assert.equal(loginKey("  Alice@Example.TEST "), loginKey("alice@example.test"));
  assert.equal(loginKey("alice@example.test"), "alice@example.test");
  assert.equal(loginKey(" Not An Address "), "not an address");
  assert.equal(loginKey("x".repeat(400)).length, 320);
  assert.equal(loginKey("ali\0ce"), "alice", "PostgreSQL text cannot hold NUL");
  assert.ok(!loginKey("alice\0@example.test").includes("\0"));
});

test("failures count per IP and per login name within the window, then a new window starts", async () => {
  // As POP3 and the MSA each call it: different spellings of one account, one IP.
  await recordLoginFailure(db.pool, "192.0.2.7", "Bob@Example.test", WINDOW);
  await recordLoginFailure(db.pool, "192.0.2.7", "bob@example.test", WINDOW);
  await recordLoginFailure(db.pool, "192.0.2.8", " BOB@EXAMPLE.TEST", WINDOW);
  assert.deepEqual(await loginFailures(db.pool, "192.0.2.7", "bob@example.test", WINDOW), { ip: 2, account: 3 });
  assert.deepEqual(await loginFailures(db.pool, "192.0.2.9", "carol@example.test", WINDOW), { ip: 0, account: 0 });

  // The window ends: nothing counts, and the next failure starts a new window at 1.
  await db.pool.query("UPDATE auth_failures SET window_start = now() - interval '16 minutes'");
  assert.deepEqual(await loginFailures(db.pool, "192.0.2.7", "bob@example.test", WINDOW), { ip: 0, account: 0 });
  await recordLoginFailure(db.pool, "192.0.2.7", "bob@example.test", WINDOW);
  assert.deepEqual(await loginFailures(db.pool, "192.0.2.7", "bob@example.test", WINDOW), { ip: 1, account: 1 });

  // Pruning removes only windows that ended long enough ago, and never one younger than a day
  // (another service may count with a longer window).
  await pruneLoginFailures(db.pool, WINDOW);
  assert.equal((await db.pool.query("SELECT 1 FROM auth_failures")).rowCount, 3, "the 16-minute-old window of 192.0.2.8 is kept for a day");
  await db.pool.query("UPDATE auth_failures SET window_start = now() - interval '25 hours' WHERE window_start < now() - interval '15 minutes'");
  await pruneLoginFailures(db.pool, WINDOW);
  const left = await db.pool.query<{ scope: string; key: string }>("SELECT scope, key FROM auth_failures ORDER BY scope, key");
  assert.deepEqual(left.rows, [{ scope: "account", key: "bob@example.test" }, { scope: "ip", key: "192.0.2.7" }]);
});

test("an IPv6 client is counted by its /64, an IPv4-mapped one as its IPv4 address", async () => {
  assert.equal(failureIpKey("192.0.2.7"), "192.0.2.7");
  assert.equal(failureIpKey("::FFFF:192.0.2.7"), "192.0.2.7");
  assert.equal(failureIpKey("2001:DB8:0001:2:a:b:c:d"), "2001:db8:1:2::/64");
  assert.equal(failureIpKey("2001:db8:1:2::1"), "2001:db8:1:2::/64");
  assert.equal(failureIpKey("2001:db8::1"), "2001:db8:0:0::/64");
  assert.equal(failureIpKey("fe80::1%eth0"), "fe80:0:0:0::/64");
  assert.equal(failureIpKey("64:ff9b::192.0.2.7"), "64:ff9b:0:0::/64");

  // A guesser walking through its /64 reaches the limit as one client; its neighbour /64 does not.
  for (let i = 1; i <= 5; i++) await recordLoginFailure(db.pool, `2001:db8:7:7::${i.toString(16)}`, `user${i}@example.test`, WINDOW);
  assert.equal((await loginFailures(db.pool, "2001:db8:7:7:ffff::9", "x@example.test", WINDOW)).ip, 5);
  assert.equal((await loginFailures(db.pool, "2001:db8:7:8::1", "x@example.test", WINDOW)).ip, 0);

  // The same IPv4 client, whether a listener reports it mapped or not, is one counter.
  await recordLoginFailure(db.pool, "::ffff:198.51.100.4", "y@example.test", WINDOW);
  await recordLoginFailure(db.pool, "198.51.100.4", "y@example.test", WINDOW);
  assert.deepEqual(await loginFailures(db.pool, "198.51.100.4", "y@example.test", WINDOW), { ip: 2, account: 2 });
});

test("a link-local client's zone is dropped where an address meets PostgreSQL's inet (POP-before-SMTP)", async () => {
  assert.equal(clientAddress("fe80::1%eth0"), "fe80::1");
  assert.equal(clientAddress("FE80::A%25"), "fe80::a");
  assert.equal(clientAddress("::ffff:192.0.2.7"), "192.0.2.7");
  assert.equal(clientAddress("2001:db8::1"), "2001:db8::1");

  await addDomain(db.pool, "zone.test");
  const account = await addAccount(db.pool, { address: "zed@zone.test", password: "pw-zed" });
  // POP3 reports the client as node does (with its zone); inet refused that before.
  await recordPopLogin(db.pool, "fe80::1%eth0", account.id);
  await recordPopLogin(db.pool, "::ffff:192.0.2.44", account.id);
  const rows = await db.pool.query<{ ip: string }>("SELECT host(ip) AS ip FROM pop_logins WHERE account_id = $1 ORDER BY ip", [account.id]);
  assert.deepEqual(rows.rows.map((row) => row.ip).sort(), ["192.0.2.44", "fe80::1"]);
  // A second login from the same link-local client (another interface name) updates the one row.
  await recordPopLogin(db.pool, "fe80::1%eth1", account.id);
  assert.equal((await db.pool.query("SELECT 1 FROM pop_logins WHERE ip = 'fe80::1'")).rowCount, 1);
});

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { addAccount, addDomain, recordPopLogin } from "@mailstack/db";
import { createTestDatabase, type TestDatabase } from "@mailstack/testkit";
import { popBeforeSmtpAccounts } from "../src/pop-before-smtp.ts";

// A link-local connection cannot be made over this machine's loopback, so the address a
// listener reports for one ("fe80::1%eth0") is given to the functions directly.
let db: TestDatabase;
before(async () => {
  db = await createTestDatabase();
});
after(async () => db.drop());

test("POP-before-SMTP finds a link-local client's POP3 login whatever zone each listener reports", async () => {
  await addDomain(db.pool, "linklocal.test");
  const account = await addAccount(db.pool, { address: "lin@linklocal.test", password: "pw-lin" });
  await recordPopLogin(db.pool, "fe80::1%eth0", account.id);
  const found = await popBeforeSmtpAccounts(db.pool, "fe80::1%eth0", 600_000);
  assert.deepEqual(found.map((a) => a.address), ["lin@linklocal.test"]);
  assert.deepEqual(await popBeforeSmtpAccounts(db.pool, "fe80::2%eth0", 600_000), []);
  // An IPv4 client seen as IPv4-mapped by one service and plain by the other.
  await recordPopLogin(db.pool, "192.0.2.55", account.id);
  assert.equal((await popBeforeSmtpAccounts(db.pool, "::ffff:192.0.2.55", 600_000)).length, 1);
});

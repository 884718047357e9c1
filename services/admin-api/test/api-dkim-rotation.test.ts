import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { startHarness, type ApiHarness } from "./helpers.ts";

let h: ApiHarness;
before(async () => {
  h = await startHarness({ MAIL_HOSTNAME: "mx.mailstack.test" });
});
after(async () => h?.close());

type DomainView = { dkimSelector: string | null; dkimPendingSelector: string | null; dkimPendingAlgorithm: string | null };
type Answer = { domain: DomainView; dnsRecords: Array<{ purpose: string; name: string; value: string }> };

async function json<T>(response: Response, status: number): Promise<T> {
  const text = await response.text();
  assert.equal(response.status, status, text);
  return JSON.parse(text) as T;
}

const dkimNames = (answer: Answer) => answer.dnsRecords.filter((r) => r.purpose === "dkim").map((r) => r.name);

test("a second DKIM key is pending (both records listed) until POST .../dkim/activate; the first signs at once", async () => {
  await json(await h.call("POST", "/domains", { body: { name: "rotation.test", dkim: { selector: "a1", algorithm: "ed25519-sha256" } } }), 201);
  const staged = await json<Answer>(await h.call("POST", "/domains/rotation.test/dkim", { body: { selector: "b2" } }), 201);
  assert.equal(staged.domain.dkimSelector, "a1", "still signing with the published key");
  assert.equal(staged.domain.dkimPendingSelector, "b2");
  assert.equal(staged.domain.dkimPendingAlgorithm, "rsa-sha256");
  assert.deepEqual(dkimNames(staged), ["a1._domainkey.rotation.test", "b2._domainkey.rotation.test"]);

  const clash = await h.call("POST", "/domains/rotation.test/dkim", { body: { selector: "a1" } });
  assert.equal(clash.status, 409, await clash.text());

  const activated = await json<Answer>(await h.call("POST", "/domains/rotation.test/dkim/activate"), 200);
  assert.equal(activated.domain.dkimSelector, "b2");
  assert.equal(activated.domain.dkimPendingSelector, null);
  assert.deepEqual(dkimNames(activated), ["b2._domainkey.rotation.test"]);
  const stored = await h.db.pool.query("SELECT dkim_selector, dkim_algorithm FROM domains WHERE name = 'rotation.test'");
  assert.deepEqual(stored.rows[0], { dkim_selector: "b2", dkim_algorithm: "rsa-sha256" });

  const nothing = await h.call("POST", "/domains/rotation.test/dkim/activate");
  assert.equal(nothing.status, 404, await nothing.text());
  assert.equal((await h.call("POST", "/domains/unknown.test/dkim/activate")).status, 404);
});

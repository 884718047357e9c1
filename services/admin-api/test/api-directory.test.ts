import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { createPrivateKey, createPublicKey } from "node:crypto";
import { verifyPassword } from "@mailstack/mail";
import { mailctl, startHarness, type ApiHarness } from "./helpers.ts";

let h: ApiHarness;
before(async () => {
  h = await startHarness({ MAIL_HOSTNAME: "mx.mailstack.test", DMARC_POLICY: "reject" });
});
after(async () => h?.close());

type Record_ = { purpose: string; type: string; name: string; value: string; priority?: number };

async function json<T>(response: Response, status: number): Promise<T> {
  const text = await response.text();
  assert.equal(response.status, status, text);
  return (text ? JSON.parse(text) : null) as T;
}

test("domains: create with a DKIM key answers with MX, SPF, DKIM and DMARC records matching the stored key", async () => {
  const created = await json<{ domain: { name: string; dkimSelector: string; dkimAlgorithm: string }; dnsRecords: Record_[] }>(
    await h.call("POST", "/domains", { body: { name: "Example.TEST", dkim: { selector: "s1", algorithm: "rsa-sha256" } } }),
    201,
  );
  assert.equal(created.domain.name, "example.test");
  assert.equal(created.domain.dkimSelector, "s1");
  const byPurpose = Object.fromEntries(created.dnsRecords.map((r) => [r.purpose, r]));
  assert.deepEqual(byPurpose.mx, { purpose: "mx", type: "MX", name: "example.test", value: "mx.mailstack.test", priority: 10 });
  assert.equal(byPurpose.spf!.value, "v=spf1 mx -all");
  assert.equal(byPurpose.dmarc!.name, "_dmarc.example.test");
  assert.match(byPurpose.dmarc!.value, /^v=DMARC1; p=reject;/);
  assert.equal(byPurpose.dkim!.name, "s1._domainkey.example.test");
  const stored = await h.db.pool.query("SELECT dkim_private_key FROM domains WHERE name = 'example.test'");
  const publicDer = createPublicKey(createPrivateKey(stored.rows[0].dkim_private_key)).export({ type: "spki", format: "der" });
  assert.equal(byPurpose.dkim!.value, `v=DKIM1; k=rsa; p=${publicDer.toString("base64")}`);

  const shown = await json<{ dnsRecords: Record_[] }>(await h.call("GET", "/domains/example.test"), 200);
  assert.deepEqual(shown.dnsRecords, created.dnsRecords);
  assert.equal((await h.call("POST", "/domains", { body: { name: "example.test" } })).status, 409);

  const rotated = await json<{ domain: { dkimSelector: string; dkimAlgorithm: string }; dnsRecords: Record_[] }>(
    await h.call("POST", "/domains/example.test/dkim", { body: { selector: "s2", algorithm: "ed25519-sha256", activateNow: true } }),
    201,
  );
  assert.equal(rotated.domain.dkimSelector, "s2");
  assert.equal(rotated.domain.dkimAlgorithm, "ed25519-sha256");
  assert.match(rotated.dnsRecords.find((r) => r.purpose === "dkim")!.value, /^v=DKIM1; k=ed25519; p=[A-Za-z0-9+/]{43}=$/);

  const zone = await mailctl(h.db.url, ["domain", "dns", "example.test", "--mx", "mx.mailstack.test"]);
  assert.equal(zone.code, 0, zone.stderr);
  const lines = zone.stdout.trim().split("\n");
  assert.equal(lines[0], "example.test.\t3600\tIN\tMX\t10 mx.mailstack.test.");
  assert.equal(lines[1], 'example.test.\t3600\tIN\tTXT\t"v=spf1 mx -all"');
  const dkimValue = rotated.dnsRecords.find((r) => r.purpose === "dkim")!.value;
  assert.equal(lines[2], `s2._domainkey.example.test.\t3600\tIN\tTXT\t"${dkimValue}"`);
  assert.match(lines[3]!, /^_dmarc\.example\.test\.\t3600\tIN\tTXT\t"v=DMARC1; p=quarantine; /);

  const plain = await json<{ dnsRecords: Record_[] }>(await h.call("POST", "/domains", { body: { name: "plain.test" } }), 201);
  assert.deepEqual(plain.dnsRecords.map((r) => r.purpose), ["mx", "spf", "dmarc"]);
  const list = await json<{ domains: { name: string }[] }>(await h.call("GET", "/domains"), 200);
  assert.deepEqual(list.domains.map((d) => d.name), ["example.test", "plain.test"]);
  assert.equal((await h.call("GET", "/domains/none.test")).status, 404);
  // Every field of a new key is optional: a POST with no body at all takes the defaults.
  const keyed = await json<{ domain: { dkimSelector: string | null; dkimAlgorithm: string | null } }>(await h.call("POST", "/domains/plain.test/dkim"), 201);
  assert.ok(keyed.domain.dkimSelector);
  assert.equal(keyed.domain.dkimAlgorithm, "rsa-sha256");
});

test("accounts: create, password change, quota, disable/enable, delete; mailctl sees the same directory", async () => {
  const created = await json<Record<string, unknown>>(
    await h.call("POST", "/accounts", { body: { address: "Alice@example.test", password: "first", quotaBytes: 1000 } }),
    201,
  );
  assert.deepEqual(Object.keys(created).sort(), ["address", "createdAt", "disabled", "domain", "quotaBytes", "usedBytes"]);
  assert.equal(created.address, "alice@example.test");
  assert.equal(created.quotaBytes, 1000);
  assert.equal((await h.call("POST", "/accounts", { body: { address: "alice@example.test", password: "x" } })).status, 409);
  assert.equal((await h.call("POST", "/accounts", { body: { address: "bob@unknown.test", password: "x" } })).status, 404);

  await json(await h.call("PATCH", "/accounts/alice@example.test", { body: { password: "second" } }), 200);
  const hash = (await h.db.pool.query("SELECT password_hash FROM accounts WHERE address = 'alice@example.test'")).rows[0].password_hash;
  assert.ok(await verifyPassword("second", hash));
  assert.ok(!(await verifyPassword("first", hash)));

  const unlimited = await json<{ quotaBytes: number | null; disabled: boolean }>(
    await h.call("PATCH", "/accounts/alice@example.test", { body: { quotaBytes: null, disabled: true } }),
    200,
  );
  assert.equal(unlimited.quotaBytes, null);
  assert.equal(unlimited.disabled, true);
  const listed = await mailctl(h.db.url, ["account", "list", "example.test"]);
  assert.match(listed.stdout, /^alice@example\.test\tused 0B of unlimited\tdisabled$/m);
  const enabled = await json<{ disabled: boolean }>(await h.call("PATCH", "/accounts/alice@example.test", { body: { disabled: false } }), 200);
  assert.equal(enabled.disabled, false);
  assert.equal((await h.call("PATCH", "/accounts/alice@example.test", { body: {} })).status, 400);
  // The APOP secret: set, refused when empty, removed with null.
  const apopSecret = async () => (await h.db.pool.query("SELECT apop_secret FROM accounts WHERE address = 'alice@example.test'")).rows[0].apop_secret;
  await json(await h.call("PATCH", "/accounts/alice@example.test", { body: { apopSecret: "tanstaaf" } }), 200);
  assert.equal(await apopSecret(), "tanstaaf");
  const emptySecret = await h.call("PATCH", "/accounts/alice@example.test", { body: { apopSecret: "" } });
  assert.equal(emptySecret.status, 400);
  assert.equal(((await emptySecret.json()) as { field: string }).field, "apopSecret");
  await json(await h.call("PATCH", "/accounts/alice@example.test", { body: { apopSecret: null } }), 200);
  assert.equal(await apopSecret(), null);

  const viaCli = await mailctl(h.db.url, ["account", "add", "carol@example.test", "--password", "pw"]);
  assert.equal(viaCli.code, 0, viaCli.stderr);
  const accounts = await json<{ accounts: { address: string }[] }>(await h.call("GET", "/accounts?domain=example.test"), 200);
  assert.deepEqual(accounts.accounts.map((a) => a.address), ["alice@example.test", "carol@example.test"]);

  assert.equal((await h.call("DELETE", "/accounts/carol@example.test")).status, 204);
  assert.equal((await h.call("GET", "/accounts/carol@example.test")).status, 404);
  assert.equal((await h.call("DELETE", "/accounts/carol@example.test")).status, 404);
});

test("a JSON body is taken with its own types: a wrong type is a 400 naming the field, never converted", async () => {
  await json(await h.call("POST", "/accounts", { body: { address: "typed@example.test", password: "pw", quotaBytes: 5000 } }), 201);
  await json(await h.call("PATCH", "/accounts/typed@example.test", { body: { disabled: true } }), 200);
  const wrong: Array<[Record<string, unknown>, string]> = [
    [{ disabled: null }, "disabled"], // was false: the account enabled
    [{ disabled: "false" }, "disabled"],
    [{ disabled: 0 }, "disabled"],
    [{ quotaBytes: "" }, "quotaBytes"], // was null: unlimited
    [{ quotaBytes: true }, "quotaBytes"], // was 1
    [{ quotaBytes: "100" }, "quotaBytes"],
    [{ password: false }, "password"], // was the password "false"
    [{ password: 12345 }, "password"],
  ];
  for (const [body, field] of wrong) {
    const refused = await h.call("PATCH", "/accounts/typed@example.test", { body });
    const answer = (await refused.json()) as { field?: string };
    assert.equal(refused.status, 400, JSON.stringify(body));
    assert.equal(answer.field, field, JSON.stringify(body));
  }
  const unchanged = await json<{ disabled: boolean; quotaBytes: number | null }>(await h.call("GET", "/accounts/typed@example.test"), 200);
  assert.deepEqual([unchanged.disabled, unchanged.quotaBytes], [true, 5000]);
  const hash = (await h.db.pool.query("SELECT password_hash FROM accounts WHERE address = 'typed@example.test'")).rows[0].password_hash;
  assert.ok(await verifyPassword("pw", hash));
  assert.equal((await h.call("POST", "/aliases", { body: { address: "typed-alias@example.test", targets: "typed@example.test" } })).status, 400);
  assert.equal((await h.call("POST", "/domains", { body: { name: "typed.test", dkim: "false" } })).status, 400);
  // Query strings and path segments are text: their numbers are still read as numbers.
  const page = await json<{ accounts: unknown[] }>(await h.call("GET", "/accounts?domain=example.test&limit=1"), 200);
  assert.equal(page.accounts.length, 1);
  assert.equal((await h.call("DELETE", "/accounts/typed@example.test/filters/999")).status, 404);
  assert.equal((await h.call("DELETE", "/accounts/typed@example.test")).status, 204);
});

test("aliases: create, list, refuse a missing local target, delete; domains in use cannot be removed", async () => {
  const alias = await json<{ address: string; targets: string[] }>(
    await h.call("POST", "/aliases", { body: { address: "info@example.test", targets: ["alice@example.test", "someone@remote.test"] } }),
    201,
  );
  assert.deepEqual(alias.targets, ["alice@example.test", "someone@remote.test"]);
  await json(await h.call("POST", "/aliases", { body: { address: "*@example.test", targets: ["alice@example.test"] } }), 201);
  const refused = await h.call("POST", "/aliases", { body: { address: "x@example.test", targets: ["ghost@example.test"] } });
  assert.equal(refused.status, 404);
  assert.match(((await refused.json()) as { message: string }).message, /ghost@example\.test/);
  const aliases = await json<{ aliases: { address: string }[] }>(await h.call("GET", "/aliases"), 200);
  assert.deepEqual(aliases.aliases.map((a) => a.address).sort(), ["*@example.test", "info@example.test"]);

  assert.equal((await h.call("DELETE", "/domains/example.test")).status, 409);
  assert.equal((await h.call("DELETE", "/aliases/info@example.test")).status, 204);
  assert.equal((await h.call("DELETE", "/aliases/info@example.test")).status, 404);
  assert.equal((await h.call("DELETE", "/domains/plain.test")).status, 204);
  assert.equal((await h.call("GET", "/domains/plain.test")).status, 404);
});

test("filter rules: add, list in order (mailctl sees them too), refuse bad parts by field, delete", async () => {
  const first = await json<{ id: number; position: number; action: { kind: string; folder: string } }>(
    await h.call("POST", "/accounts/alice@example.test/filters", {
      body: { condition: { kind: "header", header: "List-Id", op: "contains", value: "announce" }, action: { kind: "fileinto", folder: "Lists" } },
    }),
    201,
  );
  assert.equal(first.position, 0);
  assert.deepEqual(first.action, { kind: "fileinto", folder: "Lists", to: null, keepCopy: false });
  const second = await json<{ id: number; condition: { kind: string; bytes: number } }>(
    await h.call("POST", "/accounts/alice@example.test/filters", {
      body: { condition: { kind: "size", op: "over", bytes: 1048576 }, action: { kind: "forward", to: "big@remote.test", keepCopy: true } },
    }),
    201,
  );
  assert.equal(second.condition.bytes, 1048576);
  const listed = await json<{ rules: { id: number }[] }>(await h.call("GET", "/accounts/alice@example.test/filters"), 200);
  assert.deepEqual(listed.rules.map((r) => r.id), [first.id, second.id]);
  const cli = await mailctl(h.db.url, ["filter", "list", "alice@example.test"]);
  assert.equal(cli.code, 0, cli.stderr);
  assert.match(cli.stdout, new RegExp(`^#${first.id}\\t0\\tif header list-id contains "announce" then fileinto "Lists"$`, "m"));

  const noValue = await h.call("POST", "/accounts/alice@example.test/filters", {
    body: { condition: { kind: "header", header: "Subject", op: "is" }, action: { kind: "discard" } },
  });
  assert.equal(noValue.status, 400);
  assert.equal(((await noValue.json()) as { field: string }).field, "condition.value");
  const badHeader = await h.call("POST", "/accounts/alice@example.test/filters", {
    body: { condition: { kind: "header", header: "Bad:Name", op: "exists" }, action: { kind: "discard" } },
  });
  assert.equal(badHeader.status, 400);
  assert.equal(((await badHeader.json()) as { field: string }).field, "condition.header");
  const badAction = await h.call("POST", "/accounts/alice@example.test/filters", {
    body: { condition: { kind: "size", op: "under", bytes: 10 }, action: { kind: "bounce" } },
  });
  assert.equal(badAction.status, 400);
  assert.equal(((await badAction.json()) as { field: string }).field, "action.kind");
  // A folder name is also a path in mailbox exports: none that would climb out of one.
  for (const folder of ["../../escape", "Lists/../..", "./x", "a//b", "/abs", "back\\slash"]) {
    const badFolder = await h.call("POST", "/accounts/alice@example.test/filters", {
      body: { condition: { kind: "header", header: "X-Test", op: "exists" }, action: { kind: "fileinto", folder } },
    });
    assert.equal(badFolder.status, 400, folder);
    assert.equal(((await badFolder.json()) as { field: string }).field, "action.folder", folder);
  }
  const cliFolder = await mailctl(h.db.url, ["filter", "add", "alice@example.test", "--header", "X-Test", "--exists", "--fileinto", "../escape"]);
  assert.equal(cliFolder.code, 1, cliFolder.stdout);

  assert.equal((await h.call("DELETE", `/accounts/alice@example.test/filters/${first.id}`)).status, 204);
  assert.equal((await h.call("DELETE", `/accounts/alice@example.test/filters/${first.id}`)).status, 404);
  const left = await json<{ rules: { id: number }[] }>(await h.call("GET", "/accounts/alice@example.test/filters"), 200);
  assert.deepEqual(left.rules.map((r) => r.id), [second.id]);
});

test("lists come a page at a time: limit, after and next walk every object once, even when objects change between pages", async () => {
  for (const name of ["pages.test", "pages2.test"]) assert.equal((await h.call("POST", "/domains", { body: { name } })).status, 201);
  const names = ["ann", "bea", "cai", "dan", "eve", "ünï"];
  for (const name of names) assert.equal((await h.call("POST", "/accounts", { body: { address: `${name}@pages.test`, password: "pw" } })).status, 201);
  type Page = { accounts: { address: string }[]; next: string | null };
  const walk = async (limit: number, between?: (page: number) => Promise<void>) => {
    const seen: string[] = [];
    let after: string | null = null;
    for (let n = 0; n < 20; n++) {
      const query: string = `/accounts?domain=pages.test&limit=${limit}${after ? `&after=${encodeURIComponent(after)}` : ""}`;
      const body: Page = await json<Page>(await h.call("GET", query), 200);
      assert.ok(body.accounts.length <= limit);
      seen.push(...body.accounts.map((a) => a.address));
      await between?.(n);
      if (body.next === null) return seen;
      assert.equal(body.next, body.accounts.at(-1)!.address);
      after = body.next;
    }
    throw new Error("pagination did not end");
  };
  assert.deepEqual(await walk(2), names.map((n) => `${n}@pages.test`));
  assert.deepEqual(await walk(100), names.map((n) => `${n}@pages.test`));
  // An account removed behind the cursor and one added ahead of it: nothing is skipped or repeated.
  const changed = await walk(2, async (n) => {
    if (n === 0) {
      assert.equal((await h.call("DELETE", "/accounts/ann@pages.test")).status, 204);
      assert.equal((await h.call("POST", "/accounts", { body: { address: "fay@pages.test", password: "pw" } })).status, 201);
    }
  });
  assert.deepEqual(changed, ["ann", "bea", "cai", "dan", "eve", "fay", "ünï"].map((n) => `${n}@pages.test`));
  // The same for domains and aliases; a bad limit is a 400 naming it.
  const domains = await json<{ domains: { name: string }[]; next: string | null }>(await h.call("GET", "/domains?limit=1"), 200);
  assert.equal(domains.domains.length, 1);
  assert.equal(domains.next, domains.domains[0]!.name);
  const aliases = await json<{ aliases: unknown[]; next: string | null }>(await h.call("GET", "/aliases?domain=pages.test&limit=5"), 200);
  assert.deepEqual(aliases, { aliases: [], next: null });
  const bad = await h.call("GET", "/accounts?limit=0");
  assert.equal(bad.status, 400);
  assert.equal(((await bad.json()) as { field: string }).field, "limit");
});

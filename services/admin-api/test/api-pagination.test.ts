import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { createApiToken } from "@mailstack/admin-ops";
import { analyzeTableScans } from "@mailstack/testkit";
import { mailctl, startHarness, watchQueries, type ApiHarness } from "./helpers.ts";

// Long lists walked through the real API with small pages: every object once, in order, and the
// API never reads more than a page (plus one row) from PostgreSQL.

let h: ApiHarness;
before(async () => {
  h = await startHarness();
});
after(async () => h?.close());

/** The documented order of keys: by the bytes of their UTF-8 form (PostgreSQL's "C" collation). */
function byBytes(keys: string[]): string[] {
  return [...keys].sort((a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b)));
}

// Local parts whose order differs between collations ("a-1" < "a.1" < "a1" < "a_1" in C, not in
// en_US) and between UTF-16 and UTF-8 (U+FF41 sorts before U+1F600 by code point, after it by
// UTF-16 code unit).
const PREFIXES = ["a", "a-", "a.", "a_", "b", "z", "ü", "é", "\u{FF41}", "\u{1F600}", "0", "~"];

async function insertDomain(name: string): Promise<number> {
  return (await h.db.pool.query("INSERT INTO domains (name) VALUES ($1) RETURNING id", [name])).rows[0].id;
}

/** Accounts or aliases straight into the tables: hashing hundreds of passwords would only slow the test. */
async function insertAddresses(table: "accounts" | "aliases", domain: string, count: number): Promise<string[]> {
  const domainId = (await h.db.pool.query("SELECT id FROM domains WHERE name = $1", [domain])).rows[0].id;
  const locals = Array.from({ length: count }, (_, i) => `${PREFIXES[i % PREFIXES.length]}${i}`);
  const extra = table === "accounts" ? "password_hash" : "targets";
  await h.db.pool.query(
    `INSERT INTO ${table} (domain_id, local_part, address, ${extra})
      SELECT $1, l, l || '@' || $2, ${table === "accounts" ? "'x'" : "ARRAY['remote@elsewhere.test']"} FROM unnest($3::text[]) l`,
    [domainId, domain, locals],
  );
  return locals.map((l) => `${l}@${domain}`);
}

interface Walked<K> {
  keys: K[];
  pages: number;
  /** The most rows any one query returned while the pages were read. */
  mostRowsRead: number;
}

/** Follows `next` from the first page to the last. */
async function walk<K extends string | number>(path: string, list: string, key: string, options: { token?: string } = {}): Promise<Walked<K>> {
  const keys: K[] = [];
  let cursor: K | null = null;
  let mostRowsRead = 0;
  for (let pages = 1; pages < 1000; pages++) {
    const limit = Number(new URL(path, "http://x").searchParams.get("limit"));
    const url: string = cursor === null ? path : `${path}&after=${encodeURIComponent(String(cursor))}`;
    let body: Record<string, unknown> = {};
    const queries = await watchQueries(h.db.pool, async () => {
      const response = await h.call("GET", url, options);
      const text = await response.text();
      assert.equal(response.status, 200, `${url}: ${text}`);
      body = JSON.parse(text) as Record<string, unknown>;
    });
    mostRowsRead = Math.max(mostRowsRead, ...queries.map((q) => q.rows));
    const items = body[list] as Record<string, K>[];
    const next = body.next as K | null;
    assert.ok(items.length <= limit, `${url}: ${items.length} items for limit ${limit}`);
    keys.push(...items.map((item) => item[key]!));
    if (next === null) return { keys, pages, mostRowsRead };
    assert.equal(next, items.at(-1)![key], "next is the key of the page's last item");
    cursor = next;
  }
  throw new Error(`${path}: pagination did not end`);
}

test("accounts, aliases and domains: hundreds of rows walked with small pages, each once and in order, a page read at a time", async () => {
  await insertDomain("many.test");
  await insertDomain("few.test");
  const many = await insertAddresses("accounts", "many.test", 300);
  const few = await insertAddresses("accounts", "few.test", 20);
  const aliases = await insertAddresses("aliases", "many.test", 200);
  await insertAddresses("aliases", "few.test", 10);
  for (let i = 0; i < 250; i++) await insertDomain(`${PREFIXES[i % 9]!.replace(/[^a-z0-9-]/g, "x")}${i}.d.test`);
  const allDomains = (await h.db.pool.query<{ name: string }>("SELECT name FROM domains")).rows.map((r) => r.name);

  const accounts = await walk<string>("/accounts?domain=many.test&limit=7", "accounts", "address");
  assert.deepEqual(accounts.keys, byBytes(many));
  assert.equal(accounts.pages, Math.ceil(300 / 7));
  assert.ok(accounts.mostRowsRead <= 8, `a page read ${accounts.mostRowsRead} rows`);

  const everyAccount = await walk<string>("/accounts?limit=13", "accounts", "address");
  assert.deepEqual(everyAccount.keys, byBytes([...many, ...few]));
  assert.ok(everyAccount.mostRowsRead <= 14, `a page read ${everyAccount.mostRowsRead} rows`);

  const manyAliases = await walk<string>("/aliases?domain=many.test&limit=9", "aliases", "address");
  assert.deepEqual(manyAliases.keys, byBytes(aliases));
  assert.ok(manyAliases.mostRowsRead <= 10, `a page read ${manyAliases.mostRowsRead} rows`);

  const domains = await walk<string>("/domains?limit=11", "domains", "name");
  assert.deepEqual(domains.keys, byBytes(allDomains));
  assert.ok(domains.mostRowsRead <= 12, `a page read ${domains.mostRowsRead} rows`);

  // A page that ends exactly at the last row says so: next is null, not a cursor to an empty page.
  const exact = await walk<string>("/accounts?domain=few.test&limit=10", "accounts", "address");
  assert.deepEqual(exact.keys, byBytes(few));
  assert.equal(exact.pages, 2);

  // After the last key (or past every possible one): an empty page and next null.
  const last = byBytes(many).at(-1)!;
  for (const after of [last, "\u{10FFFF}"]) {
    const response = await h.call("GET", `/accounts?domain=many.test&limit=5&after=${encodeURIComponent(after)}`);
    assert.deepEqual(await response.json(), { accounts: [], next: null });
  }
  const noAliases = await h.call("GET", `/aliases?limit=5&after=${encodeURIComponent("\u{10FFFF}")}`);
  assert.deepEqual(await noAliases.json(), { aliases: [], next: null });
  // A cursor that is no key at all (removed meanwhile) still starts right after where it would sort.
  const between = await h.call("GET", "/accounts?domain=many.test&limit=2&after=a-0%40zzz");
  const betweenBody = (await between.json()) as { accounts: { address: string }[] };
  assert.deepEqual(betweenBody.accounts.map((a) => a.address), byBytes(many).filter((a) => Buffer.compare(Buffer.from(a), Buffer.from("a-0@zzz")) > 0).slice(0, 2));

  // A tenant pages through its own domain only.
  const { token } = await createApiToken(h.db.pool, "few-admin", { domain: "few.test" });
  const tenantDomains = await walk<string>("/domains?limit=1", "domains", "name", { token });
  assert.deepEqual(tenantDomains.keys, ["few.test"]);
  const tenantAccounts = await walk<string>("/accounts?limit=3", "accounts", "address", { token });
  assert.deepEqual(tenantAccounts.keys, byBytes(few));
  const pastTenant = await h.call("GET", "/domains?limit=5&after=few.test", { token });
  assert.deepEqual(await pastTenant.json(), { domains: [], next: null });
});

test("mailctl lists every account of a long list, in the same order, whatever the page size", async () => {
  await insertDomain("cli.test");
  const addresses = await insertAddresses("accounts", "cli.test", 2345);
  const listed = await mailctl(h.db.url, ["account", "list", "cli.test"]);
  assert.equal(listed.code, 0, listed.stderr);
  assert.deepEqual(listed.stdout.trim().split("\n").map((line) => line.split("\t")[0]), byBytes(addresses));
});

const STATES = ["queued", "deferred", "delivered", "bounced", "cancelled"];
const DOMAINS = ["a.test", "b.test", "c.test"];

/** count deliveries, one per message; the state and remote domain of the i-th come from `pick`. */
async function insertDeliveries(prefix: string, count: number, pick: (i: number) => { state: string; domain: string }): Promise<void> {
  const picked = Array.from({ length: count }, (_, i) => pick(i));
  await h.db.pool.query(
    `WITH m AS (
       INSERT INTO messages (queue_id, raw, size, envelope_from, source)
       SELECT $1 || i, '\\x00'::bytea, 1, 'sender@local.test', 'submission' FROM generate_series(1, $2::int) i RETURNING id, queue_id)
     INSERT INTO deliveries (message_id, recipient, final_recipient, kind, remote_domain, state, attempts)
     SELECT m.id, 'r' || p.i || '@' || p.domain, 'r' || p.i || '@' || p.domain, 'remote', p.domain, p.state, 0
       FROM unnest($3::text[], $4::text[]) WITH ORDINALITY AS p(state, domain, i)
       JOIN m ON m.queue_id = $1 || p.i
      ORDER BY p.i`,
    [prefix, count, picked.map((p) => p.state), picked.map((p) => p.domain)],
  );
}

async function idsWhere(where: string, values: unknown[] = []): Promise<number[]> {
  return (await h.db.pool.query<{ id: number }>(`SELECT id FROM deliveries WHERE ${where} ORDER BY id`, values)).rows.map((r) => r.id);
}

test("the queue: hundreds of deliveries walked by id with small pages, with and without filters; mailctl walks it too", async () => {
  await insertDeliveries("QPAGE", 400, (i) => ({ state: STATES[i % STATES.length]!, domain: DOMAINS[i % DOMAINS.length]! }));

  const waiting = await walk<number>("/queue?limit=7", "entries", "id");
  assert.deepEqual(waiting.keys, await idsWhere("state IN ('queued', 'deferred')"));
  assert.ok(waiting.keys.length >= 150);
  assert.ok(waiting.mostRowsRead <= 8, `a page read ${waiting.mostRowsRead} rows`);

  const deferredB = await walk<number>("/queue?state=deferred&domain=B.test&limit=5", "entries", "id");
  assert.deepEqual(deferredB.keys, await idsWhere("state = 'deferred' AND remote_domain = 'b.test'"));
  assert.ok(deferredB.keys.length > 20);
  const delivered = await walk<number>("/queue?state=delivered&limit=9", "entries", "id");
  assert.deepEqual(delivered.keys, await idsWhere("state = 'delivered'"));

  // Past the last id: an empty page and next null; a cursor in the middle starts right after it.
  const last = waiting.keys.at(-1)!;
  assert.deepEqual(await (await h.call("GET", `/queue?after=${last}`)).json(), { entries: [], next: null });
  const middle = waiting.keys[50]!;
  const rest = (await (await h.call("GET", `/queue?after=${middle - 1}&limit=3`)).json()) as { entries: { id: number }[]; next: number };
  assert.deepEqual(rest.entries.map((e) => e.id), waiting.keys.slice(50, 53));
  assert.equal(rest.next, waiting.keys[52]);
  for (const bad of ["after=-1", "after=x", "limit=10001", "after=9007199254740992"]) {
    const response = await h.call("GET", `/queue?${bad}`);
    assert.equal(response.status, 400, bad);
    assert.equal(((await response.json()) as { field: string }).field, bad.split("=")[0], bad);
  }

  // mailctl: --limit and --after walk the same pages; a full page says how to get the next one.
  const cli: number[] = [];
  let cursor: string | null = null;
  for (let n = 0; n < 100; n++) {
    const run = await mailctl(h.db.url, ["queue", "list", "--state", "deferred", "--domain", "b.test", "--limit", "15", ...(cursor ? ["--after", cursor] : [])]);
    assert.equal(run.code, 0, run.stderr);
    const lines = run.stdout.trim().split("\n");
    const more = /^more entries: add --after (\d+)$/.exec(lines.at(-1)!);
    cli.push(...lines.filter((line) => /^\d+\t/.test(line)).map((line) => Number(line.split("\t")[0])));
    if (!more) break;
    cursor = more[1]!;
  }
  assert.deepEqual(cli, deferredB.keys);
});

test("a queue page reads about a page of deliveries (EXPLAIN ANALYZE), however many finished ones the table holds", async () => {
  // 20,000 deliveries, one in fifty still waiting: the primary key in id order would walk past
  // about fifty finished rows for each waiting one.
  await insertDeliveries("QBIG", 20_000, (i) => ({ state: i % 50 === 0 ? STATES[i % 100 === 0 ? 0 : 1]! : "delivered", domain: DOMAINS[i % 3]! }));
  await h.db.pool.query("ANALYZE deliveries");
  await h.db.pool.query("ANALYZE messages");
  const waiting = await idsWhere("state IN ('queued', 'deferred')");
  const middle = waiting[Math.floor(waiting.length / 2)]!;
  const limit = 25;
  for (const filter of ["", "&state=deferred"]) {
    const queries = await watchQueries(h.db.pool, async () => {
      assert.equal((await h.call("GET", `/queue?limit=${limit}&after=${middle}${filter}`)).status, 200);
    });
    const page = queries.find((q) => q.text.includes("FROM deliveries"))!;
    const scanned = await analyzeTableScans(h.db.pool, page, "deliveries");
    assert.ok(!scanned.scans.includes("Seq Scan"), `no sequential scan of deliveries: ${scanned.scans.join(", ")}`);
    // At most limit + 1 rows from each state's range of the index.
    const states = filter ? 1 : 2;
    assert.ok(scanned.rows <= states * (limit + 1), `${filter || "waiting"}: the page scanned ${scanned.rows} delivery rows (${waiting.length} waiting, 20,000+ in all)`);
  }
});

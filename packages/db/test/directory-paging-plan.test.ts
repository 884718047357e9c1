// A page of a directory list is read through an index in the order it is returned (byte order,
// COLLATE "C"), not by reading and sorting the whole table: checked on the real plans.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { createTestDatabase, type TestDatabase } from "@mailstack/testkit";
import { addDomain, pageAccounts, pageAliases, pageDomains, type Queryable } from "../src/index.ts";

let db: TestDatabase;
before(async () => {
  db = await createTestDatabase();
  await addDomain(db.pool, "big.test");
  await addDomain(db.pool, "small.test");
  await db.pool.query(
    `INSERT INTO domains (name) SELECT 'd' || g || '.test' FROM generate_series(1, 3000) g`,
  );
  await db.pool.query(
    `INSERT INTO accounts (domain_id, local_part, address, password_hash)
     SELECT d.id, 'user' || g, 'user' || g || '@' || d.name, 'x'
       FROM generate_series(1, 20000) g, domains d WHERE d.name IN ('big.test', 'small.test') AND (d.name = 'big.test' OR g <= 50)`,
  );
  await db.pool.query(
    `INSERT INTO aliases (domain_id, local_part, address, targets)
     SELECT d.id, 'list' || g, 'list' || g || '@' || d.name, ARRAY['user1@big.test']
       FROM generate_series(1, 5000) g, domains d WHERE d.name = 'big.test'`,
  );
  await db.pool.query("ANALYZE domains; ANALYZE accounts; ANALYZE aliases");
});
after(async () => db.drop());

type PlanNode = { "Node Type": string; "Index Name"?: string; "Relation Name"?: string; Plans?: PlanNode[] };

/** Runs `page` against a recorder, then EXPLAINs the statement it sent. */
async function planOf(page: (db: Queryable) => Promise<unknown>, table: string): Promise<PlanNode[]> {
  const sent: Array<{ text: string; values: unknown[] }> = [];
  const recorder = {
    query: (text: string, values: unknown[] = []) => {
      if (text.includes(`FROM ${table}`)) sent.push({ text, values });
      return db.pool.query(text, values);
    },
  } as unknown as Queryable;
  await page(recorder);
  const statement = sent.at(-1);
  assert.ok(statement, `a query on ${table} was sent`);
  const result = await db.pool.query(`EXPLAIN (FORMAT JSON) ${statement.text}`, statement.values);
  const nodes: PlanNode[] = [];
  const walk = (node: PlanNode) => {
    nodes.push(node);
    for (const child of node.Plans ?? []) walk(child);
  };
  walk(result.rows[0]["QUERY PLAN"][0].Plan);
  return nodes;
}

function assertIndexOrdered(nodes: PlanNode[], table: string, index: string): void {
  const summary = nodes.map((n) => `${n["Node Type"]}${n["Index Name"] ? `(${n["Index Name"]})` : n["Relation Name"] ? `(${n["Relation Name"]})` : ""}`).join(" > ");
  assert.ok(nodes.some((n) => n["Index Name"] === index), `${table} read through ${index}: ${summary}`);
  assert.ok(!nodes.some((n) => n["Node Type"] === "Sort" || n["Node Type"] === "Incremental Sort"), `no sort: ${summary}`);
  assert.ok(!nodes.some((n) => n["Node Type"] === "Seq Scan" && n["Relation Name"] === table), `no sequential scan of ${table}: ${summary}`);
}

test("a page of accounts, of one domain's accounts, of aliases and of domains is an index range in key order", async () => {
  assertIndexOrdered(await planOf((q) => pageAccounts(q, { limit: 100, after: "user500@big.test" }), "accounts"), "accounts", "accounts_address_c");
  assertIndexOrdered(await planOf((q) => pageAccounts(q, { limit: 100, after: "user500@big.test" }, "big.test"), "accounts"), "accounts", "accounts_domain_address_c");
  assertIndexOrdered(await planOf((q) => pageAliases(q, { limit: 100 }, "big.test"), "aliases"), "aliases", "aliases_domain_address_c");
  assertIndexOrdered(await planOf((q) => pageDomains(q, { limit: 100, after: "d1500.test" }), "domains"), "domains", "domains_name_c");
});

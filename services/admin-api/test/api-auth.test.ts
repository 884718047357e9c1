import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { mailctl, startHarness, type ApiHarness } from "./helpers.ts";

let h: ApiHarness;
before(async () => {
  h = await startHarness();
});
after(async () => h?.close());

/** Every operation in the OpenAPI document, with path parameters filled in. */
async function allOperations(): Promise<{ method: string; path: string }[]> {
  const response = await h.call("GET", "/docs/json", { token: null });
  assert.equal(response.status, 200);
  const doc = (await response.json()) as { paths: Record<string, Record<string, unknown>> };
  const operations = [];
  for (const [path, methods] of Object.entries(doc.paths)) {
    for (const method of Object.keys(methods)) {
      operations.push({ method: method.toUpperCase(), path: path.replace(/\{[^}]+\}/g, "x@example.test") });
    }
  }
  return operations;
}

test("the OpenAPI document lists the route groups with bearer security", async () => {
  const response = await h.call("GET", "/docs/json", { token: null });
  const doc = (await response.json()) as { paths: Record<string, unknown>; components: { securitySchemes: Record<string, unknown> } };
  for (const path of ["/domains", "/domains/{name}", "/accounts", "/accounts/{address}", "/aliases", "/journey", "/accounts/{address}/export", "/accounts/{address}/import"]) {
    assert.ok(doc.paths[path], `${path} documented`);
  }
  assert.ok(doc.components.securitySchemes.bearer);
  const ui = await h.call("GET", "/docs", { token: null });
  assert.ok(ui.status === 200 || ui.status === 302, `swagger ui answers (${ui.status})`);
});

test("every documented route refuses anonymous access and unknown tokens with 401", async () => {
  const operations = await allOperations();
  assert.ok(operations.length >= 15, `found ${operations.length} operations`);
  for (const { method, path } of operations) {
    const anonymous = await h.call(method, path, { token: null, body: method === "GET" || method === "DELETE" ? undefined : {} });
    assert.equal(anonymous.status, 401, `${method} ${path} anonymous`);
    const body = (await anonymous.json()) as { message: string };
    assert.match(body.message, /bearer token is required/);
    assert.match(anonymous.headers.get("www-authenticate") ?? "", /^Bearer/);
    const forged = await h.call(method, path, { token: "mst_forged-token-value", body: method === "GET" || method === "DELETE" ? undefined : {} });
    assert.equal(forged.status, 401, `${method} ${path} forged token`);
  }
  // Not a Bearer scheme at all.
  const basic = await fetch(`${h.api.url}/domains`, { headers: { authorization: "Basic YTpi" } });
  assert.equal(basic.status, 401);
});

test("a token made by mailctl works, is stored hashed, is listed, and stops working once revoked", async () => {
  const created = await mailctl(h.db.url, ["token", "create", "ci-bot"]);
  assert.equal(created.code, 0, created.stderr);
  const token = created.stdout.trim().split("\n").at(-1)!;
  assert.match(token, /^mst_[A-Za-z0-9_-]{43}$/);
  const stored = await h.db.pool.query("SELECT token_hash FROM api_tokens WHERE name = 'ci-bot'");
  assert.equal(stored.rows[0].token_hash.length, 32);
  assert.ok(!stored.rows[0].token_hash.toString("latin1").includes(token));

  assert.equal((await h.call("GET", "/domains", { token })).status, 200);
  const listed = await mailctl(h.db.url, ["token", "list"]);
  assert.match(listed.stdout, /^ci-bot\toperator\tcreated \S+\tlast used \S+$/m);
  assert.ok(!listed.stdout.includes(token), "list never shows a token");

  const duplicate = await mailctl(h.db.url, ["token", "create", "ci-bot"]);
  assert.equal(duplicate.code, 1);
  assert.match(duplicate.stderr, /already exists/);

  const revoked = await mailctl(h.db.url, ["token", "revoke", "ci-bot"]);
  assert.equal(revoked.code, 0, revoked.stderr);
  const refused = await h.call("GET", "/domains", { token });
  assert.equal(refused.status, 401);
  assert.match(((await refused.json()) as { message: string }).message, /invalid or revoked/);
  assert.match((await mailctl(h.db.url, ["token", "list"])).stdout, /^ci-bot\t.*\trevoked /m);
});

test("validation errors are 400 and name the field", async () => {
  const missing = await h.call("POST", "/accounts", { body: { password: "x" } });
  assert.equal(missing.status, 400);
  assert.equal(((await missing.json()) as { field: string }).field, "address");

  const badType = await h.call("POST", "/accounts", { body: { address: "a@example.test", password: "x", quotaBytes: "lots" } });
  assert.equal(badType.status, 400);
  assert.equal(((await badType.json()) as { field: string }).field, "quotaBytes");

  const unknown = await h.call("POST", "/domains", { body: { name: "example.test", colour: "blue" } });
  assert.equal(unknown.status, 400);
  const unknownBody = (await unknown.json()) as { field: string; message: string };
  assert.equal(unknownBody.field, "colour");
  assert.match(unknownBody.message, /colour is not a known field/);

  const badQuery = await h.call("GET", "/accounts/a@example.test/export?format=zip");
  assert.equal(badQuery.status, 400);
  assert.equal(((await badQuery.json()) as { field: string }).field, "format");

  const badDomain = await h.call("POST", "/domains", { body: { name: "no_dots" } });
  assert.equal(badDomain.status, 400);
  assert.equal(((await badDomain.json()) as { field: string }).field, "name");

  const nested = await h.call("POST", "/aliases", { body: { address: "a@example.test", targets: ["ok@example.test", "not an address"] } });
  assert.equal(nested.status, 400);
  assert.equal(((await nested.json()) as { field: string }).field, "targets.1");

  const journey = await h.call("GET", "/journey");
  assert.equal(journey.status, 400);
  assert.equal(((await journey.json()) as { field: string }).field, "queueId");
});

test("a tenant token sees and changes only its own domain; other tenants look like nothing", async () => {
  for (const name of ["one.test", "two.test"]) assert.equal((await h.call("POST", "/domains", { body: { name } })).status, 201);
  assert.equal((await h.call("POST", "/accounts", { body: { address: "a@one.test", password: "pw" } })).status, 201);
  assert.equal((await h.call("POST", "/accounts", { body: { address: "b@two.test", password: "pw" } })).status, 201);
  const created = await mailctl(h.db.url, ["token", "create", "tenant-one", "--domain", "one.test"]);
  assert.equal(created.code, 0, created.stderr);
  const token = created.stdout.trim().split("\n").at(-1)!;

  const domains = (await (await h.call("GET", "/domains", { token })).json()) as { domains: { name: string }[] };
  assert.deepEqual(domains.domains.map((d) => d.name), ["one.test"]);
  const accounts = (await (await h.call("GET", "/accounts", { token })).json()) as { accounts: { address: string }[] };
  assert.deepEqual(accounts.accounts.map((a) => a.address), ["a@one.test"]);

  // Someone else's objects answer exactly like missing ones.
  const other = await h.call("GET", "/accounts/b@two.test", { token });
  const missing = await h.call("GET", "/accounts/nobody@one.test", { token });
  assert.equal(other.status, 404);
  assert.equal(missing.status, 404);
  assert.equal((await h.call("GET", "/domains/two.test", { token })).status, 404);
  assert.equal((await h.call("GET", "/accounts?domain=two.test", { token })).status, 404);
  assert.equal((await h.call("DELETE", "/accounts/b@two.test", { token })).status, 404);
  assert.equal((await h.call("POST", "/accounts", { token, body: { address: "c@two.test", password: "pw" } })).status, 404);
  assert.equal((await h.call("GET", "/accounts/b@two.test/export?format=mbox", { token })).status, 404);
  // Aliases may not reach into another tenant's domain, whether or not the address exists there.
  const probeExisting = await h.call("POST", "/aliases", { token, body: { address: "p@one.test", targets: ["b@two.test"] } });
  const probeMissing = await h.call("POST", "/aliases", { token, body: { address: "p@one.test", targets: ["nobody@two.test"] } });
  assert.equal(probeExisting.status, 403);
  assert.equal(probeMissing.status, 403);
  assert.equal(((await probeMissing.json()) as { field: string }).field, "targets.0");
  assert.equal((await h.call("POST", "/aliases", { token, body: { address: "p@one.test", targets: ["a@one.test", "x@remote.test"] } })).status, 201);
  // Operator-only actions.
  assert.equal((await h.call("POST", "/domains", { token, body: { name: "three.test" } })).status, 403);
  assert.equal((await h.call("DELETE", "/domains/one.test", { token })).status, 403);
  // Its own domain works.
  const patched = await h.call("PATCH", "/accounts/a@one.test", { token, body: { disabled: true } });
  assert.equal(patched.status, 200);
  assert.equal(((await patched.json()) as { disabled: boolean }).disabled, true);
  const row = await h.db.pool.query("SELECT disabled FROM accounts WHERE address = 'b@two.test'");
  assert.equal(row.rows[0].disabled, false);
});

test("removing a domain revokes its tenant tokens: adding the domain back does not bring them back to life", async () => {
  assert.equal((await h.call("POST", "/domains", { body: { name: "moved.test" } })).status, 201);
  const created = await mailctl(h.db.url, ["token", "create", "tenant-moved", "--domain", "moved.test"]);
  assert.equal(created.code, 0, created.stderr);
  const token = created.stdout.trim().split("\n").at(-1)!;
  assert.equal((await h.call("GET", "/domains/moved.test", { token })).status, 200);
  assert.equal((await h.call("DELETE", "/domains/moved.test")).status, 204);
  assert.equal((await h.call("GET", "/domains", { token })).status, 401);
  assert.match((await mailctl(h.db.url, ["token", "list"])).stdout, /^tenant-moved\tdomain=moved\.test\t.*\trevoked /m);
  // The domain comes back, for a new tenant: the old token stays out.
  assert.equal((await h.call("POST", "/domains", { body: { name: "moved.test" } })).status, 201);
  assert.equal((await h.call("GET", "/domains/moved.test", { token })).status, 401);
  assert.equal((await h.call("POST", "/accounts", { token, body: { address: "x@moved.test", password: "pw" } })).status, 401);
  // mailctl's domain remove is the same operation.
  const again = await mailctl(h.db.url, ["token", "create", "tenant-moved-2", "--domain", "moved.test"]);
  const second = again.stdout.trim().split("\n").at(-1)!;
  assert.equal((await mailctl(h.db.url, ["domain", "remove", "moved.test"])).code, 0);
  assert.equal((await h.call("GET", "/domains", { token: second })).status, 401);
});

test("with API_DOCS_PUBLIC=false the OpenAPI document needs a token too", async () => {
  const closed = await startHarness({ API_DOCS_PUBLIC: false });
  try {
    assert.equal((await closed.call("GET", "/docs/json", { token: null })).status, 401);
    assert.equal((await closed.call("GET", "/docs/json")).status, 200);
  } finally {
    await closed.close();
  }
});

test("input PostgreSQL cannot hold is a 400 naming the field, never a 500", async () => {
  assert.equal((await h.call("POST", "/domains", { body: { name: "limits.test" } })).status, 201);
  assert.equal((await h.call("POST", "/accounts", { body: { address: "l@limits.test", password: "pw" } })).status, 201);
  const refusals: Array<[string, string, unknown, string]> = [
    ["POST", "/accounts", { address: "m@limits.test", password: "pw", quotaBytes: 1e20 }, "quotaBytes"],
    ["PATCH", "/accounts/l@limits.test", { quotaBytes: 2 ** 53 }, "quotaBytes"],
    ["POST", "/accounts/l@limits.test/filters", { condition: { kind: "size", op: "over", bytes: 1e20 }, action: { kind: "discard" } }, "condition.bytes"],
    ["POST", "/accounts/l@limits.test/filters", { condition: { kind: "header", header: "Subject", op: "contains", value: "a\u0000b" }, action: { kind: "discard" } }, "condition.value"],
    ["DELETE", "/accounts/l@limits.test/filters/99999999999999999999", undefined, "id"],
    ["GET", "/queue/deliveries/99999999999999999999", undefined, "id"],
    ["POST", "/queue/deliveries/9223372036854775808/retry", undefined, "id"],
    ["GET", "/queue?domain=a%00b.test", undefined, "domain"],
    ["GET", "/journey?messageId=%00", undefined, "messageId"],
    ["POST", "/accounts", { address: "n@limits.test", password: "pw\u0000" }, "password"],
  ];
  for (const [method, path, body, field] of refusals) {
    const response = await h.call(method, path, { body });
    const answer = (await response.json()) as { field?: string; message: string };
    assert.equal(response.status, 400, `${method} ${path}: ${answer.message}`);
    assert.equal(answer.field, field, `${method} ${path}`);
  }
  // Which alias target was refused: the field says.
  const missingTarget = await h.call("POST", "/aliases", { body: { address: "al@limits.test", targets: ["l@limits.test", "nobody@limits.test"] } });
  assert.equal(missingTarget.status, 404);
  assert.equal(((await missingTarget.json()) as { field: string }).field, "targets.1");
  const badTarget = await h.call("POST", "/aliases", { body: { address: "al@limits.test", targets: ["l@limits.test", "user%x@limits.test"] } });
  assert.equal(badTarget.status, 400);
  assert.equal(((await badTarget.json()) as { field: string }).field, "targets.1");
  // The longest addresses work in a path as in a body: 64 octets of local part, 254 in all.
  const longDomain = `${"d".repeat(62)}.${"o".repeat(62)}.${"a".repeat(51)}.limits.test`;
  assert.equal(longDomain.length, 189);
  assert.equal((await h.call("POST", "/domains", { body: { name: longDomain } })).status, 201);
  const longAddress = `${"é".repeat(32)}@${longDomain}`;
  assert.equal((await h.call("POST", "/accounts", { body: { address: longAddress, password: "pw" } })).status, 201);
  const inPath = `/accounts/${encodeURIComponent(longAddress)}`;
  assert.equal((await h.call("GET", inPath)).status, 200);
  assert.equal((await h.call("PATCH", inPath, { body: { disabled: true } })).status, 200);
  assert.equal((await h.call("GET", `${inPath}/filters`)).status, 200);
  assert.equal((await h.call("GET", `/domains/${longDomain}`)).status, 200);
  assert.equal((await h.call("DELETE", inPath)).status, 204);
  // What the router itself refuses has the same shape as every other refusal.
  const badEncoding = await h.call("GET", "/accounts/%FF@limits.test");
  assert.equal(badEncoding.status, 400);
  assert.deepEqual(Object.keys((await badEncoding.json()) as object).sort(), ["error", "message", "statusCode"]);
  const tooLong = await h.call("GET", `/accounts/${"x".repeat(5000)}@limits.test`);
  assert.equal(tooLong.status, 414);
  const tooLongBody = (await tooLong.json()) as { statusCode: number; error: string };
  assert.deepEqual([tooLongBody.statusCode, tooLongBody.error], [414, "URI Too Long"]);
  // Unicode and upper-case domains, trailing dots: one normal form everywhere.
  const idn = await h.call("POST", "/domains", { body: { name: "Bücher.Limits.TEST." } });
  assert.equal(idn.status, 201);
  assert.equal(((await idn.json()) as { domain: { name: string } }).domain.name, "xn--bcher-kva.limits.test");
  assert.equal((await h.call("POST", "/accounts", { body: { address: "Ünï@BÜCHER.limits.test", password: "pw" } })).status, 201);
  const found = await h.call("GET", `/accounts/${encodeURIComponent("ünï@xn--bcher-kva.limits.test.")}`);
  assert.equal(found.status, 200);
  assert.equal(((await found.json()) as { address: string }).address, "ünï@xn--bcher-kva.limits.test");
});

test("the OpenAPI document matches what the routes answer, the non-JSON bodies of export and import included", async () => {
  const doc = (await (await h.call("GET", "/docs/json", { token: null })).json()) as {
    paths: Record<string, Record<string, { responses: Record<string, { content?: Record<string, unknown> }>; requestBody?: { content: Record<string, unknown>; required?: boolean } }>>;
  };
  const exportOk = doc.paths["/accounts/{address}/export"]!.get!.responses["200"]!;
  assert.deepEqual(Object.keys(exportOk.content ?? {}).sort(), ["application/mbox", "application/x-tar"]);
  const importOp = doc.paths["/accounts/{address}/import"]!.post!;
  assert.deepEqual(Object.keys(importOp.requestBody?.content ?? {}).sort(), ["application/mbox", "application/octet-stream", "application/x-tar", "message/rfc822"]);
  assert.ok(importOp.responses["415"], "415 (no body) is documented");
  // A body may be left out where the route takes none as the defaults, and only there.
  const optional = Object.entries(doc.paths).flatMap(([path, methods]) =>
    Object.entries(methods).filter(([, op]) => op.requestBody && op.requestBody.required === false).map(([method]) => `${method} ${path}`));
  assert.deepEqual(optional, ["post /domains/{name}/dkim"]);
  assert.equal((await h.call("POST", "/domains", { body: { name: "keyless.test" } })).status, 201);
  assert.equal((await h.call("POST", "/domains/keyless.test/dkim")).status, 201);

  // What the routes really answer is documented, for good requests and for refused ones.
  assert.equal((await h.call("POST", "/domains", { body: { name: "doc.test" } })).status, 201);
  assert.equal((await h.call("POST", "/accounts", { body: { address: "d@doc.test", password: "pw" } })).status, 201);
  const one = Buffer.from("Subject: one\r\n\r\nbody\r\n");
  const imported = await h.call("POST", "/accounts/d@doc.test/import?format=eml", { raw: one, contentType: "message/rfc822" });
  assert.equal(imported.status, 200);
  const exported = await h.call("GET", "/accounts/d@doc.test/export?format=mbox");
  assert.ok(Object.keys(exportOk.content!).includes(exported.headers.get("content-type")!));
  const noBody = await h.call("POST", "/accounts/d@doc.test/import?format=mbox");
  assert.ok(importOp.responses[String(noBody.status)], `import without a body answers ${noBody.status}, documented`);
  for (const [path, methods] of Object.entries(doc.paths)) {
    for (const [method, operation] of Object.entries(methods)) {
      const concrete = path.replace(/\{[^}]+\}/g, "x@doc.test");
      const response = await h.call(method.toUpperCase(), concrete, { body: method === "get" || method === "delete" ? undefined : {} });
      assert.ok(operation.responses[String(response.status)], `${method.toUpperCase()} ${concrete} answered ${response.status}, which is not documented`);
    }
  }
});

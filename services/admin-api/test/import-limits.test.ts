// A tar import holds each entry's bytes in memory, so every entry is bound by
// API_IMPORT_MAX_MESSAGE_SIZE, not only the regular files: a pax header, a directory or a link
// entry declaring gigabytes would otherwise be buffered in full by the admin API.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import http from "node:http";
import { addAccount, addDomain } from "@mailstack/db";
import { tarHeader } from "@mailstack/mailbox-io";
import { startHarness, type ApiHarness } from "./helpers.ts";

const LIMIT = 64 * 1024;
let h: ApiHarness;

before(async () => {
  h = await startHarness({ API_IMPORT_MAX_MESSAGE_SIZE: LIMIT });
  await addDomain(h.db.pool, "limits.test");
  await addAccount(h.db.pool, { address: "box@limits.test", password: "pw" });
});
after(async () => {
  await h?.close();
});

/**
 * POSTs a tar import on a connection of its own (an answer given before the upload ends can
 * leave a reused keep-alive connection stuck, which is not what these tests are about).
 */
function importTar(tar: Buffer): Promise<{ status: number; body: string }> {
  const url = new URL(`${h.api.url}/accounts/box@limits.test/import?format=eml`);
  return new Promise((resolve, reject) => {
    const request = http.request(url, {
      method: "POST",
      agent: false,
      headers: { authorization: `Bearer ${h.token}`, "content-type": "application/x-tar", "content-length": tar.length },
    }, (response) => {
      let body = "";
      response.setEncoding("utf8");
      response.on("data", (chunk) => (body += chunk));
      response.on("end", () => resolve({ status: response.statusCode ?? 0, body }));
    });
    // The server may answer and close before it has read everything.
    request.on("error", (error) => ((error as { code?: string }).code === "EPIPE" || (error as { code?: string }).code === "ECONNRESET" ? undefined : reject(error)));
    request.end(tar);
  });
}

/** A ustar header of another entry type (pax 'x', directory '5', symlink '2', ...). */
function header(type: string, path: string, size: number): Buffer {
  const block = tarHeader(path, size, new Date(0));
  block.write(type, 156, "latin1");
  block.write("        ", 148, "latin1");
  let sum = 0;
  for (const byte of block) sum += byte;
  block.write(`${sum.toString(8).padStart(6, "0")}\0 `, 148, "latin1");
  return block;
}

for (const [type, what] of [["x", "a pax header"], ["5", "a directory"], ["2", "a symlink"], ["K", "a GNU long link name"]] as const) {
  test(`${what} entry larger than API_IMPORT_MAX_MESSAGE_SIZE is refused with 413, not buffered`, async () => {
    const size = LIMIT * 16;
    const tar = Buffer.concat([header(type, "PaxHeaders/big", size), Buffer.alloc(size), Buffer.alloc(1024)]);
    const response = await importTar(tar);
    assert.equal(response.status, 413, response.body);
  });
}

test("small entries of other types are still skipped and the .eml files imported", async () => {
  const eml = Buffer.from("From: a@limits.test\r\nSubject: hi\r\n\r\nbody\r\n");
  const pax = Buffer.from("30 mtime=1700000000.123456789\n");
  const pad = (n: number) => Buffer.alloc((512 - (n % 512)) % 512);
  const tar = Buffer.concat([
    header("5", "INBOX/", 0),
    header("x", "PaxHeaders/1.eml", pax.length), pax, pad(pax.length),
    tarHeader("1.eml", eml.length, new Date(0)), eml, pad(eml.length),
    Buffer.alloc(1024),
  ]);
  const response = await importTar(tar);
  assert.equal(response.status, 200, response.body);
  assert.equal(JSON.parse(response.body).imported, 1);
});

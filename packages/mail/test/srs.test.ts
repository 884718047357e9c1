import { test } from "node:test";
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { isSrsAddress, srsForward, srsFromConfig, srsReverse, srsTimestamp, type SrsSettings } from "../src/srs.ts";

const DAY = 86_400_000;
const settings: SrsSettings = { domain: "srs.example.org", secrets: ["first-secret"], maxAgeDays: 21 };
const at = new Date("2024-01-01T12:00:00Z");
// Mail systems fold the case of ASCII letters (libsrs2 lower-cases ASCII only, as this does).
const asciiUpper = (text: string) => text.replace(/[a-z]+/g, (s) => s.toUpperCase());

test("SRS0 has libsrs2's form: base64 HMAC-SHA1 over the lower-cased stamp, domain and local part, cut to 4", () => {
  // Day 19723 is 267 in the 1024-day cycle: 8 ('I') and 11 ('L') in base32.
  assert.equal(srsTimestamp(at), "IL");
  const expected = createHmac("sha1", "first-secret").update("il").update("example.com").update("alice").digest("base64").slice(0, 4);
  assert.equal(srsForward(settings, "alice@example.com", at), `SRS0=${expected}=IL=example.com=alice@srs.example.org`);
});

test("round trip: SRS0 leads back to the sender, also after a mail system folded its case", () => {
  for (const sender of ["alice@example.com", "first.last+tag@mail.example.net", "a=b@example.com", '"john doe"@example.com', "ü@example.com"]) {
    const rewritten = srsForward(settings, sender, at)!;
    assert.ok(isSrsAddress(settings, rewritten), rewritten);
    assert.deepEqual(srsReverse(settings, rewritten, new Date(at.getTime() + 3 * DAY)), { ok: true, address: sender }, rewritten);
    // The original's case cannot come back from a folded address; the mailbox is the same.
    const lower = srsReverse(settings, rewritten.toLowerCase(), at);
    assert.equal(lower.ok && lower.address.toLowerCase(), sender.toLowerCase());
    const upper = srsReverse(settings, asciiUpper(rewritten).replace("@SRS.EXAMPLE.ORG", "@srs.example.org"), at);
    assert.equal(upper.ok && upper.address.toLowerCase(), sender.toLowerCase());
  }
  // A local part that needs quoting is quoted in the SRS address too.
  assert.match(srsForward(settings, '"john doe"@example.com', at)!, /^"SRS0=[^"]+=example\.com=john doe"@srs\.example\.org$/);
});

test("the same sender on the same day gives the same address (a retry sends what the first attempt sent)", () => {
  assert.equal(srsForward(settings, "alice@example.com", at), srsForward(settings, "alice@example.com", new Date(at.getTime() + 11 * 3_600_000)));
  assert.notEqual(srsForward(settings, "alice@example.com", at), srsForward(settings, "alice@example.com", new Date(at.getTime() + DAY)));
});

test("a tampered, forged or expired SRS0 address does not reverse", () => {
  const good = srsForward(settings, "alice@example.com", at)!;
  const [, hash] = /^SRS0=([^=]+)=/.exec(good)!;
  assert.equal(srsReverse(settings, good.replace("=alice@", "=mallory@"), at).ok, false);
  assert.deepEqual(srsReverse(settings, good.replace("=example.com=", "=evil.example=") , at), { ok: false, problem: "bad-hash" });
  assert.deepEqual(srsReverse(settings, good.replace(hash!, "AAAA"), at), { ok: false, problem: "bad-hash" });
  assert.deepEqual(srsReverse(settings, good.replace(`SRS0=${hash}=`, `SRS0=${hash}x=`), at), { ok: false, problem: "bad-hash" });
  assert.deepEqual(srsReverse({ ...settings, secrets: ["someone-else"] }, good, at), { ok: false, problem: "bad-hash" });
  // Valid through its last day, refused after; a stamp "from the future" is a cycle old.
  assert.equal(srsReverse(settings, good, new Date(at.getTime() + 21 * DAY)).ok, true);
  assert.deepEqual(srsReverse(settings, good, new Date(at.getTime() + 22 * DAY)), { ok: false, problem: "expired" });
  assert.deepEqual(srsReverse(settings, good, new Date(at.getTime() - DAY)), { ok: false, problem: "expired" });
  assert.deepEqual(srsReverse(settings, good.replace("=IL=", "=I1="), at), { ok: false, problem: "expired" });
  assert.deepEqual(srsReverse(settings, "SRS0=abcd=IL=example.com@srs.example.org", at), { ok: false, problem: "malformed" });
  assert.deepEqual(srsReverse(settings, "SRS0=@srs.example.org", at), { ok: false, problem: "malformed" });
  // Only the SRS domain's SRS0/SRS1 local parts are SRS addresses.
  assert.deepEqual(srsReverse(settings, good.replace("@srs.example.org", "@other.example.org"), at), { ok: false, problem: "not-srs" });
  assert.deepEqual(srsReverse(settings, "postmaster@srs.example.org", at), { ok: false, problem: "not-srs" });
});

test("SRS1: forwarding another forwarder's SRS0 address keeps its part and leads back to it", () => {
  const other: SrsSettings = { domain: "fwd.example.net", secrets: ["their-secret"], maxAgeDays: 21 };
  const theirs = srsForward(other, "alice@example.com", at)!;
  assert.match(theirs, /^SRS0=/);
  const ours = srsForward(settings, theirs, at)!;
  const rest = theirs.slice("SRS0".length, theirs.indexOf("@"));
  const hash = createHmac("sha1", "first-secret").update("fwd.example.net").update(rest.toLowerCase()).digest("base64").slice(0, 4);
  assert.equal(ours, `SRS1=${hash}=fwd.example.net=${rest}@srs.example.org`);
  // A bounce to ours goes to theirs; theirs (at the other forwarder) to alice.
  assert.deepEqual(srsReverse(settings, ours, new Date(at.getTime() + 400 * DAY)), { ok: true, address: theirs });
  const folded = srsReverse(settings, ours.toLowerCase(), at);
  assert.equal(folded.ok && folded.address.toLowerCase(), theirs.toLowerCase());
  assert.deepEqual(srsReverse(other, theirs, at), { ok: true, address: "alice@example.com" });
  // A third forwarder re-signs the SRS1 address, keeping the first forwarder.
  const third: SrsSettings = { domain: "third.example", secrets: ["third-secret"], maxAgeDays: 21 };
  const again = srsForward(third, ours, at)!;
  assert.match(again, /^SRS1=[^=]{4}=fwd\.example\.net==/);
  assert.deepEqual(srsReverse(third, again, at), { ok: true, address: theirs });
  // Tampered SRS1 does not reverse.
  assert.deepEqual(srsReverse(settings, ours.replace("fwd.example.net", "evil.example.net"), at), { ok: false, problem: "bad-hash" });
  assert.deepEqual(srsReverse(settings, "SRS1=abcd=fwd.example.net@srs.example.org", at), { ok: false, problem: "malformed" });
});

test("a sender already in the SRS domain is not rewritten; one too long for a 64-octet local part is not either", () => {
  assert.equal(srsForward(settings, "SRS0=abcd=IL=example.com=alice@srs.example.org", at), "SRS0=abcd=IL=example.com=alice@srs.example.org");
  assert.equal(srsForward(settings, `${"x".repeat(40)}@${"d".repeat(20)}.example.com`, at), null);
});

test("secret rotation: the first secret signs, every secret verifies", () => {
  const before = srsForward({ ...settings, secrets: ["old-secret"] }, "alice@example.com", at)!;
  const rotated: SrsSettings = { ...settings, secrets: ["new-secret", "old-secret"] };
  const after = srsForward(rotated, "alice@example.com", at)!;
  assert.notEqual(after, before);
  assert.equal(after, srsForward({ ...settings, secrets: ["new-secret"] }, "alice@example.com", at));
  assert.deepEqual(srsReverse(rotated, before, at), { ok: true, address: "alice@example.com" });
  assert.deepEqual(srsReverse(rotated, after, at), { ok: true, address: "alice@example.com" });
  assert.deepEqual(srsReverse({ ...settings, secrets: ["new-secret"] }, before, at), { ok: false, problem: "bad-hash" });
});

test("settings: off without SRS_DOMAIN, SRS_MAX_AGE in whole days", () => {
  assert.equal(srsFromConfig({ SRS_DOMAIN: "", SRS_SECRETS: ["s"], SRS_MAX_AGE: 21 * DAY }), null);
  assert.deepEqual(srsFromConfig({ SRS_DOMAIN: "srs.example.org", SRS_SECRETS: ["a", "b"], SRS_MAX_AGE: 30 * DAY + 5 }), { domain: "srs.example.org", secrets: ["a", "b"], maxAgeDays: 30 });
});

import { test } from "node:test";
import assert from "node:assert/strict";
import { decodeUtf8Addr, utf8AddrUnitext, utf8AddrXtext } from "../src/index.ts";

test("RFC 6533 utf-8 address type: the xtext form is ASCII, the unitext form keeps UTF-8; both escape the xtext specials", () => {
  assert.equal(utf8AddrXtext("m\u00fcller@b\u00fccher.example"), "m\\x{FC}ller@b\\x{FC}cher.example");
  assert.equal(utf8AddrXtext("\u7528\u6237+tag@x.test"), "\\x{7528}\\x{6237}\\x{2B}tag@x.test");
  assert.equal(utf8AddrXtext("\u{1F600}=a\\b@x.test"), "\\x{1F600}\\x{3D}a\\x{5C}b@x.test");
  assert.equal(utf8AddrUnitext("m\u00fcller+x@x.test"), "m\u00fcller\\x{2B}x@x.test");
  for (const address of ["m\u00fcller@b\u00fccher.example", "\u7528\u6237+tag@x.test", '"a b"@x.test', "\u{1F600}@x.test"]) {
    assert.equal(decodeUtf8Addr(utf8AddrXtext(address), { unitext: false }), address);
    assert.equal(decodeUtf8Addr(utf8AddrUnitext(address), { unitext: true }), address);
  }
});

test("decodeUtf8Addr refuses what is not the form: raw UTF-8 without unitext, non-HEXPOINT escapes, controls, no address", () => {
  assert.equal(decodeUtf8Addr("m\u00fcller@x.test", { unitext: false }), null, "raw UTF-8 is the unitext form");
  assert.equal(decodeUtf8Addr("m\\x{fc}ller@x.test", { unitext: false }), "m\u00fcller@x.test", "hex digits in either case (ABNF)");
  for (const bad of [
    "m\\x{0FC}ller@x.test", // not the shortest form
    "\\x{41}@x.test", // an ASCII letter is written as itself
    "a\\x{D800}@x.test", // a surrogate
    "a\\x{110000}@x.test",
    "a\\x{0D}\\x{0A}b@x.test", // CR LF
    "a\\x{01}@x.test", // a control character, though a HEXPOINT
    "a\\x{FC@x.test",
    "a\\b@x.test",
    "a+FC@x.test",
    "a=b@x.test",
    "a b@x.test",
    "no-at-sign",
    "@x.test",
    "a@",
    "",
    "a\ufffd@x.test",
  ]) {
    assert.equal(decodeUtf8Addr(bad, { unitext: true }), null, bad);
  }
});

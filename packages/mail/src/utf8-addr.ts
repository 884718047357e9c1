/**
 * RFC 6533 section 3: the "utf-8" address type of DSNs (ORCPT, Original-Recipient,
 * Final-Recipient) and its two encodings of an address:
 *   utf-8-addr-xtext   ASCII only: every non-ASCII character, and the ASCII ones xtext cannot
 *                      carry (controls, space, "\", "+", "="), as \x{HEX}. Usable in an ORCPT
 *                      whatever the session, and in a 7-bit message/delivery-status.
 *   utf-8-addr-unitext the same with non-ASCII characters left as UTF-8: only in a transaction
 *                      that uses SMTPUTF8.
 * Neither form contains "+", so either is also valid xtext (RFC 3461) that decodes to itself.
 */

/** QCHAR: printable ASCII except "\", "+" and "=". */
const QCHAR = /[\x21-\x2a\x2c-\x3c\x3e-\x5b\x5d-\x7e]/;
/** One element of either form: a QCHAR, a \x{HEX}, or (unitext) a non-ASCII character. */
const ELEMENT = /\\x\{([0-9A-Fa-f]{1,6})\}|[\x21-\x2a\x2c-\x3c\x3e-\x5b\x5d-\x7e]|([^\x00-\x7f])|([\s\S])/gu;
/**
 * HEXPOINT: the shortest upper-case hex of a code point that needs it (the xtext specials, "\",
 * or a non-ASCII scalar value, surrogates excluded). Any other spelling is not the encoding.
 */
const HEXPOINT = /^(?:0[1-9]|1[0-9]|20|2B|3D|7F|5C|[89A-F][0-9A-F]|[1-9A-F][0-9A-F]{2}|[1-9A-CE-F][0-9A-F]{3}|D[0-7][0-9A-F]{2}|[1-9A-F][0-9A-F]{4}|10[0-9A-F]{4})$/i;

function escape(char: string): string {
  return `\\x{${char.codePointAt(0)!.toString(16).toUpperCase()}}`;
}

/** The utf-8-addr-xtext form of an address: 7-bit. */
export function utf8AddrXtext(address: string): string {
  let out = "";
  for (const char of address) out += QCHAR.test(char) ? char : escape(char);
  return out;
}

/** The utf-8-addr-unitext form of an address: non-ASCII characters stay as they are. */
export function utf8AddrUnitext(address: string): string {
  let out = "";
  for (const char of address) out += QCHAR.test(char) || char.codePointAt(0)! > 0x7f ? char : escape(char);
  return out;
}

/**
 * Decodes utf-8-addr-xtext (and, with `unitext`, utf-8-addr-unitext) into the address, or null
 * when the text is not that form or does not decode to something address-like: a character
 * outside the form, a \x{HEX} that is not a HEXPOINT, a control character, U+FFFD (bytes that
 * were not UTF-8), or no "@" with text on both sides (RFC 6533: it MUST follow the
 * utf-8-address ABNF when dequoted).
 */
export function decodeUtf8Addr(text: string, options: { unitext: boolean }): string | null {
  if (!text) return null;
  let out = "";
  for (const match of text.matchAll(ELEMENT)) {
    const [element, hex, nonAscii, other] = match;
    if (other !== undefined) return null;
    if (nonAscii !== undefined && !options.unitext) return null;
    if (hex === undefined) {
      out += element;
      continue;
    }
    if (!HEXPOINT.test(hex)) return null;
    out += String.fromCodePoint(parseInt(hex, 16));
  }
  if (/[\x00-\x1f\x7f-\x9f\ufffd]/.test(out)) return null;
  const at = out.lastIndexOf("@");
  return at > 0 && at < out.length - 1 ? out : null;
}

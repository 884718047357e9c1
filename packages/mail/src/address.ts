import { domainToASCII } from "node:url";

/** Why an address was refused; the SMTP layer maps each to its reply. */
export type AddressProblem =
  | "empty"
  | "too-long"
  | "syntax"
  | "source-route"
  | "percent-hack"
  | "bang-path"
  | "ip-literal"
  | "quoted-at"
  | "bad-domain"
  | "utf8-not-allowed";

/**
 * A parsed mailbox. `local` and `address` keep the local part's case as it was written (RFC 5321
 * 2.4: a local part is case-sensitive; only its own host may decide otherwise): that is the
 * form recorded and sent on (envelope sender, remote recipients and alias targets, the relay's
 * MAIL FROM/RCPT TO). `key` is the form this system's own mailboxes are named and found by
 * (addressKey): accounts, aliases, the catch-all, login names and sender rights are
 * case-insensitive. The domain is lower-case in both.
 */
export type ParsedAddress =
  | { ok: true; local: string; domain: string; address: string; key: string }
  | { ok: false; problem: AddressProblem };

export interface ParseOptions {
  /** Accept UTF-8 in the local part (the SMTPUTF8 extension was used). */
  utf8?: boolean;
}

const ATEXT = /^[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+$/;
const ATEXT_UTF8 = /^(?:[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]|[^\x00-\x7f])+$/u;
const LABEL = /^(?!-)[a-z0-9-]{1,63}(?<!-)$/;

/** Lower-cases a domain and converts it to IDNA (A-label) form; null when it is not a valid host name. */
export function normalizeDomain(input: string): string | null {
  let domain = input.trim().replace(/\.$/, "");
  if (!domain || domain.length > 253) return null;
  if (/[^\x00-\x7f]/.test(domain)) {
    domain = domainToASCII(domain);
    if (!domain) return null;
  }
  domain = domain.toLowerCase();
  const labels = domain.split(".");
  if (labels.length < 1 || !labels.every((label) => LABEL.test(label))) return null;
  return domain;
}

function splitAtLastAt(text: string): [string, string] | null {
  const at = text.lastIndexOf("@");
  if (at <= 0 || at === text.length - 1) return null;
  return [text.slice(0, at), text.slice(at + 1)];
}

/**
 * Parses an RFC 5321 mailbox (without angle brackets) and normalises it: the domain
 * lower-cased in IDNA form, the local part in its canonical quoting with its case kept (see
 * ParsedAddress for `address` and `key`). Forms used for relay tricks are reported as such.
 *
 * A Quoted-string local part (RFC 5321 4.1.2) names the same mailbox however it is quoted:
 * its content is unescaped, written bare when it is a dot-atom (`"John"` is `John`), else
 * quoted again with a backslash only before `"` and `\` (`"a\ B"` is `"a B"`). That canonical
 * form is the address everywhere: stored envelopes, headers, the relay's commands, and
 * (lower-cased, as `key`) lookups.
 * Lengths are octets as sent: local part at most 64, mailbox at most 254 (a 256-octet path
 * with its angle brackets, RFC 5321 4.5.3.1).
 */
export function parseAddress(input: string, options: ParseOptions = {}): ParsedAddress {
  const text = input.trim();
  if (!text) return { ok: false, problem: "empty" };
  if (text.startsWith("@")) return { ok: false, problem: "source-route" };
  // U+FFFD is what bytes that were not UTF-8 decode to: such an address cannot be given back as sent.
  if (/[\x00-\x1f\x7f\ufffd]/.test(text)) return { ok: false, problem: "syntax" };
  if (!options.utf8 && /[^\x00-\x7f]/.test(text.slice(0, text.lastIndexOf("@") >>> 0))) {
    return { ok: false, problem: "utf8-not-allowed" };
  }

  let local: string;
  let sentLocal: string;
  let domainPart: string;
  if (text.startsWith('"')) {
    const close = findClosingQuote(text);
    if (close < 0 || text[close + 1] !== "@") return { ok: false, problem: "syntax" };
    const quoted = text.slice(1, close).replace(/\\(.)/g, "$1");
    if (quoted.includes("@")) return { ok: false, problem: "quoted-at" };
    if (quoted.includes("%")) return { ok: false, problem: "percent-hack" };
    if (quoted.includes("!")) return { ok: false, problem: "bang-path" };
    sentLocal = text.slice(0, close + 1);
    local = isDotAtom(quoted, options.utf8) ? quoted : `"${quoted.replace(/["\\]/g, "\\$&")}"`;
    domainPart = text.slice(close + 2);
  } else {
    const parts = splitAtLastAt(text);
    if (!parts) return { ok: false, problem: "syntax" };
    [local, domainPart] = parts;
    sentLocal = local;
    if (local.includes("@")) return { ok: false, problem: "syntax" };
    if (local.includes("%")) return { ok: false, problem: "percent-hack" };
    if (local.includes("!")) return { ok: false, problem: "bang-path" };
    if (!isDotAtom(local, options.utf8)) return { ok: false, problem: "syntax" };
  }
  if (Buffer.byteLength(sentLocal) > 64) return { ok: false, problem: "too-long" };
  if (domainPart.startsWith("[")) return { ok: false, problem: "ip-literal" };
  const domain = normalizeDomain(domainPart);
  if (!domain) return { ok: false, problem: domainPart.length > 253 ? "too-long" : "bad-domain" };
  if (Buffer.byteLength(sentLocal) + 1 + domain.length > 254) return { ok: false, problem: "too-long" };
  const address = `${local}@${domain}`;
  return { ok: true, local, domain, address, key: addressKey(address) };
}

/**
 * The lookup key of a canonical address (parseAddress's `address`, or an address stored in
 * that form): the local part lower-cased, the domain being lower-case already. Accounts and
 * aliases are stored under it; every match of an address against this system's own mailboxes
 * (routing, logins, sender rights) compares keys. Never sent or recorded in place of the address.
 */
export function addressKey(address: string): string {
  return address.toLowerCase();
}

/**
 * Where the path of a MAIL or RCPT command ends: `text` starts with its "<", the result is
 * the index after its ">" (quoted strings skipped, so `<"a>b"@x>` is one path), or -1 when
 * there is no such path.
 */
export function pathEnd(text: string): number {
  if (text[0] !== "<") return -1;
  let quoted = false;
  for (let i = 1; i < text.length; i++) {
    const c = text[i];
    if (quoted && c === "\\") i++;
    else if (c === '"') quoted = !quoted;
    else if (!quoted && c === ">") return i + 1;
    else if (!quoted && c === "<") return -1;
  }
  return -1;
}

function findClosingQuote(text: string): number {
  for (let i = 1; i < text.length; i++) {
    if (text[i] === "\\") i++;
    else if (text[i] === '"') return i;
  }
  return -1;
}

function isDotAtom(text: string, utf8 = false): boolean {
  const atom = utf8 ? ATEXT_UTF8 : ATEXT;
  return text.split(".").every((part) => part.length > 0 && atom.test(part));
}

/** Normalises an address (parseAddress's `address`, case kept) or returns null; for checks where the reason does not matter. */
export function normalizeAddress(input: string, options: ParseOptions = {}): string | null {
  const parsed = parseAddress(input, options);
  return parsed.ok ? parsed.address : null;
}

/** Splits a normalised address into local part and domain. */
export function splitAddress(address: string): { local: string; domain: string } {
  const at = address.lastIndexOf("@");
  return { local: address.slice(0, at), domain: address.slice(at + 1) };
}

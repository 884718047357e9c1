import { createHmac, timingSafeEqual } from "node:crypto";
import { normalizeAddress, splitAddress } from "./address.ts";

/**
 * The Sender Rewriting Scheme as libsrs2 (Shevek's paper) and postsrsd write it, so addresses
 * stay valid when an operator moves from postsrsd with the same secret and domain:
 *
 *   SRS0=HHHH=TT=domain=local@srs-domain           (forwarding local@domain)
 *   SRS1=HHHH=first-forwarder==HHHH=TT=domain=local@srs-domain   (forwarding an SRS0 address again)
 *
 * HHHH: the first 4 characters of base64(HMAC-SHA1(secret, fields lower-cased in ASCII)), over
 * TT, domain and local for SRS0, over the first forwarder's domain and the rest of its SRS0
 * local part (from its separator on) for SRS1. TT: the day number modulo 1024 in two base32
 * characters. This system lower-cases every local part it receives (address.ts), so both the
 * hash and the timestamp are compared without regard to case.
 */

export interface SrsSettings {
  /** The domain SRS addresses are written in; its MX must be this system. */
  domain: string;
  /** The first signs; every one verifies (rotation). */
  secrets: string[];
  /** How many days an SRS0 address stays valid. */
  maxAgeDays: number;
}

export type SrsReversal =
  | { ok: true; address: string }
  | { ok: false; problem: "not-srs" | "malformed" | "bad-hash" | "expired" };

const HASH_LENGTH = 4;
const DAY_MS = 86_400_000;
const TIME_SLOTS = 1024;
const BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
/** The separator right after the SRS0/SRS1 tag may be any of these (libsrs2); the others are "=". */
const TAG = /^srs([01])([=+-])/i;

/** The SRS settings from the service settings (SRS_*), or null when SRS is off. */
export function srsFromConfig(config: { SRS_DOMAIN: string; SRS_SECRETS: string[]; SRS_MAX_AGE: number }): SrsSettings | null {
  if (!config.SRS_DOMAIN) return null;
  return { domain: config.SRS_DOMAIN, secrets: config.SRS_SECRETS, maxAgeDays: Math.max(1, Math.floor(config.SRS_MAX_AGE / DAY_MS)) };
}

function asciiLower(text: string): string {
  return text.replace(/[A-Z]+/g, (s) => s.toLowerCase());
}

function hash(secret: string, fields: string[]): string {
  const hmac = createHmac("sha1", secret);
  for (const field of fields) hmac.update(asciiLower(field));
  return hmac.digest("base64").slice(0, HASH_LENGTH);
}

function hashMatches(settings: SrsSettings, given: string, fields: string[]): boolean {
  if (given.length !== HASH_LENGTH) return false;
  const wanted = Buffer.from(asciiLower(given));
  return settings.secrets.some((secret) => {
    const computed = Buffer.from(asciiLower(hash(secret, fields)));
    return computed.length === wanted.length && timingSafeEqual(computed, wanted);
  });
}

/** The two-character day stamp of a moment. */
export function srsTimestamp(at: Date): string {
  const day = Math.floor(at.getTime() / DAY_MS) % TIME_SLOTS;
  return BASE32[(day >> 5) & 31]! + BASE32[day & 31]!;
}

function timestampValid(stamp: string, now: Date, maxAgeDays: number): boolean {
  if (stamp.length !== 2) return false;
  const high = BASE32.indexOf(stamp[0]!.toUpperCase());
  const low = BASE32.indexOf(stamp[1]!.toUpperCase());
  if (high < 0 || low < 0) return false;
  const then = (high << 5) | low;
  let today = Math.floor(now.getTime() / DAY_MS) % TIME_SLOTS;
  // A stamp "after" today is from the previous cycle of 1024 days.
  if (today < then) today += TIME_SLOTS;
  return today <= then + maxAgeDays;
}

/** A local part without its quoting: what SRS fields carry. */
function unquote(local: string): string {
  return local.startsWith('"') ? local.slice(1, -1).replace(/\\(.)/g, "$1") : local;
}

/**
 * local@domain in this system's canonical form (quoted only when it must be; the local part's
 * case kept, so SRS0=, not srs0=, goes out), or null when it is no valid address.
 */
function canonical(local: string, domain: string): string | null {
  return normalizeAddress(`"${local.replace(/["\\]/g, "\\$&")}"@${domain}`, { utf8: true });
}

/**
 * The fields of an SRS1 local part, SRS1=HHHH=first=rest, where rest is what followed "SRS0" in
 * the first forwarder's address, its separator included ("=HHHH=TT=domain=local").
 */
function splitSrs1(local: string): { hash: string; first: string; rest: string } | null {
  const match = /^srs1[=+-]([^=]+)=([^=]+)=([=+-].+)$/i.exec(local);
  return match ? { hash: match[1]!, first: match[2]!, rest: match[3]! } : null;
}

/**
 * The SRS form of a (canonical, non-null) envelope sender, as of `at`: SRS0 for an ordinary
 * address, SRS1 for an SRS0 or SRS1 address of another forwarder; the sender itself when it
 * is already in the SRS domain. Null when the result would be no valid address (a local part
 * over 64 octets): such an address could not even be given back to this system's port 25.
 */
export function srsForward(settings: SrsSettings, sender: string, at: Date): string | null {
  const { local: quoted, domain } = splitAddress(sender);
  if (domain === settings.domain) return sender;
  const secret = settings.secrets[0]!;
  const local = unquote(quoted);
  const tag = TAG.exec(local);
  if (tag?.[1] === "1") {
    // Keep the first forwarder and its part, signed again with our secret.
    const srs1 = splitSrs1(local);
    if (srs1) return canonical(`SRS1=${hash(secret, [srs1.first, srs1.rest])}=${srs1.first}=${srs1.rest}`, settings.domain);
  } else if (tag?.[1] === "0") {
    const rest = local.slice(4);
    return canonical(`SRS1=${hash(secret, [domain, rest])}=${domain}=${rest}`, settings.domain);
  }
  const stamp = srsTimestamp(at);
  return canonical(`SRS0=${hash(secret, [stamp, domain, local])}=${stamp}=${domain}=${local}`, settings.domain);
}

/** True when the address is an SRS0 or SRS1 address in the SRS domain (valid or not). */
export function isSrsAddress(settings: SrsSettings, address: string): boolean {
  const { local, domain } = splitAddress(address);
  return domain === settings.domain && TAG.test(unquote(local));
}

/**
 * Where an SRS address in our domain leads: the original sender for SRS0, the first
 * forwarder's SRS0 address for SRS1. Verified with every secret; an SRS0 address also by age.
 */
export function srsReverse(settings: SrsSettings, address: string, now: Date): SrsReversal {
  if (!isSrsAddress(settings, address)) return { ok: false, problem: "not-srs" };
  const local = unquote(splitAddress(address).local);
  const version = TAG.exec(local)![1];
  if (version === "1") {
    const srs1 = splitSrs1(local);
    if (!srs1) return { ok: false, problem: "malformed" };
    if (!hashMatches(settings, srs1.hash, [srs1.first, srs1.rest])) return { ok: false, problem: "bad-hash" };
    const original = canonical(`SRS0${srs1.rest}`, srs1.first);
    return original ? { ok: true, address: original } : { ok: false, problem: "malformed" };
  }
  const fields = local.slice(5).split("=");
  const [given, stamp, domain] = fields;
  const user = fields.slice(3).join("=");
  if (fields.length < 4 || !given || !stamp || !domain || !user) return { ok: false, problem: "malformed" };
  if (!timestampValid(stamp, now, settings.maxAgeDays)) return { ok: false, problem: "expired" };
  if (!hashMatches(settings, given, [stamp, domain, user])) return { ok: false, problem: "bad-hash" };
  const original = canonical(user, domain);
  return original ? { ok: true, address: original } : { ok: false, problem: "malformed" };
}

import { createHash, timingSafeEqual } from "node:crypto";
import { getAccount, loginFailures, pruneLoginFailures, recordLoginFailure, type Pool } from "@mailstack/db";
import { verifyAccountPassword } from "@mailstack/mail";

export interface Account {
  id: number;
  address: string;
}

export interface ThrottleLimits {
  perIp: number;
  perAccount: number;
  windowMs: number;
}

/** True when this IP or this login name has used up its failed attempts in the current window. */
export async function isThrottled(pool: Pool, ip: string, name: string, limits: ThrottleLimits): Promise<boolean> {
  const counts = await loginFailures(pool, ip, name, limits.windowMs);
  return counts.ip >= limits.perIp || counts.account >= limits.perAccount;
}

export async function recordFailure(pool: Pool, ip: string, name: string, limits: ThrottleLimits): Promise<void> {
  await recordLoginFailure(pool, ip, name, limits.windowMs);
  // Expired windows are kept only until some later failure sweeps them.
  if (Math.random() < 0.02) await pruneLoginFailures(pool, limits.windowMs);
}

/** USER/PASS and AUTH PLAIN: the account when the password matches and the account is enabled. */
export async function checkPassword(pool: Pool, name: string, password: string): Promise<Account | null> {
  // A name with NUL is no account's (and PostgreSQL's text cannot hold it).
  const account = name.includes("\0") ? null : await getAccount(pool, name);
  // Unknown and disabled accounts cost the same scrypt run as a wrong password (no timing oracle).
  const valid = await verifyAccountPassword(password, account?.password_hash);
  if (!account || !valid || account.disabled) return null;
  return { id: account.id, address: account.address };
}

export type ApopResult = Account | "not-enabled" | null;

/** APOP (RFC 1939 section 7): MD5 of the greeting's timestamp and the account's stored secret. */
export async function checkApop(pool: Pool, name: string, timestamp: string, digest: string): Promise<ApopResult> {
  const account = name.includes("\0") ? null : await getAccount(pool, name);
  if (!account || account.disabled || !account.apop_secret) return "not-enabled";
  const expected = Buffer.from(createHash("md5").update(timestamp + account.apop_secret).digest("hex"));
  const given = Buffer.from(digest.toLowerCase());
  if (given.length !== expected.length || !timingSafeEqual(given, expected)) return null;
  return { id: account.id, address: account.address };
}

/** Decodes an AUTH PLAIN response (RFC 4616): [authzid] NUL authcid NUL passwd. */
export function decodePlain(base64: string): { name: string; password: string } | null {
  if (!/^[A-Za-z0-9+/]*={0,2}$/.test(base64) || base64.length % 4 !== 0) return null;
  const parts = Buffer.from(base64, "base64").toString("utf8").split("\0");
  if (parts.length !== 3) return null;
  const [authzid, name, password] = parts as [string, string, string];
  if (!name || !password) return null;
  // Acting as someone else is not supported.
  if (authzid && authzid.toLowerCase() !== name.toLowerCase()) return null;
  return { name, password };
}

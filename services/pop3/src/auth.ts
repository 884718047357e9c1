import { createHash, timingSafeEqual } from "node:crypto";
import { getAccount, type Pool } from "@mailstack/db";
import { verifyPassword } from "@mailstack/mail";

export interface Account {
  id: number;
  address: string;
}

export interface ThrottleLimits {
  perIp: number;
  perAccount: number;
  windowMs: number;
}

/** Account login names are addresses; the throttle key is their lower-cased form. */
function accountKey(name: string): string {
  return name.trim().toLowerCase().slice(0, 320);
}

/** True when this IP or this login name has used up its failed attempts in the current window. */
export async function isThrottled(pool: Pool, ip: string, name: string, limits: ThrottleLimits): Promise<boolean> {
  const result = await pool.query<{ scope: string; failures: number }>(
    `SELECT scope, failures FROM auth_failures
      WHERE ((scope = 'ip' AND key = $1) OR (scope = 'account' AND key = $2))
        AND window_start > now() - make_interval(secs => $3)`,
    [ip, accountKey(name), limits.windowMs / 1000],
  );
  return result.rows.some((row) =>
    row.scope === "ip" ? row.failures >= limits.perIp : row.failures >= limits.perAccount,
  );
}

export async function recordFailure(pool: Pool, ip: string, name: string, limits: ThrottleLimits): Promise<void> {
  const window = limits.windowMs / 1000;
  await pool.query(
    `INSERT INTO auth_failures AS f (scope, key, window_start, failures)
     VALUES ('ip', $1, now(), 1), ('account', $2, now(), 1)
     ON CONFLICT (scope, key) DO UPDATE SET
       failures = CASE WHEN f.window_start > now() - make_interval(secs => $3) THEN f.failures + 1 ELSE 1 END,
       window_start = CASE WHEN f.window_start > now() - make_interval(secs => $3) THEN f.window_start ELSE now() END`,
    [ip, accountKey(name), window],
  );
  // Expired windows are kept only until some later failure sweeps them.
  if (Math.random() < 0.02) {
    await pool.query("DELETE FROM auth_failures WHERE window_start < now() - make_interval(secs => $1)", [window]);
  }
}

/** USER/PASS and AUTH PLAIN: the account when the password matches and the account is enabled. */
export async function checkPassword(pool: Pool, name: string, password: string): Promise<Account | null> {
  const account = await getAccount(pool, name);
  if (!account || account.disabled) return null;
  if (!(await verifyPassword(password, account.password_hash))) return null;
  return { id: account.id, address: account.address };
}

export type ApopResult = Account | "not-enabled" | null;

/** APOP (RFC 1939 section 7): MD5 of the greeting's timestamp and the account's stored secret. */
export async function checkApop(pool: Pool, name: string, timestamp: string, digest: string): Promise<ApopResult> {
  const account = await getAccount(pool, name);
  if (!account || account.disabled || !account.apop_secret) return "not-enabled";
  const expected = Buffer.from(createHash("md5").update(timestamp + account.apop_secret).digest("hex"));
  const given = Buffer.from(digest.toLowerCase());
  if (given.length !== expected.length || !timingSafeEqual(given, expected)) return null;
  return { id: account.id, address: account.address };
}

/** POP-before-SMTP: the MSA may trust this IP for a while after a successful login. */
export async function recordPopLogin(pool: Pool, ip: string, accountId: number): Promise<void> {
  await pool.query(
    `INSERT INTO pop_logins (ip, account_id, at) VALUES ($1, $2, now())
     ON CONFLICT (ip) DO UPDATE SET account_id = excluded.account_id, at = excluded.at`,
    [ip, accountId],
  );
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

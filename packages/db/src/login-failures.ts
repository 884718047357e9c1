import { isIPv6 } from "node:net";
import { parseAddress } from "@mailstack/mail";
import type { Queryable } from "./pool.ts";

/**
 * Failed logins per client IP and per login name, in the auth_failures table (migration 030),
 * shared by every service that checks passwords (POP3 and the MSA) and by all their replicas,
 * so guessing through one protocol counts against the other too. A window starts at the first
 * failure; a failure after the window ended starts a new one.
 */
export interface FailureCounts {
  ip: number;
  account: number;
}

/**
 * The one key form for a login name: the address's lookup key, or the lower-cased name when it is
 * none (without NUL characters, which PostgreSQL's text cannot hold: a client may send them).
 */
export function loginKey(name: string): string {
  const parsed = parseAddress(name.trim(), { utf8: true });
  return parsed.ok ? parsed.key : name.replaceAll("\0", "").trim().toLowerCase().slice(0, 320);
}

/**
 * A client address as PostgreSQL's inet takes it and every service stores it: without an IPv6
 * zone ("fe80::1%eth0", which inet refuses; a link-local client reports one) and an IPv4-mapped
 * IPv6 address as its IPv4 address.
 */
export function clientAddress(ip: string): string {
  const address = ip.trim().toLowerCase().replace(/%.*$/, "");
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/.exec(address);
  return mapped ? mapped[1]! : address;
}

/**
 * The key an address's failures are counted under: an IPv4 address as it is (an IPv4-mapped IPv6
 * one as its IPv4 address), an IPv6 address as its /64 ("2001:db8:1:2::/64"). A /64 is the
 * smallest block a site gets (RFC 6177), so a client can change its address within it at will:
 * counted per address, it would never reach the limit. (Dovecot's auth penalty groups by /48.)
 */
export function failureIpKey(ip: string): string {
  const address = clientAddress(ip);
  if (!isIPv6(address)) return address;
  // An embedded IPv4 address is the last 32 bits, outside the /64: any two groups do.
  const hex = address.replace(/\d+\.\d+\.\d+\.\d+$/, "0:0");
  const [head, tail] = hex.split("::") as [string, string | undefined];
  const left = head ? head.split(":") : [];
  const right = tail ? tail.split(":") : [];
  const groups = tail === undefined ? left : [...left, ...Array<string>(8 - left.length - right.length).fill("0"), ...right];
  return `${groups.slice(0, 4).map((group) => parseInt(group, 16).toString(16)).join(":")}::/64`;
}

/** Failures of this IP and of this login name within the current window. */
export async function loginFailures(db: Queryable, ip: string, name: string, windowMs: number): Promise<FailureCounts> {
  const result = await db.query<{ scope: "ip" | "account"; failures: number }>(
    `SELECT scope, failures FROM auth_failures
      WHERE window_start > now() - make_interval(secs => $1::float8 / 1000)
        AND ((scope = 'ip' AND key = $2) OR (scope = 'account' AND key = $3))`,
    [windowMs, failureIpKey(ip), loginKey(name)],
  );
  const counts: FailureCounts = { ip: 0, account: 0 };
  for (const row of result.rows) counts[row.scope] = row.failures;
  return counts;
}

/** Counts one failed login against the IP and the login name. */
export async function recordLoginFailure(db: Queryable, ip: string, name: string, windowMs: number): Promise<void> {
  await db.query(
    `INSERT INTO auth_failures AS f (scope, key, window_start, failures) VALUES ('ip', $2, now(), 1), ('account', $3, now(), 1)
     ON CONFLICT (scope, key) DO UPDATE SET
       failures = CASE WHEN f.window_start > now() - make_interval(secs => $1::float8 / 1000) THEN f.failures + 1 ELSE 1 END,
       window_start = CASE WHEN f.window_start > now() - make_interval(secs => $1::float8 / 1000) THEN f.window_start ELSE now() END`,
    [windowMs, failureIpKey(ip), loginKey(name)],
  );
}

// Each service has its own window setting (POP3_FAILURE_WINDOW, AUTH_FAILURE_WINDOW): a prune by
// one service must not cut another's longer window short, so nothing younger than this goes.
const PRUNE_FLOOR_MS = 24 * 3600 * 1000;

/** Deletes counters whose window started more than keepMs (and at least a day) ago. */
export async function pruneLoginFailures(db: Queryable, keepMs: number): Promise<void> {
  await db.query("DELETE FROM auth_failures WHERE window_start < now() - make_interval(secs => $1::float8 / 1000)", [Math.max(keepMs, PRUNE_FLOOR_MS)]);
}

/** POP-before-SMTP: records a successful POP3 login from this address (pop_logins, the last one per address). */
export async function recordPopLogin(db: Queryable, ip: string, accountId: number): Promise<void> {
  await db.query(
    `INSERT INTO pop_logins (ip, account_id, at) VALUES ($1, $2, now())
     ON CONFLICT (ip) DO UPDATE SET account_id = excluded.account_id, at = excluded.at`,
    [clientAddress(ip), accountId],
  );
}

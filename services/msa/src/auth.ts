import { createHmac, randomBytes } from "node:crypto";
import { setTimeout as sleep } from "node:timers/promises";
import { loginFailures, loginKey, pruneLoginFailures, recordLoginFailure, type Pool } from "@mailstack/db";
import { parseAddress, reply, verifyAccountPassword, type SmtpReply } from "@mailstack/mail";
import type { Logger } from "@mailstack/telemetry";

export interface AuthLimits {
  /** Wait before answering a failed login, multiplied by the failures so far on the connection. */
  failureDelayMs: number;
  /** Failed logins on one connection before it is closed with 421 4.7.0. */
  maxFailuresPerConnection: number;
  /** Failed logins from one IP address per window before logins from it are refused unchecked. */
  maxFailuresPerIp: number;
  /** Failed logins for one account per window before logins to it are refused unchecked. */
  maxFailuresPerAccount: number;
  windowMs: number;
  /** How long a successful login is remembered so a reconnecting client skips the scrypt check; 0 turns it off. */
  cacheTtlMs?: number;
}

/** The authenticated identity a session carries. */
export interface SubmissionUser {
  accountId: number;
  /** The account's address; also what smtp-server logs as the user. */
  username: string;
}

export type AuthOutcome =
  | { ok: true; user: SubmissionUser }
  /**
   * invalid: a wrong password, unknown or disabled account (also when its reply is the 421 that closes);
   * limited: refused unchecked by a failure limit; refused: malformed SASL data or another authorization identity.
   */
  | { ok: false; result: "invalid" | "limited" | "refused"; reply: SmtpReply };

export const AuthReplies = {
  invalid: reply(535, "5.7.8", "Authentication credentials invalid"),
  tooManyOnConnection: reply(421, "4.7.0", "Too many failed authentication attempts, closing connection"),
  limited: reply(454, "4.7.0", "Too many failed authentication attempts, try again later"),
};

/** Per-connection state: failures so far. */
export interface ConnectionAuthState {
  failures: number;
}

/**
 * Password checks for AUTH with failure limits shared by every replica (PostgreSQL counters):
 * per IP and per account in fixed windows, plus a per-connection count that closes the
 * connection after a few failures. Failures are answered slowly. Passwords are never logged.
 */
export function createAuthenticator(pool: Pool, logger: Logger, limits: AuthLimits) {
  // Successful logins (like Dovecot's auth_cache): a keyed hash of user and password, valid while
  // the stored password hash is unchanged, so a password change or reset ends it at once.
  const cacheKey = randomBytes(32);
  const cache = new Map<string, { passwordHash: string; until: number }>();
  const fingerprint = (address: string, password: string) => createHmac("sha256", cacheKey).update(`${address}\0${password}`).digest("base64");
  const cachedValid = (address: string, password: string, passwordHash: string): boolean => {
    const entry = cache.get(fingerprint(address, password));
    return !!entry && entry.passwordHash === passwordHash && entry.until > Date.now();
  };
  const remember = (address: string, password: string, passwordHash: string): void => {
    const ttl = limits.cacheTtlMs ?? 0;
    if (ttl <= 0) return;
    if (cache.size >= 10_000) cache.delete(cache.keys().next().value!);
    cache.set(fingerprint(address, password), { passwordHash, until: Date.now() + ttl });
  };

  async function fail(
    state: ConnectionAuthState, reason: string, log: Record<string, unknown>, result: "invalid" | "refused" = "invalid", answer = AuthReplies.invalid,
  ): Promise<AuthOutcome & { ok: false }> {
    state.failures++;
    logger.info({ ...log, reason, failures: state.failures }, "authentication failed");
    await sleep(Math.min(limits.failureDelayMs * state.failures, 10_000));
    if (state.failures >= limits.maxFailuresPerConnection) {
      return { ok: false, result, reply: AuthReplies.tooManyOnConnection };
    }
    return { ok: false, result, reply: answer };
  }

  return {
    /**
     * An AUTH refused before any password check (malformed SASL data, another authorization
     * identity): a failure on the connection like a wrong password (same delay, 421 after the
     * limit), so a client cannot repeat it for ever. Not counted per IP or account: no password was tried.
     */
    refuse(refusal: SmtpReply, reason: string, ip: string, state: ConnectionAuthState): Promise<AuthOutcome & { ok: false }> {
      return fail(state, reason, { ip }, "refused", refusal);
    },

    async authenticate(username: string, password: string, ip: string, state: ConnectionAuthState): Promise<AuthOutcome> {
      const parsed = parseAddress(username, { utf8: true });
      const accountKey = loginKey(username);
      const log = { user: accountKey, ip };

      const counts = await loginFailures(pool, ip, username, limits.windowMs);
      if (counts.ip >= limits.maxFailuresPerIp || counts.account >= limits.maxFailuresPerAccount) {
        const limited = counts.ip >= limits.maxFailuresPerIp ? "ip" : "account";
        state.failures++;
        logger.warn({ ...log, limited }, "authentication refused: too many recent failures");
        await sleep(Math.min(limits.failureDelayMs * state.failures, 10_000));
        if (state.failures >= limits.maxFailuresPerConnection) {
          return { ok: false, result: "limited", reply: AuthReplies.tooManyOnConnection };
        }
        return { ok: false, result: "limited", reply: AuthReplies.limited };
      }

      const row = parsed.ok
        ? (await pool.query<{ id: number; address: string; password_hash: string; disabled: boolean }>(
            "SELECT id, address, password_hash, disabled FROM accounts WHERE address = $1",
            [parsed.key],
          )).rows[0]
        : undefined;
      const valid = row && cachedValid(row.address, password, row.password_hash)
        ? true
        : await verifyAccountPassword(password, row?.password_hash);
      if (!row || !valid) {
        await recordLoginFailure(pool, ip, username, limits.windowMs);
        return fail(state, row ? "wrong password" : "unknown user", log);
      }
      if (row.disabled) {
        await recordLoginFailure(pool, ip, username, limits.windowMs);
        return fail(state, "account disabled", log);
      }
      remember(row.address, password, row.password_hash);
      logger.info(log, "authenticated");
      return { ok: true, user: { accountId: row.id, username: row.address } };
    },
  };
}

export type Authenticator = ReturnType<typeof createAuthenticator>;

/** Removes counter rows older than keepMs (at least a day, so other services' windows are not cut short). */
export async function pruneCounters(pool: Pool, keepMs: number): Promise<void> {
  await pruneLoginFailures(pool, keepMs);
  const seconds = Math.max(86_400, Math.round(keepMs / 1000));
  await pool.query("DELETE FROM submission_counters WHERE window_start < now() - make_interval(secs => $1)", [seconds]);
}

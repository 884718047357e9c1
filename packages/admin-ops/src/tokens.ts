import { createHash, randomBytes } from "node:crypto";
import { DirectoryError, getDomain, isUniqueViolation, type Queryable } from "@mailstack/db";

export interface ApiTokenRow {
  id: number;
  name: string;
  domain: string | null;
  created_at: Date;
  last_used_at: Date | null;
  revoked_at: Date | null;
}

/** Who a request acts as: an operator (domain null) or one tenant domain. */
export interface ApiPrincipal {
  tokenId: number;
  name: string;
  domain: string | null;
}

const TOKEN_PREFIX = "mst_";
const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

function hashToken(token: string): Buffer {
  return createHash("sha256").update(token, "utf8").digest();
}

/**
 * Creates a token and returns it in clear exactly once; only its sha256 is stored.
 * With `domain`, the token is a tenant token confined to that domain.
 */
export async function createApiToken(db: Queryable, name: string, options: { domain?: string | null } = {}): Promise<{ token: string; row: ApiTokenRow }> {
  if (!NAME.test(name)) throw new DirectoryError("invalid", `invalid token name: ${name} (letters, digits, . _ -; at most 64)`);
  let domain: string | null = null;
  if (options.domain != null) {
    const row = await getDomain(db, options.domain);
    if (!row) throw new DirectoryError("not-found", `no such domain: ${options.domain}`);
    domain = row.name;
  }
  const token = TOKEN_PREFIX + randomBytes(32).toString("base64url");
  try {
    const result = await db.query<ApiTokenRow>(
      `INSERT INTO api_tokens (name, token_hash, domain) VALUES ($1, $2, $3)
       RETURNING id, name, domain, created_at, last_used_at, revoked_at`,
      [name, hashToken(token), domain],
    );
    return { token, row: result.rows[0]! };
  } catch (error) {
    if (isUniqueViolation(error)) throw new DirectoryError("duplicate", `token already exists: ${name}`);
    throw error;
  }
}

export async function listApiTokens(db: Queryable): Promise<ApiTokenRow[]> {
  const result = await db.query<ApiTokenRow>(
    "SELECT id, name, domain, created_at, last_used_at, revoked_at FROM api_tokens ORDER BY name",
  );
  return result.rows;
}

/** Revokes a token by name; a revoked token is refused from the next request on. */
export async function revokeApiToken(db: Queryable, name: string): Promise<void> {
  const result = await db.query("UPDATE api_tokens SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL", [name]);
  if (!result.rowCount) throw new DirectoryError("not-found", `no such active token: ${name}`);
}

/** The principal for a presented token, or null when it is unknown or revoked. */
export async function authenticateApiToken(db: Queryable, token: string): Promise<ApiPrincipal | null> {
  if (!token.startsWith(TOKEN_PREFIX) || token.length > 200) return null;
  // last_used_at is refreshed at most once a minute so that reads do not turn into a write per request.
  const result = await db.query<{ id: number; name: string; domain: string | null }>(
    `WITH found AS (SELECT id, name, domain, last_used_at FROM api_tokens WHERE token_hash = $1 AND revoked_at IS NULL),
          touched AS (UPDATE api_tokens t SET last_used_at = now() FROM found
                      WHERE t.id = found.id AND (found.last_used_at IS NULL OR found.last_used_at < now() - interval '1 minute'))
     SELECT id, name, domain FROM found`,
    [hashToken(token)],
  );
  const row = result.rows[0];
  return row ? { tokenId: row.id, name: row.name, domain: row.domain } : null;
}

import { normalizeDomain, parseAddress, splitAddress, hashPassword } from "@mailstack/mail";
import { isUniqueViolation, type Queryable } from "./pool.ts";

/** A refused directory change: the message is one line an operator can act on. */
export class DirectoryError extends Error {
  readonly code: "invalid" | "not-found" | "duplicate" | "in-use";
  constructor(code: DirectoryError["code"], message: string) {
    super(message);
    this.name = "DirectoryError";
    this.code = code;
  }
}

export interface DomainRow {
  id: number;
  name: string;
  dkim_selector: string | null;
  dkim_algorithm: string | null;
  dkim_private_key: string | null;
  /** A new key whose TXT record is being published; the msa signs with it once activated. */
  dkim_pending_selector: string | null;
  dkim_pending_algorithm: string | null;
  dkim_pending_private_key: string | null;
  dmarc_reject_action: "reject" | "quarantine" | "accept";
  created_at: Date;
}

export interface AccountRow {
  id: number;
  domain_id: number;
  local_part: string;
  address: string;
  password_hash: string;
  apop_secret: string | null;
  quota_bytes: number | null;
  used_bytes: number;
  disabled: boolean;
  created_at: Date;
}

export interface AliasRow {
  id: number;
  domain_id: number;
  local_part: string;
  address: string;
  targets: string[];
  created_at: Date;
}

function requireDomainName(name: string): string {
  const domain = normalizeDomain(name);
  // An all-numeric top-level label is no host name (RFC 1123 2.1, RFC 3696 2): "1.2.3.4" is an address.
  if (!domain || !domain.includes(".") || /\.\d+$/.test(domain)) throw new DirectoryError("invalid", `invalid domain name: ${name}`);
  return domain;
}

function requireAddress(input: string): { local: string; domain: string; address: string; key: string } {
  const parsed = parseAddress(input, { utf8: true });
  if (!parsed.ok) throw new DirectoryError("invalid", `invalid address: ${input} (${parsed.problem})`);
  return parsed;
}

/**
 * An address of ours as the directory names it: accounts and aliases are stored (and found)
 * under their lookup key, so `Alice@d` and `alice@d` are one mailbox.
 */
function requireMailbox(input: string): { local: string; domain: string; address: string } {
  const { domain, key } = requireAddress(input);
  return { local: splitAddress(key).local, domain, address: key };
}

export async function addDomain(db: Queryable, name: string): Promise<DomainRow> {
  const domain = requireDomainName(name);
  try {
    const result = await db.query<DomainRow>("INSERT INTO domains (name) VALUES ($1) RETURNING *", [domain]);
    return result.rows[0]!;
  } catch (error) {
    if (isUniqueViolation(error)) throw new DirectoryError("duplicate", `domain already exists: ${domain}`);
    throw error;
  }
}

// Directory lists are read a page at a time (keyset pagination): the rows whose key (a domain
// name or an address) sorts after `after`, in key order. Keys are compared in PostgreSQL's "C"
// collation, by the bytes of their UTF-8 form (Unicode code point order), the same whatever the
// database's locale, so every row is on exactly one page and a page stays exact when rows before
// it were added or removed since the previous one.

export interface KeyPage {
  /** At most this many rows (a positive integer). */
  limit: number;
  /** Only the rows whose key sorts after this one. */
  after?: string | undefined;
}

export interface KeyedRows<T> {
  rows: T[];
  /** The key to pass as `after` for the page after this one; null on the last page. */
  next: string | null;
}

async function keyedRows<T extends object>(
  db: Queryable, table: "domains" | "accounts" | "aliases", key: "name" | "address",
  filter: { column: "name" | "domain_id"; value: string | number } | null, page: KeyPage | null,
): Promise<KeyedRows<T>> {
  if (page && (!Number.isSafeInteger(page.limit) || page.limit < 1)) throw new DirectoryError("invalid", `invalid page size: ${page.limit}`);
  const where: string[] = [];
  const values: unknown[] = [];
  if (filter) {
    values.push(filter.value);
    where.push(`${filter.column} = $${values.length}`);
  }
  if (page?.after !== undefined) {
    values.push(page.after);
    where.push(`${key} COLLATE "C" > $${values.length}`);
  }
  // One row more than asked tells whether there is a next page; LIMIT NULL is no limit.
  values.push(page ? page.limit + 1 : null);
  const sql = `SELECT * FROM ${table}${where.length ? ` WHERE ${where.join(" AND ")}` : ""}
    ORDER BY ${key} COLLATE "C" LIMIT $${values.length}`;
  const rows = (await db.query<T>(sql, values)).rows;
  if (!page || rows.length <= page.limit) return { rows, next: null };
  rows.length = page.limit;
  return { rows, next: (rows[rows.length - 1] as Record<string, unknown>)[key] as string };
}

/** Every domain, by name. */
export async function listDomains(db: Queryable): Promise<DomainRow[]> {
  return (await keyedRows<DomainRow>(db, "domains", "name", null, null)).rows;
}

/** A page of domains by name; `only` restricts it to that one domain (a tenant's view). */
export async function pageDomains(db: Queryable, page: KeyPage, only?: string): Promise<KeyedRows<DomainRow>> {
  return keyedRows<DomainRow>(db, "domains", "name", only === undefined ? null : { column: "name", value: only }, page);
}

export async function getDomain(db: Queryable, name: string): Promise<DomainRow | null> {
  const domain = normalizeDomain(name);
  if (!domain) return null;
  return (await db.query<DomainRow>("SELECT * FROM domains WHERE name = $1", [domain])).rows[0] ?? null;
}

async function requireDomain(db: Queryable, name: string): Promise<DomainRow> {
  const domain = await getDomain(db, name);
  if (!domain) throw new DirectoryError("not-found", `no such domain: ${name}`);
  return domain;
}

export async function removeDomain(db: Queryable, name: string): Promise<void> {
  const domain = await requireDomain(db, name);
  const used = await db.query(
    "SELECT (SELECT count(*) FROM accounts WHERE domain_id = $1) + (SELECT count(*) FROM aliases WHERE domain_id = $1) AS n",
    [domain.id],
  );
  if (Number(used.rows[0].n) > 0) {
    throw new DirectoryError("in-use", `domain ${domain.name} still has accounts or aliases; remove them first`);
  }
  // Its tenant tokens go with it: kept, they would govern the domain again if it were ever
  // added back, perhaps for someone else. One statement, so both happen or neither.
  await db.query(
    `WITH gone AS (DELETE FROM domains WHERE id = $1 RETURNING name)
     UPDATE api_tokens SET revoked_at = now() WHERE domain IN (SELECT name FROM gone) AND revoked_at IS NULL`,
    [domain.id],
  );
}

async function assertAddressFree(db: Queryable, address: string): Promise<void> {
  const taken = await db.query(
    "SELECT 1 FROM accounts WHERE address = $1 UNION ALL SELECT 1 FROM aliases WHERE address = $1",
    [address],
  );
  if (taken.rowCount) throw new DirectoryError("duplicate", `address already exists: ${address}`);
}

export interface NewAccount {
  address: string;
  password: string;
  quotaBytes?: number | null;
  apopSecret?: string | null;
}

export async function addAccount(db: Queryable, input: NewAccount): Promise<AccountRow> {
  const { local, domain, address } = requireMailbox(input.address);
  if (local === "*") throw new DirectoryError("invalid", "an account cannot be a catch-all; use an alias *@domain");
  if (!input.password) throw new DirectoryError("invalid", "the password must not be empty");
  if (input.quotaBytes != null && (!Number.isInteger(input.quotaBytes) || input.quotaBytes < 0)) {
    throw new DirectoryError("invalid", `invalid quota: ${input.quotaBytes}`);
  }
  const domainRow = await requireDomain(db, domain);
  await assertAddressFree(db, address);
  const passwordHash = await hashPassword(input.password);
  try {
    const result = await db.query<AccountRow>(
      `INSERT INTO accounts (domain_id, local_part, address, password_hash, quota_bytes, apop_secret)
       VALUES ($1, $2, $3, $4, $5, $6) RETURNING *`,
      [domainRow.id, local, address, passwordHash, input.quotaBytes ?? null, input.apopSecret ?? null],
    );
    const account = result.rows[0]!;
    await db.query("INSERT INTO folders (account_id, name) VALUES ($1, 'INBOX') ON CONFLICT DO NOTHING", [account.id]);
    return account;
  } catch (error) {
    if (isUniqueViolation(error)) throw new DirectoryError("duplicate", `address already exists: ${address}`);
    throw error;
  }
}

export async function getAccount(db: Queryable, address: string): Promise<AccountRow | null> {
  const parsed = parseAddress(address, { utf8: true });
  if (!parsed.ok) return null;
  return (await db.query<AccountRow>("SELECT * FROM accounts WHERE address = $1", [parsed.key])).rows[0] ?? null;
}

async function requireAccount(db: Queryable, address: string): Promise<AccountRow> {
  requireAddress(address);
  const account = await getAccount(db, address);
  if (!account) throw new DirectoryError("not-found", `no such account: ${address}`);
  return account;
}

export async function setAccountPassword(db: Queryable, address: string, password: string): Promise<void> {
  if (!password) throw new DirectoryError("invalid", "the password must not be empty");
  const account = await requireAccount(db, address);
  await db.query("UPDATE accounts SET password_hash = $2 WHERE id = $1", [account.id, await hashPassword(password)]);
}

export async function setAccountQuota(db: Queryable, address: string, quotaBytes: number | null): Promise<void> {
  if (quotaBytes != null && (!Number.isInteger(quotaBytes) || quotaBytes < 0)) {
    throw new DirectoryError("invalid", `invalid quota: ${quotaBytes}`);
  }
  const account = await requireAccount(db, address);
  await db.query("UPDATE accounts SET quota_bytes = $2 WHERE id = $1", [account.id, quotaBytes]);
}

/**
 * The APOP secret (RFC 1939 section 7), kept as given because APOP digests it with the server's
 * greeting; null turns APOP off for the account. It is a credential of its own: a password change
 * leaves it as it is.
 */
export async function setAccountApopSecret(db: Queryable, address: string, secret: string | null): Promise<void> {
  if (secret !== null && (!secret || secret.length > 1024)) throw new DirectoryError("invalid", "the APOP secret must be 1 to 1024 characters");
  const account = await requireAccount(db, address);
  await db.query("UPDATE accounts SET apop_secret = $2 WHERE id = $1", [account.id, secret]);
}

export async function setAccountDisabled(db: Queryable, address: string, disabled: boolean): Promise<void> {
  const account = await requireAccount(db, address);
  await db.query("UPDATE accounts SET disabled = $2 WHERE id = $1", [account.id, disabled]);
}

/** Every account (of one domain, which must exist), by address. */
export async function listAccounts(db: Queryable, domain?: string): Promise<AccountRow[]> {
  return (await keyedRows<AccountRow>(db, "accounts", "address", await domainFilter(db, domain), null)).rows;
}

/** A page of accounts (of one domain, which must exist), by address. */
export async function pageAccounts(db: Queryable, page: KeyPage, domain?: string): Promise<KeyedRows<AccountRow>> {
  return keyedRows<AccountRow>(db, "accounts", "address", await domainFilter(db, domain), page);
}

async function domainFilter(db: Queryable, domain: string | undefined): Promise<{ column: "domain_id"; value: number } | null> {
  return domain === undefined ? null : { column: "domain_id", value: (await requireDomain(db, domain)).id };
}

/** Removes an account and its mailbox entries; messages stay while other deliveries reference them. */
export async function removeAccount(db: Queryable, address: string): Promise<void> {
  const account = await requireAccount(db, address);
  await db.query("DELETE FROM accounts WHERE id = $1", [account.id]);
}


/**
 * Adds an alias. `*@domain` is the domain's catch-all. Each target is a local account,
 * another alias or a remote address; targets in served domains must exist.
 */
export async function addAlias(db: Queryable, address: string, targets: string[]): Promise<AliasRow> {
  const atSign = address.lastIndexOf("@");
  const isCatchAll = address.slice(0, atSign) === "*";
  const parsed = isCatchAll
    ? { local: "*", domain: requireDomainName(address.slice(atSign + 1)), address: "" }
    : requireMailbox(address);
  const aliasAddress = isCatchAll ? `*@${parsed.domain}` : parsed.address;
  if (targets.length === 0) throw new DirectoryError("invalid", "an alias needs at least one target");
  const parsedTargets = targets.map(requireAddress);
  if (parsedTargets.some((target) => target.key === aliasAddress)) throw new DirectoryError("invalid", `alias ${aliasAddress} cannot target itself`);
  const domainRow = await requireDomain(db, parsed.domain);
  // A target in a served domain must exist and is stored as the directory names it; a remote one
  // is stored as written (its local part's case is the remote host's business, RFC 5321 2.4).
  const normalizedTargets: string[] = [];
  for (const target of parsedTargets) {
    if (await getDomain(db, target.domain)) {
      const exists = await db.query(
        "SELECT 1 FROM accounts WHERE address = $1 UNION ALL SELECT 1 FROM aliases WHERE address = $1",
        [target.key],
      );
      if (!exists.rowCount) throw new DirectoryError("not-found", `target ${target.key} is in a served domain but is no account or alias`);
      normalizedTargets.push(target.key);
    } else {
      normalizedTargets.push(target.address);
    }
  }
  await assertAddressFree(db, aliasAddress);
  try {
    const result = await db.query<AliasRow>(
      "INSERT INTO aliases (domain_id, local_part, address, targets) VALUES ($1, $2, $3, $4) RETURNING *",
      [domainRow.id, parsed.local, aliasAddress, [...new Set(normalizedTargets)]],
    );
    return result.rows[0]!;
  } catch (error) {
    if (isUniqueViolation(error)) throw new DirectoryError("duplicate", `address already exists: ${aliasAddress}`);
    throw error;
  }
}

/** Every alias (of one domain, which must exist), by address. */
export async function listAliases(db: Queryable, domain?: string): Promise<AliasRow[]> {
  return (await keyedRows<AliasRow>(db, "aliases", "address", await domainFilter(db, domain), null)).rows;
}

/** A page of aliases (of one domain, which must exist), by address. */
export async function pageAliases(db: Queryable, page: KeyPage, domain?: string): Promise<KeyedRows<AliasRow>> {
  return keyedRows<AliasRow>(db, "aliases", "address", await domainFilter(db, domain), page);
}

export async function removeAlias(db: Queryable, address: string): Promise<void> {
  const atSign = address.lastIndexOf("@");
  const key = address.slice(0, atSign) === "*" ? `*@${requireDomainName(address.slice(atSign + 1))}` : requireMailbox(address).address;
  const result = await db.query("DELETE FROM aliases WHERE address = $1", [key]);
  if (!result.rowCount) throw new DirectoryError("not-found", `no such alias: ${address}`);
}

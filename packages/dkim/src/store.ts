import { DirectoryError, getDomain, type DomainRow, type Queryable } from "@mailstack/db";
import {
  defaultSelector, dkimDnsRecord, generateDkimKey, isDkimAlgorithm, isValidSelector, publicKeyValue,
  type DkimAlgorithm, type DkimDnsRecord,
} from "./keys.ts";
import type { DkimSigningKey } from "./sign.ts";

export interface CreateDkimKeyOptions {
  selector?: string;
  algorithm?: DkimAlgorithm;
  /** Sign with the new key at once even when the domain has one (a compromised key, say). */
  activateNow?: boolean;
}

export interface CreatedDkimKey {
  record: DkimDnsRecord;
  /**
   * "active": the msa signs with it now (the domain's first key, or activateNow). "pending": the
   * domain keeps signing with its current key until activateDomainDkimKey, once the record is
   * published.
   */
  state: "active" | "pending";
  /** With activateNow, the key it replaced: keep its record published until mail signed with it is read. */
  replaced: DkimDnsRecord | null;
}

/**
 * Generates a new key for a served domain and returns the TXT record to publish. A domain's first
 * key signs at once; a later one waits as the pending key (replacing an earlier pending one),
 * since receivers can verify a signature only once its record is in DNS. Shared by
 * `mailctl domain dkim` and the admin API.
 */
export async function createDomainDkimKey(db: Queryable, domainName: string, options: CreateDkimKeyOptions = {}): Promise<CreatedDkimKey> {
  const algorithm = options.algorithm ?? "rsa-sha256";
  if (!isDkimAlgorithm(algorithm)) throw new DirectoryError("invalid", `unknown DKIM algorithm: ${algorithm} (rsa-sha256 or ed25519-sha256)`);
  const domain = await getDomain(db, domainName);
  if (!domain) throw new DirectoryError("not-found", `no such domain: ${domainName}`);
  const selector = options.selector === undefined ? freeSelector(domain.dkim_selector) : options.selector.toLowerCase();
  if (!isValidSelector(selector)) throw new DirectoryError("invalid", `invalid DKIM selector: ${options.selector}`);
  const current = currentRecord(domain);
  if (current && selector === current.selector) {
    throw new DirectoryError("duplicate", `selector ${selector} is the current key's: a new key needs a selector of its own, so that both records can be published at once`);
  }
  const key = await generateDkimKey(algorithm);
  const record = dkimDnsRecord(domain.name, selector, algorithm, key.publicKey);
  if (!current || options.activateNow) {
    await db.query(
      `UPDATE domains SET dkim_selector = $2, dkim_algorithm = $3, dkim_private_key = $4,
              dkim_pending_selector = NULL, dkim_pending_algorithm = NULL, dkim_pending_private_key = NULL
        WHERE id = $1`,
      [domain.id, selector, algorithm, key.privateKeyPem],
    );
    return { record, state: "active", replaced: current };
  }
  await db.query("UPDATE domains SET dkim_pending_selector = $2, dkim_pending_algorithm = $3, dkim_pending_private_key = $4 WHERE id = $1", [
    domain.id, selector, algorithm, key.privateKeyPem,
  ]);
  return { record, state: "pending", replaced: null };
}

/**
 * Makes the pending key the one the msa signs with (within DKIM_KEY_CACHE). Returns the new
 * current record and the one it replaced, whose record should stay published for a few days:
 * mail signed with it is still in transit or verified later.
 */
export async function activateDomainDkimKey(db: Queryable, domainName: string): Promise<{ record: DkimDnsRecord; replaced: DkimDnsRecord | null }> {
  const domain = await getDomain(db, domainName);
  if (!domain) throw new DirectoryError("not-found", `no such domain: ${domainName}`);
  const pending = pendingRecord(domain);
  if (!pending) throw new DirectoryError("not-found", `${domain.name} has no pending DKIM key; create one with: mailctl domain dkim ${domain.name}`);
  const updated = await db.query(
    `UPDATE domains SET dkim_selector = dkim_pending_selector, dkim_algorithm = dkim_pending_algorithm, dkim_private_key = dkim_pending_private_key,
            dkim_pending_selector = NULL, dkim_pending_algorithm = NULL, dkim_pending_private_key = NULL
      WHERE id = $1 AND dkim_pending_selector = $2`,
    [domain.id, pending.selector],
  );
  if (updated.rowCount !== 1) throw new DirectoryError("in-use", `the pending DKIM key of ${domain.name} changed meanwhile; look again with --show`);
  return { record: pending, replaced: currentRecord(domain) };
}

/** The TXT record for a domain's current key, or null when the domain has none. */
export async function getDomainDkimRecord(db: Queryable, domainName: string): Promise<DkimDnsRecord | null> {
  return (await getDomainDkimRecords(db, domainName)).current;
}

/** The records of a domain's current key and of its pending key (either may be null). */
export async function getDomainDkimRecords(db: Queryable, domainName: string): Promise<{ current: DkimDnsRecord | null; pending: DkimDnsRecord | null }> {
  const domain = await getDomain(db, domainName);
  if (!domain) throw new DirectoryError("not-found", `no such domain: ${domainName}`);
  return { current: currentRecord(domain), pending: pendingRecord(domain) };
}

/** Removes a domain's keys, pending one included; its mail is no longer signed. */
export async function removeDomainDkimKey(db: Queryable, domainName: string): Promise<void> {
  const domain = await getDomain(db, domainName);
  if (!domain) throw new DirectoryError("not-found", `no such domain: ${domainName}`);
  await db.query(
    `UPDATE domains SET dkim_selector = NULL, dkim_algorithm = NULL, dkim_private_key = NULL,
            dkim_pending_selector = NULL, dkim_pending_algorithm = NULL, dkim_pending_private_key = NULL
      WHERE id = $1`,
    [domain.id],
  );
}

function currentRecord(domain: DomainRow): DkimDnsRecord | null {
  if (!domain.dkim_selector || !domain.dkim_private_key) return null;
  const algorithm = (domain.dkim_algorithm ?? "rsa-sha256") as DkimAlgorithm;
  return dkimDnsRecord(domain.name, domain.dkim_selector, algorithm, publicKeyValue(domain.dkim_private_key, algorithm));
}

function pendingRecord(domain: DomainRow): DkimDnsRecord | null {
  if (!domain.dkim_pending_selector || !domain.dkim_pending_private_key) return null;
  const algorithm = (domain.dkim_pending_algorithm ?? "rsa-sha256") as DkimAlgorithm;
  return dkimDnsRecord(domain.name, domain.dkim_pending_selector, algorithm, publicKeyValue(domain.dkim_pending_private_key, algorithm));
}

/** Today's default selector, or with a suffix when the current key already has it (a second key in a day). */
function freeSelector(taken: string | null): string {
  const base = defaultSelector();
  if (taken !== base) return base;
  for (let n = 2; ; n++) if (`${base}-${n}` !== taken) return `${base}-${n}`;
}

/** The signing keys of those of the given (normalised) domains that have one. */
export async function loadDkimKeys(db: Queryable, domains: string[]): Promise<DkimSigningKey[]> {
  if (domains.length === 0) return [];
  const result = await db.query<{ name: string; dkim_selector: string; dkim_algorithm: string | null; dkim_private_key: string }>(
    `SELECT name, dkim_selector, dkim_algorithm, dkim_private_key FROM domains
      WHERE name = ANY($1) AND dkim_private_key IS NOT NULL ORDER BY name`,
    [domains],
  );
  return result.rows.map((row) => ({
    domain: row.name,
    selector: row.dkim_selector,
    algorithm: (row.dkim_algorithm ?? "rsa-sha256") as DkimAlgorithm,
    privateKey: row.dkim_private_key,
  }));
}

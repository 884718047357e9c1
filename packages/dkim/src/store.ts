import { DirectoryError, getDomain, type Queryable } from "@mailstack/db";
import {
  defaultSelector, dkimDnsRecord, generateDkimKey, isDkimAlgorithm, isValidSelector, publicKeyValue,
  type DkimAlgorithm, type DkimDnsRecord,
} from "./keys.ts";
import type { DkimSigningKey } from "./sign.ts";

export interface CreateDkimKeyOptions {
  selector?: string;
  algorithm?: DkimAlgorithm;
}

/**
 * Generates a new key for a served domain, stores it (replacing any previous key) and returns
 * the TXT record to publish. Shared by `mailctl domain dkim` and the admin API.
 */
export async function createDomainDkimKey(db: Queryable, domainName: string, options: CreateDkimKeyOptions = {}): Promise<DkimDnsRecord> {
  const algorithm = options.algorithm ?? "rsa-sha256";
  if (!isDkimAlgorithm(algorithm)) throw new DirectoryError("invalid", `unknown DKIM algorithm: ${algorithm} (rsa-sha256 or ed25519-sha256)`);
  const selector = (options.selector ?? defaultSelector()).toLowerCase();
  if (!isValidSelector(selector)) throw new DirectoryError("invalid", `invalid DKIM selector: ${options.selector}`);
  const domain = await getDomain(db, domainName);
  if (!domain) throw new DirectoryError("not-found", `no such domain: ${domainName}`);
  const key = await generateDkimKey(algorithm);
  await db.query("UPDATE domains SET dkim_selector = $2, dkim_algorithm = $3, dkim_private_key = $4 WHERE id = $1", [
    domain.id, selector, algorithm, key.privateKeyPem,
  ]);
  return dkimDnsRecord(domain.name, selector, algorithm, key.publicKey);
}

/** The TXT record for a domain's current key, or null when the domain has none. */
export async function getDomainDkimRecord(db: Queryable, domainName: string): Promise<DkimDnsRecord | null> {
  const domain = await getDomain(db, domainName);
  if (!domain) throw new DirectoryError("not-found", `no such domain: ${domainName}`);
  if (!domain.dkim_selector || !domain.dkim_private_key) return null;
  const algorithm = (domain.dkim_algorithm ?? "rsa-sha256") as DkimAlgorithm;
  return dkimDnsRecord(domain.name, domain.dkim_selector, algorithm, publicKeyValue(domain.dkim_private_key, algorithm));
}

/** Removes a domain's key; its mail is no longer signed. */
export async function removeDomainDkimKey(db: Queryable, domainName: string): Promise<void> {
  const domain = await getDomain(db, domainName);
  if (!domain) throw new DirectoryError("not-found", `no such domain: ${domainName}`);
  await db.query("UPDATE domains SET dkim_selector = NULL, dkim_algorithm = NULL, dkim_private_key = NULL WHERE id = $1", [domain.id]);
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

import { splitAddress } from "@mailstack/mail";
import type { Queryable } from "./pool.ts";

/** Where one final recipient's copy goes. */
export type Route =
  | { kind: "local"; accountId: number; address: string }
  | { kind: "remote"; address: string; domain: string };

export type RouteRefusal = "relay-denied" | "unknown-user" | "disabled" | "loop" | "too-deep";

export type Resolution = { ok: true; routes: Route[] } | { ok: false; reason: RouteRefusal };

export interface ResolveOptions {
  /** How many alias hops may be followed. */
  maxDepth?: number;
  /** Whether an address in a domain we do not serve may be a recipient (true for authenticated submission). */
  allowRemote?: boolean;
  /** Where one address is looked up (a DirectoryCache's lookup); the database by default. */
  lookup?: (address: string) => Promise<AddressLookup>;
}

/** What the directory says about one address. */
export interface AddressLookup {
  localDomain: boolean;
  account: { id: number; disabled: boolean } | null;
  alias: string[] | null;
  catchAll: string[] | null;
}

export async function lookupAddress(db: Queryable, address: string): Promise<AddressLookup> {
  const { domain } = splitAddress(address);
  const result = await db.query(
    `SELECT EXISTS (SELECT 1 FROM domains WHERE name = $2) AS local_domain,
            (SELECT json_build_object('id', id, 'disabled', disabled) FROM accounts WHERE address = $1) AS account,
            (SELECT targets FROM aliases WHERE address = $1) AS alias,
            (SELECT targets FROM aliases WHERE address = '*@' || $2) AS catch_all`,
    [address, domain],
  );
  const row = result.rows[0];
  return { localDomain: row.local_domain, account: row.account, alias: row.alias, catchAll: row.catch_all };
}

/**
 * Resolves one normalised envelope recipient into its final routes (DESIGN.md rule 5):
 * accounts, aliases (one-to-many, many-to-one), the catch-all and remote addresses.
 * Alias chains are followed up to maxDepth; a chain that comes back to an address
 * already on its path is a loop. Duplicate final recipients are merged.
 */
export async function resolveRecipient(db: Queryable, address: string, options: ResolveOptions = {}): Promise<Resolution> {
  const maxDepth = options.maxDepth ?? 10;
  const lookup = options.lookup ?? ((current: string) => lookupAddress(db, current));
  const routes = new Map<string, Route>();
  let refusal: RouteRefusal | null = null;

  const expand = async (current: string, path: string[], viaAlias: boolean): Promise<void> => {
    if (path.includes(current)) {
      refusal ??= "loop";
      return;
    }
    if (path.length > maxDepth) {
      refusal ??= "too-deep";
      return;
    }
    const found = await lookup(current);
    if (!found.localDomain) {
      if (!viaAlias && !options.allowRemote) {
        refusal ??= "relay-denied";
        return;
      }
      const { domain } = splitAddress(current);
      routes.set(current, { kind: "remote", address: current, domain });
      return;
    }
    if (found.account) {
      if (found.account.disabled) {
        refusal ??= "disabled";
        return;
      }
      routes.set(current, { kind: "local", accountId: found.account.id, address: current });
      return;
    }
    const targets = found.alias ?? found.catchAll;
    if (!targets) {
      refusal ??= "unknown-user";
      return;
    }
    for (const target of targets) await expand(target, [...path, current], true);
  };

  await expand(address, [], false);
  if (routes.size > 0) return { ok: true, routes: [...routes.values()] };
  return { ok: false, reason: refusal ?? "unknown-user" };
}

/** True when this system serves the domain. */
export async function isLocalDomain(db: Queryable, domain: string): Promise<boolean> {
  const result = await db.query("SELECT 1 FROM domains WHERE name = $1", [domain]);
  return (result.rowCount ?? 0) > 0;
}

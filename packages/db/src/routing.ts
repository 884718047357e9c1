import { addressKey, splitAddress } from "@mailstack/mail";
import type { Queryable } from "./pool.ts";

/**
 * Where one final recipient's copy goes. A local route's address is the account's (its lookup
 * key, the Delivered-To); a remote one's is the address as given, local part's case kept, since
 * that is what the relay writes in RCPT TO. Deliveries of one message are one per route address.
 */
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
  /** Where one address's lookup key (addressKey) is looked up (a DirectoryCache's lookup); the database by default. */
  lookup?: (key: string) => Promise<AddressLookup>;
}

/** What the directory says about one address. */
export interface AddressLookup {
  localDomain: boolean;
  account: { id: number; disabled: boolean } | null;
  alias: string[] | null;
  catchAll: string[] | null;
}

/** What the directory holds under one lookup key (addressKey of a canonical address). */
export async function lookupAddress(db: Queryable, key: string): Promise<AddressLookup> {
  const { domain } = splitAddress(key);
  const result = await db.query(
    `SELECT EXISTS (SELECT 1 FROM domains WHERE name = $2) AS local_domain,
            (SELECT json_build_object('id', id, 'disabled', disabled) FROM accounts WHERE address = $1) AS account,
            (SELECT targets FROM aliases WHERE address = $1) AS alias,
            (SELECT targets FROM aliases WHERE address = '*@' || $2) AS catch_all`,
    [key, domain],
  );
  const row = result.rows[0];
  return { localDomain: row.local_domain, account: row.account, alias: row.alias, catchAll: row.catch_all };
}

/**
 * Resolves one envelope recipient (parseAddress's `address`) into its final routes (DESIGN.md
 * rule 5): accounts, aliases (one-to-many, many-to-one), the catch-all and remote addresses.
 * Addresses are looked up by their key (our local parts are case-insensitive); a remote one is
 * routed as given. Alias chains are followed up to maxDepth; a chain that comes back to an
 * address already on its path is a loop. Duplicate final recipients are merged: local ones by
 * account, remote ones only when written the same (RFC 5321 2.4: `A@r` and `a@r` may be two
 * mailboxes; Postfix keeps them apart too).
 */
export async function resolveRecipient(db: Queryable, address: string, options: ResolveOptions = {}): Promise<Resolution> {
  const maxDepth = options.maxDepth ?? 10;
  const lookup = options.lookup ?? ((key: string) => lookupAddress(db, key));
  const routes = new Map<string, Route>();
  let refusal: RouteRefusal | null = null;

  const expand = async (current: string, path: string[], viaAlias: boolean): Promise<void> => {
    const key = addressKey(current);
    if (path.includes(key)) {
      refusal ??= "loop";
      return;
    }
    if (path.length > maxDepth) {
      refusal ??= "too-deep";
      return;
    }
    const found = await lookup(key);
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
      routes.set(key, { kind: "local", accountId: found.account.id, address: key });
      return;
    }
    const targets = found.alias ?? found.catchAll;
    if (!targets) {
      refusal ??= "unknown-user";
      return;
    }
    for (const target of targets) await expand(target, [...path, key], true);
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

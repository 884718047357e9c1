import type { Queryable } from "@mailstack/db";

/**
 * Addresses an account may send as: its own address and every alias that has the account
 * among its targets. A catch-all (*@domain) gives no right to send as arbitrary addresses.
 * Both are stored under their lookup key (addressKey), and so is a local alias target; a sender
 * is compared by its key.
 */
export async function ownedAddresses(db: Queryable, accountId: number): Promise<Set<string>> {
  const result = await db.query<{ address: string }>(
    `SELECT address FROM accounts WHERE id = $1
     UNION
     SELECT al.address FROM aliases al, accounts a
      WHERE a.id = $1 AND al.local_part <> '*' AND a.address = ANY(al.targets)`,
    [accountId],
  );
  return new Set(result.rows.map((row) => row.address));
}

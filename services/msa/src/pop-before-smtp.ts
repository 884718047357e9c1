import type { Queryable } from "@mailstack/db";

/**
 * POP-before-SMTP (off by default): the accounts that logged in over POP3 from this IP
 * address within the window, most recent first. The POP3 service records its logins.
 */
export async function popBeforeSmtpAccounts(db: Queryable, ip: string, windowMs: number): Promise<Array<{ id: number; address: string }>> {
  const result = await db.query<{ id: number; address: string }>(
    `SELECT a.id, a.address FROM pop_logins p JOIN accounts a ON a.id = p.account_id
      WHERE p.client_ip = $1 AND p.logged_in_at > now() - make_interval(secs => $2::float8 / 1000) AND NOT a.disabled
      GROUP BY a.id, a.address ORDER BY max(p.logged_in_at) DESC LIMIT 20`,
    [ip, windowMs],
  );
  return result.rows;
}

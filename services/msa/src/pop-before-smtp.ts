import { clientAddress, type Queryable } from "@mailstack/db";

/**
 * POP-before-SMTP (off by default): the accounts that logged in over POP3 from this IP
 * address within the window (the last one). The POP3 service records its logins.
 */
export async function popBeforeSmtpAccounts(db: Queryable, ip: string, windowMs: number): Promise<Array<{ id: number; address: string }>> {
  // pop_logins (migration 030) keeps the last POP3 login per client IP.
  const result = await db.query<{ id: number; address: string }>(
    `SELECT a.id, a.address FROM pop_logins p JOIN accounts a ON a.id = p.account_id
      WHERE p.ip = $1::inet AND p.at > now() - make_interval(secs => $2::float8 / 1000) AND NOT a.disabled`,
    [clientAddress(ip), windowMs],
  );
  return result.rows;
}

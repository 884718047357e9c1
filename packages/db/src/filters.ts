import { parseAddress } from "@mailstack/mail";
import { DirectoryError, getAccount } from "./directory.ts";
import type { Queryable } from "./pool.ts";

/** One per-account filter rule (migration 020). The MDA applies the first matching rule. */
export interface FilterRuleRow {
  id: number;
  account_id: number;
  position: number;
  condition: "header" | "size";
  header_name: string | null;
  op: "contains" | "is" | "exists" | "over" | "under";
  value: string | null;
  size_bytes: number | null;
  action: "fileinto" | "discard" | "forward";
  folder: string | null;
  forward_to: string | null;
  keep_copy: boolean;
  created_at: Date;
}

export type FilterCondition =
  | { kind: "header"; header: string; op: "contains" | "is"; value: string }
  | { kind: "header"; header: string; op: "exists" }
  | { kind: "size"; op: "over" | "under"; bytes: number };

export type FilterAction =
  | { kind: "fileinto"; folder: string }
  | { kind: "discard" }
  | { kind: "forward"; to: string; keepCopy?: boolean };

export interface NewFilterRule {
  condition: FilterCondition;
  action: FilterAction;
}

const HEADER_NAME = /^[\x21-\x39\x3b-\x7e]{1,76}$/;
const MAX_RULES_PER_ACCOUNT = 200;

/**
 * Folder names double as relative paths in mailbox exports (`<folder>/<uid>.eml`,
 * `<folder>.mbox`): no empty, "." or ".." segments, no backslash or control characters.
 */
export function isFolderPath(name: string): boolean {
  return name.length > 0 && name.length <= 255 && !/[\x00-\x1f\x7f\\]/.test(name)
    && name.split("/").every((segment) => segment !== "" && segment !== "." && segment !== "..");
}

/** INBOX is one folder however it is written (RFC 3501 5.1); every other name is kept as given. */
export function canonicalFolderName(name: string): string {
  return name.toUpperCase() === "INBOX" ? "INBOX" : name;
}

/** Folder names of filter rules: a folder path, IMAP-ish hierarchy with '/', no IMAP wildcards. */
function requireFolder(name: string): string {
  const folder = name.trim();
  if (folder.length > 200 || !isFolderPath(folder) || /[*%]/.test(folder)) throw new DirectoryError("invalid", `invalid folder name: ${name}`);
  return canonicalFolderName(folder);
}

async function requireAccount(db: Queryable, address: string): Promise<{ id: number; address: string }> {
  const account = await getAccount(db, address);
  if (!account) throw new DirectoryError("not-found", `no such account: ${address}`);
  return account;
}

/** Appends a rule to the end of an account's list. */
export async function addFilterRule(db: Queryable, accountAddress: string, rule: NewFilterRule): Promise<FilterRuleRow> {
  const account = await requireAccount(db, accountAddress);
  const accountId = account.id;
  const c = rule.condition;
  let headerName: string | null = null;
  let value: string | null = null;
  let sizeBytes: number | null = null;
  if (c.kind === "header") {
    headerName = c.header.trim().toLowerCase();
    if (!HEADER_NAME.test(headerName)) throw new DirectoryError("invalid", `invalid header name: ${c.header}`);
    if (c.op !== "exists") {
      value = c.value;
      if (value.length === 0 || value.length > 1000) throw new DirectoryError("invalid", "a header value of 1 to 1000 characters is needed");
    }
  } else {
    if (!Number.isInteger(c.bytes) || c.bytes < 0) throw new DirectoryError("invalid", `invalid size: ${c.bytes}`);
    sizeBytes = c.bytes;
  }
  const a = rule.action;
  let folder: string | null = null;
  let forwardTo: string | null = null;
  if (a.kind === "fileinto") folder = requireFolder(a.folder);
  if (a.kind === "forward") {
    const parsed = parseAddress(a.to, { utf8: true });
    if (!parsed.ok) throw new DirectoryError("invalid", `invalid forward address: ${a.to} (${parsed.problem})`);
    forwardTo = parsed.address;
    if (parsed.key === account.address) throw new DirectoryError("invalid", "an account cannot forward to itself");
  }
  const count = await db.query<{ n: number; next: number }>(
    "SELECT count(*)::int AS n, coalesce(max(position) + 1, 0)::int AS next FROM filter_rules WHERE account_id = $1",
    [accountId],
  );
  if (count.rows[0]!.n >= MAX_RULES_PER_ACCOUNT) throw new DirectoryError("invalid", `an account may have at most ${MAX_RULES_PER_ACCOUNT} rules`);
  const position = count.rows[0]!.next;
  const result = await db.query<FilterRuleRow>(
    `INSERT INTO filter_rules (account_id, position, condition, header_name, op, value, size_bytes, action, folder, forward_to, keep_copy)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING *`,
    [accountId, position, c.kind, headerName, c.op, value, sizeBytes, a.kind, folder, forwardTo, a.kind === "forward" ? Boolean(a.keepCopy) : false],
  );
  return result.rows[0]!;
}

/** An account's rules in the order the MDA applies them. */
export async function listFilterRules(db: Queryable, accountAddress: string): Promise<FilterRuleRow[]> {
  const accountId = (await requireAccount(db, accountAddress)).id;
  return (await db.query<FilterRuleRow>("SELECT * FROM filter_rules WHERE account_id = $1 ORDER BY position", [accountId])).rows;
}

/** Removes one rule of an account, by its id. */
export async function removeFilterRule(db: Queryable, accountAddress: string, ruleId: number): Promise<void> {
  const accountId = (await requireAccount(db, accountAddress)).id;
  const result = await db.query("DELETE FROM filter_rules WHERE account_id = $1 AND id = $2", [accountId, ruleId]);
  if (!result.rowCount) throw new DirectoryError("not-found", `no rule ${ruleId} for ${accountAddress}`);
}

/** One line describing a rule, for mailctl and logs. */
export function describeFilterRule(rule: FilterRuleRow): string {
  const condition = rule.condition === "size"
    ? `size ${rule.op} ${rule.size_bytes}`
    : rule.op === "exists" ? `header ${rule.header_name} exists` : `header ${rule.header_name} ${rule.op} ${JSON.stringify(rule.value)}`;
  const action = rule.action === "fileinto"
    ? `fileinto ${JSON.stringify(rule.folder)}`
    : rule.action === "forward" ? `forward ${rule.forward_to}${rule.keep_copy ? " (keep copy)" : ""}` : "discard";
  return `#${rule.id}\t${rule.position}\tif ${condition} then ${action}`;
}

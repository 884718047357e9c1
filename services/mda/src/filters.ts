import type { FilterRuleRow } from "@mailstack/db";

/** What the MDA does with one copy after the rules ran. */
export type Decision =
  | { kind: "file"; folder: string; ruleId: number | null; reason: "default" | "rule" | "spam" }
  | { kind: "discard"; ruleId: number }
  | { kind: "forward"; ruleId: number; to: string; keepCopy: boolean };

export interface FilterInput {
  /** Top-level header fields, lower-cased names, decoded values (ParsedMessage.headers). */
  headers: Array<[string, string]>;
  /** Size of the mailbox copy in bytes. */
  size: number;
  spam: boolean;
  /** The delivery's folder as routed at accept time (INBOX, or Junk for a DMARC quarantine). */
  defaultFolder: string;
}

function matches(rule: FilterRuleRow, input: FilterInput): boolean {
  if (rule.condition === "size") {
    const bytes = rule.size_bytes ?? 0;
    return rule.op === "over" ? input.size > bytes : input.size < bytes;
  }
  const values = input.headers.filter(([name]) => name === rule.header_name).map(([, value]) => value);
  if (rule.op === "exists") return values.length > 0;
  const wanted = (rule.value ?? "").toLowerCase();
  if (rule.op === "is") return values.some((value) => value.trim().toLowerCase() === wanted);
  return values.some((value) => value.toLowerCase().includes(wanted));
}

/**
 * Applies an account's rules in order; the first match decides. With no match, a message
 * flagged X-Spam-Flag: YES goes to Junk, anything else to the delivery's own folder.
 */
export function decide(rules: FilterRuleRow[], input: FilterInput): Decision {
  for (const rule of [...rules].sort((a, b) => a.position - b.position)) {
    if (!matches(rule, input)) continue;
    if (rule.action === "discard") return { kind: "discard", ruleId: rule.id };
    if (rule.action === "forward") return { kind: "forward", ruleId: rule.id, to: rule.forward_to!, keepCopy: rule.keep_copy };
    return { kind: "file", folder: rule.folder!, ruleId: rule.id, reason: "rule" };
  }
  if (input.spam) return { kind: "file", folder: "Junk", ruleId: null, reason: "spam" };
  return { kind: "file", folder: input.defaultFolder || "INBOX", ruleId: null, reason: "default" };
}

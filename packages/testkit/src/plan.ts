import type { Pool } from "@mailstack/db";

interface PlanNode {
  "Node Type": string;
  "Relation Name"?: string;
  "Index Name"?: string;
  "Actual Rows": number;
  "Actual Loops": number;
  "Rows Removed by Filter"?: number;
  Plans?: PlanNode[];
}

export interface TableScans {
  /** Rows of the table the plan's scans looked at: returned or filtered out. */
  rows: number;
  /** Each scan of the table: its node type, and its index in parentheses. */
  scans: string[];
}

/** Runs a statement under EXPLAIN ANALYZE and says how it read one table (for plan tests). */
export async function analyzeTableScans(pool: Pool, statement: { text: string; values: unknown[] }, table: string): Promise<TableScans> {
  const explained = await pool.query(`EXPLAIN (ANALYZE, FORMAT JSON) ${statement.text}`, statement.values);
  const found: TableScans = { rows: 0, scans: [] };
  const walk = (node: PlanNode) => {
    if (node["Relation Name"] === table) {
      found.rows += (node["Actual Rows"] + (node["Rows Removed by Filter"] ?? 0)) * node["Actual Loops"];
      found.scans.push(`${node["Node Type"]}${node["Index Name"] ? ` (${node["Index Name"]})` : ""}`);
    }
    for (const child of node.Plans ?? []) walk(child);
  };
  walk((explained.rows[0]["QUERY PLAN"] as { Plan: PlanNode }[])[0]!.Plan);
  return found;
}

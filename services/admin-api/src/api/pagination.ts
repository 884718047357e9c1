// Keyset pagination for the lists: `?limit=N&after=KEY` gives the N objects whose key sorts after
// KEY, and `next` is the key to pass for the page after that (null on the last page). The paging
// itself is done by PostgreSQL (`@mailstack/db` pageDomains/pageAccounts/pageAliases and
// `@mailstack/queue` listQueue), so a page reads about N rows however long the list is.

import type { KeyPage } from "@mailstack/db";
import { rowId } from "./schemas.ts";

export const DEFAULT_PAGE = 1000;
export const MAX_PAGE = 10_000;

const limit = { type: "integer", minimum: 1, maximum: MAX_PAGE, default: DEFAULT_PAGE } as const;

/** Query-string properties of the directory lists (domains by name, accounts and aliases by address). */
export const pageQuery = {
  limit,
  after: { type: "string", minLength: 1, maxLength: 320 },
} as const;

export const nextKey = { type: ["string", "null"], description: "pass as `after` for the next page; null on the last page" } as const;

/** Query-string properties of the queue list, whose key is the delivery id. */
export const idPageQuery = {
  limit,
  after: { ...rowId, minimum: 0, description: "only deliveries with a greater id: the `next` of the previous page" },
} as const;

export const nextId = { type: ["integer", "null"], description: "pass as `after` for the next page; null on the last page" } as const;

export interface PageRequest {
  limit?: number;
  after?: string;
}

export function keyPage(request: PageRequest): KeyPage {
  return { limit: request.limit ?? DEFAULT_PAGE, after: request.after };
}

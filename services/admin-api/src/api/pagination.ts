// Keyset pagination for the directory lists: `?limit=N&after=KEY` gives the N objects whose key
// (a domain name or an address) sorts after KEY, and `next` is the key to pass for the page after
// that (null on the last page). Keys are compared by UTF-16 code units, not by the database's
// collation, so that every object is on exactly one page whatever the locale, and a page stays
// correct when objects before it were added or removed meanwhile.

export const DEFAULT_PAGE = 1000;
export const MAX_PAGE = 10_000;

/** Query-string properties every paginated list accepts. */
export const pageQuery = {
  limit: { type: "integer", minimum: 1, maximum: MAX_PAGE, default: DEFAULT_PAGE },
  after: { type: "string", minLength: 1, maxLength: 320 },
} as const;

export const nextKey = { type: ["string", "null"], description: "pass as `after` for the next page; null on the last page" } as const;

export interface PageRequest {
  limit?: number;
  after?: string;
}

export function page<T>(items: T[], key: (item: T) => string, request: PageRequest): { items: T[]; next: string | null } {
  const limit = request.limit ?? DEFAULT_PAGE;
  const sorted = items.map((item) => ({ item, key: key(item) })).sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0));
  const rest = request.after === undefined ? sorted : sorted.filter((entry) => entry.key > request.after!);
  const taken = rest.slice(0, limit);
  return { items: taken.map((entry) => entry.item), next: rest.length > limit ? taken[taken.length - 1]!.key : null };
}

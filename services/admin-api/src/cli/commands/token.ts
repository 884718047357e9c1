import { createApiToken, listApiTokens, revokeApiToken } from "@mailstack/admin-ops";
import { parse } from "../args.ts";
import { register } from "../registry.ts";

register(
  {
    name: "token create",
    usage: "token create NAME [--domain DOMAIN]   (prints the token once; --domain confines it to one tenant domain)",
    async run(args, { pool, out }) {
      const { values, positionals } = parse(args, { domain: { type: "string" } }, { min: 1, max: 1 });
      const { token, row } = await createApiToken(pool, positionals[0]!, { domain: values.domain ?? null });
      out(`created token ${row.name} (${row.domain ? `domain ${row.domain}` : "operator: all domains"}); it is shown only this once:`);
      out(token);
    },
  },
  {
    name: "token list",
    usage: "token list",
    async run(args, { pool, out }) {
      parse(args, {}, { min: 0, max: 0 });
      for (const t of await listApiTokens(pool)) {
        const scope = t.domain ? `domain=${t.domain}` : "operator";
        const used = t.last_used_at ? `last used ${t.last_used_at.toISOString()}` : "never used";
        const state = t.revoked_at ? `\trevoked ${t.revoked_at.toISOString()}` : "";
        out(`${t.name}\t${scope}\tcreated ${t.created_at.toISOString()}\t${used}${state}`);
      }
    },
  },
  {
    name: "token revoke",
    usage: "token revoke NAME",
    async run(args, { pool, out }) {
      const { positionals } = parse(args, {}, { min: 1, max: 1 });
      await revokeApiToken(pool, positionals[0]!);
      out(`revoked token ${positionals[0]}`);
    },
  },
);

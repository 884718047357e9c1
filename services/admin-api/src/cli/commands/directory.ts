import {
  addAccount, addAlias, addDomain, pageAccounts, pageAliases, pageDomains, removeAccount, removeAlias,
  removeDomain, setAccountApopSecret, setAccountDisabled, setAccountPassword, setAccountQuota, type KeyedRows,
} from "@mailstack/db";
import { parse, sizeArgument } from "../args.ts";
import { register, UsageError, type CommandContext } from "../registry.ts";

function formatBytes(bytes: number | null): string {
  if (bytes === null) return "unlimited";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${Number.isInteger(value) ? value : value.toFixed(1)}${units[unit]}`;
}

async function passwordFrom(values: { password?: string | undefined; "password-stdin"?: boolean | undefined }, context: CommandContext): Promise<string> {
  if (values.password !== undefined && values["password-stdin"]) throw new UsageError("give --password or --password-stdin, not both");
  if (values.password !== undefined) return values.password;
  if (values["password-stdin"]) {
    const text = (await context.readStdin()).replace(/\r?\n$/, "");
    if (!text) throw new UsageError("no password on standard input");
    return text;
  }
  throw new UsageError("a password is needed: --password P or --password-stdin");
}

/** Prints a whole list, read a page at a time so that a long one is never in memory at once. */
async function printAll<T>(read: (after: string | undefined) => Promise<KeyedRows<T>>, print: (row: T) => void): Promise<void> {
  let after: string | undefined;
  do {
    const page = await read(after);
    for (const row of page.rows) print(row);
    after = page.next ?? undefined;
  } while (after !== undefined);
}

const PAGE = 1000;

const passwordOptions = { password: { type: "string" }, "password-stdin": { type: "boolean" } } as const;

register(
  {
    name: "domain add",
    usage: "domain add NAME",
    async run(args, { pool, out }) {
      const { positionals } = parse(args, {}, { min: 1, max: 1 });
      const domain = await addDomain(pool, positionals[0]!);
      out(`added domain ${domain.name}`);
    },
  },
  {
    name: "domain list",
    usage: "domain list",
    async run(args, { pool, out }) {
      parse(args, {}, { min: 0, max: 0 });
      await printAll((after) => pageDomains(pool, { limit: PAGE, after }), (domain) => {
        out(`${domain.name}${domain.dkim_selector ? `\tdkim=${domain.dkim_selector}` : ""}`);
      });
    },
  },
  {
    name: "domain remove",
    usage: "domain remove NAME",
    async run(args, { pool, out }) {
      const { positionals } = parse(args, {}, { min: 1, max: 1 });
      await removeDomain(pool, positionals[0]!);
      out(`removed domain ${positionals[0]}`);
    },
  },
  {
    name: "account add",
    usage: "account add ADDRESS (--password P | --password-stdin) [--quota SIZE]",
    async run(args, context) {
      const { values, positionals } = parse(args, { ...passwordOptions, quota: { type: "string" } }, { min: 1, max: 1 });
      const password = await passwordFrom(values, context);
      const quotaBytes = values.quota === undefined ? null : sizeArgument(values.quota, "quota");
      const account = await addAccount(context.pool, { address: positionals[0]!, password, quotaBytes });
      context.out(`added account ${account.address} (quota ${formatBytes(account.quota_bytes)})`);
    },
  },
  {
    name: "account passwd",
    usage: "account passwd ADDRESS [--password P | --password-stdin]   (reads standard input when neither is given)",
    async run(args, context) {
      const { values, positionals } = parse(args, passwordOptions, { min: 1, max: 1 });
      const password = values.password === undefined && !values["password-stdin"]
        ? await passwordFrom({ "password-stdin": true }, context)
        : await passwordFrom(values, context);
      await setAccountPassword(context.pool, positionals[0]!, password);
      context.out(`password changed for ${positionals[0]}`);
    },
  },
  {
    name: "account apop",
    usage: "account apop ADDRESS [--disable]   (the APOP secret from standard input; --disable turns APOP off)",
    async run(args, context) {
      const { values, positionals } = parse(args, { disable: { type: "boolean" } }, { min: 1, max: 1 });
      const secret = values.disable ? null : (await context.readStdin()).replace(/\r?\n$/, "");
      if (secret === "") throw new UsageError("no APOP secret on standard input");
      await setAccountApopSecret(context.pool, positionals[0]!, secret);
      context.out(secret === null ? `APOP disabled for ${positionals[0]}` : `APOP secret set for ${positionals[0]}`);
    },
  },
  {
    name: "account quota",
    usage: "account quota ADDRESS SIZE|unlimited",
    async run(args, { pool, out }) {
      const { positionals } = parse(args, {}, { min: 2, max: 2 });
      const quota = positionals[1] === "unlimited" ? null : sizeArgument(positionals[1]!, "quota");
      await setAccountQuota(pool, positionals[0]!, quota);
      out(`quota of ${positionals[0]} set to ${formatBytes(quota)}`);
    },
  },
  {
    name: "account disable",
    usage: "account disable ADDRESS",
    async run(args, { pool, out }) {
      const { positionals } = parse(args, {}, { min: 1, max: 1 });
      await setAccountDisabled(pool, positionals[0]!, true);
      out(`disabled ${positionals[0]}`);
    },
  },
  {
    name: "account enable",
    usage: "account enable ADDRESS",
    async run(args, { pool, out }) {
      const { positionals } = parse(args, {}, { min: 1, max: 1 });
      await setAccountDisabled(pool, positionals[0]!, false);
      out(`enabled ${positionals[0]}`);
    },
  },
  {
    name: "account list",
    usage: "account list [DOMAIN]",
    async run(args, { pool, out }) {
      const { positionals } = parse(args, {}, { min: 0, max: 1 });
      await printAll((after) => pageAccounts(pool, { limit: PAGE, after }, positionals[0]), (account) => {
        const state = account.disabled ? "\tdisabled" : "";
        out(`${account.address}\tused ${formatBytes(account.used_bytes)} of ${formatBytes(account.quota_bytes)}${state}`);
      });
    },
  },
  {
    name: "account remove",
    usage: "account remove ADDRESS",
    async run(args, { pool, out }) {
      const { positionals } = parse(args, {}, { min: 1, max: 1 });
      await removeAccount(pool, positionals[0]!);
      out(`removed account ${positionals[0]}`);
    },
  },
  {
    name: "alias add",
    usage: "alias add ADDRESS TARGET...   (*@domain is the catch-all)",
    async run(args, { pool, out }) {
      const { positionals } = parse(args, {}, { min: 2, max: 1000 });
      const alias = await addAlias(pool, positionals[0]!, positionals.slice(1));
      out(`added alias ${alias.address} -> ${alias.targets.join(", ")}`);
    },
  },
  {
    name: "alias list",
    usage: "alias list [DOMAIN]",
    async run(args, { pool, out }) {
      const { positionals } = parse(args, {}, { min: 0, max: 1 });
      await printAll((after) => pageAliases(pool, { limit: PAGE, after }, positionals[0]), (alias) => out(`${alias.address}\t${alias.targets.join(", ")}`));
    },
  },
  {
    name: "alias remove",
    usage: "alias remove ADDRESS",
    async run(args, { pool, out }) {
      const { positionals } = parse(args, {}, { min: 1, max: 1 });
      await removeAlias(pool, positionals[0]!);
      out(`removed alias ${positionals[0]}`);
    },
  },
);

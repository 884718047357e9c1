import { addFilterRule, describeFilterRule, listFilterRules, removeFilterRule, type FilterAction, type FilterCondition } from "@mailstack/db";
import { parse, sizeArgument } from "../args.ts";
import { register, UsageError } from "../registry.ts";

const addOptions = {
  header: { type: "string" },
  contains: { type: "string" },
  is: { type: "string" },
  exists: { type: "boolean" },
  "size-over": { type: "string" },
  "size-under": { type: "string" },
  fileinto: { type: "string" },
  discard: { type: "boolean" },
  forward: { type: "string" },
  keep: { type: "boolean" },
} as const;

register(
  {
    name: "filter add",
    usage:
      "filter add ADDRESS (--header NAME (--contains TEXT | --is TEXT | --exists) | --size-over SIZE | --size-under SIZE)" +
      " (--fileinto FOLDER | --discard | --forward ADDRESS [--keep])   (rules apply in order; the first match decides)",
    async run(args, { pool, out }) {
      const { values, positionals } = parse(args, addOptions, { min: 1, max: 1 });
      const conditions = [values.header !== undefined, values["size-over"] !== undefined, values["size-under"] !== undefined].filter(Boolean).length;
      if (conditions !== 1) throw new UsageError("give exactly one condition: --header, --size-over or --size-under");
      let condition: FilterCondition;
      if (values.header !== undefined) {
        const tests = [values.contains !== undefined, values.is !== undefined, Boolean(values.exists)].filter(Boolean).length;
        if (tests !== 1) throw new UsageError("--header needs exactly one of --contains, --is or --exists");
        if (values.exists) condition = { kind: "header", header: values.header, op: "exists" };
        else if (values.is !== undefined) condition = { kind: "header", header: values.header, op: "is", value: values.is };
        else condition = { kind: "header", header: values.header, op: "contains", value: values.contains! };
      } else if (values["size-over"] !== undefined) {
        condition = { kind: "size", op: "over", bytes: sizeArgument(values["size-over"], "size") };
      } else {
        condition = { kind: "size", op: "under", bytes: sizeArgument(values["size-under"]!, "size") };
      }
      const actions = [values.fileinto !== undefined, Boolean(values.discard), values.forward !== undefined].filter(Boolean).length;
      if (actions !== 1) throw new UsageError("give exactly one action: --fileinto, --discard or --forward");
      if (values.keep && values.forward === undefined) throw new UsageError("--keep only goes with --forward");
      let action: FilterAction;
      if (values.fileinto !== undefined) action = { kind: "fileinto", folder: values.fileinto };
      else if (values.discard) action = { kind: "discard" };
      else action = { kind: "forward", to: values.forward!, keepCopy: Boolean(values.keep) };
      const rule = await addFilterRule(pool, positionals[0]!, { condition, action });
      out(`added rule ${describeFilterRule(rule)}`);
    },
  },
  {
    name: "filter list",
    usage: "filter list ADDRESS",
    async run(args, { pool, out }) {
      const { positionals } = parse(args, {}, { min: 1, max: 1 });
      for (const rule of await listFilterRules(pool, positionals[0]!)) out(describeFilterRule(rule));
    },
  },
  {
    name: "filter remove",
    usage: "filter remove ADDRESS RULE_ID",
    async run(args, { pool, out }) {
      const { positionals } = parse(args, {}, { min: 2, max: 2 });
      const id = Number(positionals[1]!.replace(/^#/, ""));
      if (!Number.isSafeInteger(id) || id <= 0) throw new UsageError(`invalid rule id: ${positionals[1]}`);
      await removeFilterRule(pool, positionals[0]!, id);
      out(`removed rule #${id} of ${positionals[0]}`);
    },
  },
);

import { DirectoryError } from "@mailstack/db";
import { parseDuration } from "@mailstack/config";
import { QueueError, deleteDelivery, deliveriesOfQueueId, listQueue, purgeFinishedMessages, retryDeliveries, showDelivery } from "@mailstack/queue";
import { parse } from "../args.ts";
import { register, UsageError } from "../registry.ts";

/** Queue refusals exit like directory refusals (1), with their message. */
async function refusals<T>(fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (error) {
    if (error instanceof QueueError) throw new DirectoryError(error.kind === "conflict" ? "in-use" : error.kind, error.message);
    throw error;
  }
}

/** A delivery id (digits) or a message's queue id (all its deliveries). */
async function idsOf(pool: Parameters<typeof deliveriesOfQueueId>[0], text: string): Promise<number[]> {
  if (/^\d+$/.test(text)) {
    const id = Number(text);
    if (!Number.isSafeInteger(id)) throw new UsageError(`invalid id: ${text} (too large)`);
    return [id];
  }
  if (!/^[0-9A-Z]+$/.test(text)) throw new UsageError(`invalid id: ${text} (a delivery id or a queue id)`);
  return refusals(() => deliveriesOfQueueId(pool, text));
}

const time = (date: Date | null) => (date ? date.toISOString().replace(/\.\d+Z$/, "Z") : "-");

register(
  {
    name: "queue list",
    usage: "queue list [--state queued|deferred|delivered|bounced|cancelled] [--domain D] [--limit N] [--after ID]   (oldest first)",
    async run(args, { pool, out }) {
      const { values } = parse(args, { state: { type: "string" }, domain: { type: "string" }, limit: { type: "string" }, after: { type: "string" } }, { min: 0, max: 0 });
      const limit = values.limit === undefined ? 1000 : Number(values.limit);
      if (!Number.isSafeInteger(limit) || limit < 1 || limit > 100_000) throw new UsageError(`invalid --limit: ${values.limit} (1 to 100000)`);
      const after = values.after === undefined ? undefined : Number(values.after);
      if (after !== undefined && (!/^\d+$/.test(values.after!) || !Number.isSafeInteger(after))) throw new UsageError(`invalid --after: ${values.after} (a delivery id)`);
      const page = await refusals(() => listQueue(pool, { state: values.state, domain: values.domain, limit, after }));
      for (const e of page.entries) {
        out([e.id, e.queueId, e.state, `attempts=${e.attempts}`, `next=${time(e.nextAttemptAt)}`, `<${e.sender}> -> <${e.recipient}>`, e.lastReply ?? ""].join("\t"));
      }
      if (page.entries.length === 0) out(after === undefined ? "queue is empty" : "no more entries");
      if (page.next !== null) out(`more entries: add --after ${page.next}`);
    },
  },
  {
    name: "queue show",
    usage: "queue show ID   (a delivery id, or a queue id for all its deliveries)",
    async run(args, { pool, out }) {
      const { positionals } = parse(args, {}, { min: 1, max: 1 });
      for (const id of await idsOf(pool, positionals[0]!)) {
        const d = await refusals(() => showDelivery(pool, id));
        out(`delivery ${d.id} (message ${d.queueId})`);
        out(`  from:        <${d.sender}>`);
        out(`  to:          <${d.recipient}> (${d.kind}${d.remoteDomain ? ` ${d.remoteDomain}` : ""})`);
        out(`  state:       ${d.state}${d.lastStatus ? ` ${d.lastStatus}` : ""}`);
        out(`  attempts:    ${d.attempts}, next ${time(d.nextAttemptAt)}`);
        out(`  remote MTA:  ${d.remoteMta ?? "-"}`);
        out(`  last reply:  ${d.lastReply ?? "-"}`);
        out(`  DSN:         ${d.dsnState ?? "-"}`);
        out(`  size:        ${d.size}`);
        out("  journey:");
        for (const e of d.events) out(`    ${time(e.at)}  ${e.event.padEnd(10)} ${e.service.padEnd(13)} ${e.reply ?? ""}`.trimEnd());
      }
    },
  },
  {
    name: "queue retry",
    usage: "queue retry ID | --domain D   (deferred deliveries become due now)",
    async run(args, { pool, out }) {
      const { values, positionals } = parse(args, { domain: { type: "string" } }, { min: 0, max: 1 });
      if ((values.domain === undefined) === (positionals.length === 0)) throw new UsageError("give an ID or --domain D");
      let ids: number[] = [];
      if (values.domain !== undefined) {
        ids = await refusals(() => retryDeliveries(pool, { domain: values.domain! }));
      } else {
        for (const id of await idsOf(pool, positionals[0]!)) ids.push(...(await refusals(() => retryDeliveries(pool, { id }))));
      }
      out(`${ids.length} deliver${ids.length === 1 ? "y" : "ies"} due now${ids.length ? `: ${ids.join(", ")}` : ""}`);
    },
  },
  {
    name: "queue delete",
    usage: "queue delete ID   (cancels a waiting delivery, without a bounce)",
    async run(args, { pool, out }) {
      const { positionals } = parse(args, {}, { min: 1, max: 1 });
      for (const id of await idsOf(pool, positionals[0]!)) {
        await refusals(() => deleteDelivery(pool, id));
        out(`cancelled delivery ${id}`);
      }
    },
  },
  {
    name: "queue purge",
    usage: "queue purge [--older-than DURATION]   (deletes finished messages in no mailbox, default older than 30d)",
    async run(args, { pool, out }) {
      const { values } = parse(args, { "older-than": { type: "string" } }, { min: 0, max: 0 });
      const retentionMs = parseDuration(values["older-than"] ?? "30d");
      if (retentionMs === null) throw new UsageError(`invalid --older-than: ${values["older-than"]} (for example 30d, 12h)`);
      const count = await purgeFinishedMessages(pool, { retentionMs });
      out(`${count} finished message${count === 1 ? "" : "s"} purged`);
    },
  },
);

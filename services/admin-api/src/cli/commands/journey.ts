import { messageJourney } from "@mailstack/admin-ops";
import { DirectoryError } from "@mailstack/db";
import { parse } from "../args.ts";
import { register } from "../registry.ts";

register({
  name: "journey",
  usage: "journey QUEUE-ID|MESSAGE-ID   (every recipient's state and events, and the trace in Jaeger)",
  async run(args, { pool, out, env }) {
    const { positionals } = parse(args, {}, { min: 1, max: 1 });
    const id = positionals[0]!;
    const query = /[@<]/.test(id) ? { messageId: id } : { queueId: id };
    const messages = await messageJourney(pool, query, { jaegerUrl: env.JAEGER_UI_URL ?? "http://localhost:16686" });
    if (messages.length === 0) throw new DirectoryError("not-found", `no message ${id}`);
    for (const m of messages) {
      out(`message ${m.queueId} ${m.messageId ?? "(no Message-ID)"} from <${m.envelopeFrom}> via ${m.source}, ${m.size} bytes, ${m.receivedAt}`);
      out(`  trace: ${m.traceUrl ?? "(none)"}`);
      for (const e of m.events) out(`  ${e.at}  ${e.event.padEnd(10)} ${e.service.padEnd(13)} ${e.reply ?? ""}`.trimEnd());
      for (const r of m.recipients) {
        const via = r.recipient === r.finalRecipient ? "" : ` (for ${r.recipient})`;
        out(`  <${r.finalRecipient}>${via} ${r.kind} ${r.state}, attempts ${r.attempts}${r.lastReply ? `, last reply: ${r.lastReply}` : ""}`);
        for (const e of r.events) out(`    ${e.at}  ${e.event.padEnd(10)} ${e.service.padEnd(13)} ${e.reply ?? ""}`.trimEnd());
      }
    }
  },
});

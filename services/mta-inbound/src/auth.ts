import { promises as dns } from "node:dns";
import { authenticate, type AuthenticateResult } from "mailauth";
import type { Pool } from "@mailstack/db";
import { SmtpError, type IncomingMessage, type TransformResult } from "@mailstack/smtp-intake";
import type { Logger } from "@mailstack/telemetry";

export type DnsResolver = (name: string, rrtype: string) => Promise<string[][] | string[]>;

/** A DNS resolver for mailauth that asks the given servers ("ip" or "ip:port"), or the system's when empty. */
export function createResolver(servers: string[], timeoutMs = 2_000): DnsResolver {
  const resolver = new dns.Resolver({ timeout: timeoutMs, tries: 2 });
  if (servers.length > 0) resolver.setServers(servers);
  return (name, rrtype) => resolver.resolve(name, rrtype) as Promise<string[][] | string[]>;
}

export interface AuthCheckOptions {
  pool: Pool;
  logger: Logger;
  /** Our host name, the authserv-id of Authentication-Results (RFC 8601). */
  hostname: string;
  resolver: DnsResolver;
  /** Upper bound for all DNS work of one message; after it the message goes on with temperror. */
  timeoutMs?: number;
}

type Action = "reject" | "quarantine" | "accept";
const STRICTNESS: Record<Action, number> = { accept: 0, quarantine: 1, reject: 2 };

/** What is stored on messages.auth_results: the verdicts, not mailauth's whole output. */
export function summarize(result: AuthenticateResult): Record<string, unknown> {
  return {
    spf: result.spf ? { result: result.spf.status.result, domain: result.spf.domain } : null,
    dkim: (result.dkim?.results ?? []).map((r) => ({ result: r.status.result, domain: r.signingDomain, selector: r.selector })),
    dmarc: result.dmarc ? { result: result.dmarc.status.result, policy: result.dmarc.policy, domain: result.dmarc.domain } : null,
    arc: result.arc ? { result: result.arc.status?.result } : null,
  };
}

/**
 * The inbound transformMessage hook: SPF (RFC 7208), DKIM (RFC 6376) and DMARC (RFC 7489)
 * with mailauth, an Authentication-Results: header (RFC 8601) on top of the message, the
 * verdicts on the message row, and the DMARC policy: a failing message whose domain says
 * p=reject is refused 550 5.7.1, or filed to Junk, or accepted, as the recipient domain's
 * dmarc_reject_action says (the strictest of the recipient domains wins); p=quarantine goes
 * to Junk. A temporary DNS failure never refuses mail.
 */
export function createAuthCheck(options: AuthCheckOptions): (message: IncomingMessage) => Promise<TransformResult> {
  const timeoutMs = options.timeoutMs ?? 15_000;
  return async (message) => {
    let result: AuthenticateResult;
    try {
      result = await withTimeout(
        authenticate(message.raw, {
          ip: message.session.clientIp,
          helo: message.session.helo ?? undefined,
          sender: message.sender || undefined,
          mta: options.hostname,
          resolver: options.resolver,
          disableBimi: true,
          disableArc: false,
        }),
        timeoutMs,
      );
    } catch (error) {
      options.logger.warn({ err: error, queueId: message.queueId }, "message authentication failed; accepting with temperror");
      const header = `Authentication-Results: ${options.hostname}; spf=temperror; dkim=temperror; dmarc=temperror\r\n`;
      return { raw: Buffer.concat([Buffer.from(header), message.raw]), authResults: { error: String((error as Error).message) } };
    }
    const summary = summarize(result);
    const raw = Buffer.concat([Buffer.from(result.headers, "utf8"), message.raw]);
    const dmarc = result.dmarc;
    if (!dmarc || dmarc.status.result !== "fail") return { raw, authResults: summary };

    if (dmarc.policy === "reject") {
      const action = await strictestAction(options.pool, message.recipients.map((r) => r.recipient.slice(r.recipient.lastIndexOf("@") + 1)));
      summary.dmarcAction = action;
      if (action === "reject") {
        throw new SmtpError({ code: 550, enhanced: "5.7.1", text: `Message rejected by the DMARC policy of ${dmarc.domain}` });
      }
      if (action === "quarantine") return { raw, authResults: summary, folder: "Junk" };
      return { raw, authResults: summary };
    }
    if (dmarc.policy === "quarantine") {
      summary.dmarcAction = "quarantine";
      return { raw, authResults: summary, folder: "Junk" };
    }
    return { raw, authResults: summary };
  };
}

async function strictestAction(pool: Pool, domains: string[]): Promise<Action> {
  const result = await pool.query<{ dmarc_reject_action: Action }>("SELECT dmarc_reject_action FROM domains WHERE name = ANY($1)", [[...new Set(domains)]]);
  let action: Action = result.rowCount ? "accept" : "reject";
  for (const row of result.rows) if (STRICTNESS[row.dmarc_reject_action] > STRICTNESS[action]) action = row.dmarc_reject_action;
  return action;
}

function withTimeout<T>(promise: Promise<T>, ms: number): Promise<T> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms`)), ms);
    promise.then(
      (value) => {
        clearTimeout(timer);
        resolve(value);
      },
      (error) => {
        clearTimeout(timer);
        reject(error);
      },
    );
  });
}

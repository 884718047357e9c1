import { promises as dns } from "node:dns";
import { createRequire } from "node:module";
import { isIP } from "node:net";
import type { ARCResult, AuthenticateResult, DKIMVerifyResult, DMARCResult, SPFResult } from "mailauth";
import type { Pool } from "@mailstack/db";
import { addressesNamedIn, headerBoundary, parseMailboxList } from "@mailstack/mail";
import { SmtpError, hasBareLineEnding, withoutOurResults, type IncomingMessage, type TransformResult } from "@mailstack/smtp-intake";
import type { Logger } from "@mailstack/telemetry";

export type DnsResolver = (name: string, rrtype: string) => Promise<string[][] | string[]>;

export interface ResolverOptions {
  timeoutMs?: number;
  /** How long answers (and "no such name/record" answers) are reused. 0 turns the cache off. */
  cacheTtlMs?: number;
  cacheEntries?: number;
}

/**
 * A DNS resolver for mailauth that asks the given servers ("ip" or "ip:port"), or the
 * system's when empty, with a small bounded cache: the same sender domains come back all
 * the time, and SPF, DKIM and DMARC records change rarely. Concurrent lookups of one name
 * share one query; temporary failures are not cached.
 */
export function createResolver(servers: string[], options: ResolverOptions = {}): DnsResolver {
  const resolver = new dns.Resolver({ timeout: options.timeoutMs ?? 2_000, tries: 2 });
  if (servers.length > 0) resolver.setServers(servers);
  const ttl = options.cacheTtlMs ?? 60_000;
  const max = options.cacheEntries ?? 10_000;
  const cache = new Map<string, { expires: number; answer: Promise<string[][] | string[]> }>();
  return (name, rrtype) => {
    if (ttl <= 0) return resolver.resolve(name, rrtype) as Promise<string[][] | string[]>;
    const key = `${rrtype} ${name.toLowerCase()}`;
    const now = Date.now();
    const hit = cache.get(key);
    if (hit && hit.expires > now) return hit.answer;
    if (hit) cache.delete(key);
    const answer = resolver.resolve(name, rrtype) as Promise<string[][] | string[]>;
    cache.set(key, { expires: now + ttl, answer });
    answer.catch((error: { code?: string }) => {
      if (error?.code !== "ENOTFOUND" && error?.code !== "ENODATA") cache.delete(key);
    });
    if (cache.size > max) cache.delete(cache.keys().next().value!);
    return answer;
  };
}

export interface AuthCheckOptions {
  pool: Pool;
  logger: Logger;
  /** Our host name, the authserv-id of Authentication-Results (RFC 8601). */
  hostname: string;
  resolver: DnsResolver;
  /** Upper bound for all DNS work of one message; after it the message goes on with temperror. */
  timeoutMs?: number;
  /** How long an SPF verdict is reused (the DNS cache's TTL); 0 evaluates every message. */
  spfVerdictTtlMs?: number;
}

// mailauth's authenticate() also loads BIMI (VMC certificates, XML, an HTTP client: ~18 MB
// resident) and looks up BIMI records; the pieces are used directly instead.
const require = createRequire(import.meta.url);
const { dkimVerify } = require("mailauth/lib/dkim/verify.js") as {
  dkimVerify(input: Buffer, options: Record<string, unknown>): Promise<DKIMVerifyResult & { arc?: unknown }>;
};
const { DkimVerifier } = require("mailauth/lib/dkim/dkim-verifier.js") as {
  DkimVerifier: new (options: Record<string, unknown>) => {
    messageHeaders(headers: unknown): Promise<void>;
    nextChunk(chunk: Buffer): Promise<void>;
    finalChunk(): Promise<void>;
    headerFrom: string[];
    envelopeFrom: string | false;
    results: DKIMVerifyResult["results"];
    arc: unknown;
  };
};
const { parseHeaders } = require("mailauth/lib/tools.js") as { parseHeaders(header: Buffer): unknown };
const { spf } = require("mailauth/lib/spf/index.js") as { spf(options: Record<string, unknown>): Promise<SPFResult & { info: string; header: string }> };
const { dmarc } = require("mailauth/lib/dmarc/index.js") as { dmarc(options: Record<string, unknown>): Promise<DMARCResult & { info?: string }> };
// The From: parser mailauth itself uses (its own dependency), so that both read a From: alike.
const addressparser = createRequire(require.resolve("mailauth"))("nodemailer/lib/addressparser") as (text: string) => ParsedMailbox[];
interface ParsedMailbox {
  address?: string;
  group?: ParsedMailbox[];
}
const { arc } = require("mailauth/lib/arc/index.js") as { arc(chain: unknown, options: Record<string, unknown>): Promise<ARCResult & { info?: string }> };

export interface SpfCheck {
  ip: string;
  helo: string;
  sender: string | undefined;
  mta: string;
  resolver: DnsResolver;
}

type SpfOutcome = SPFResult & { info: string; header: string };

/**
 * SPF verdicts reused for a while per client IP, HELO name and envelope sender: a peer sends
 * the same sender's mail again and again, and the evaluation (policy parsing, macro expansion,
 * the cached DNS answers) costs more CPU than the rest of the check. Everything the verdict
 * depends on is in the key (macros can name the sender, the HELO and the IP), and it is kept no
 * longer than the DNS answers it came from (DNS_CACHE_TTL). A temporary error is never kept.
 */
export class SpfVerdicts {
  private readonly ttlMs: number;
  private readonly maxEntries: number;
  private readonly verdicts = new Map<string, { expires: number; result: SpfOutcome }>();

  constructor(ttlMs: number, maxEntries = 10_000) {
    this.ttlMs = ttlMs;
    this.maxEntries = maxEntries;
  }

  async check(input: SpfCheck): Promise<SpfOutcome> {
    if (this.ttlMs <= 0) return spf({ ...input });
    const key = `${input.ip}\u0000${input.helo}\u0000${input.sender ?? ""}\u0000${input.mta}`;
    const now = Date.now();
    const kept = this.verdicts.get(key);
    if (kept && kept.expires > now) return kept.result;
    if (kept) this.verdicts.delete(key);
    const result = await spf({ ...input });
    if (result.status.result !== "temperror") {
      if (this.verdicts.size >= this.maxEntries) this.verdicts.delete(this.verdicts.keys().next().value!);
      this.verdicts.set(key, { expires: now + this.ttlMs, result });
    }
    return result;
  }
}

export interface VerifyInput {
  raw: Buffer;
  ip: string;
  helo: string | null;
  /** The envelope sender, '' for <>. */
  sender: string;
  /** authserv-id for Authentication-Results. */
  mta: string;
  resolver: DnsResolver;
  /** Reused SPF verdicts; every message is evaluated afresh without it. */
  spfVerdicts?: SpfVerdicts;
  /**
   * Time for SPF, DKIM and ARC together, and again for DMARC. A check that runs out of it is
   * temperror and passes nothing; DMARC is evaluated all the same, so that a sender cannot turn
   * a From: domain's policy off by making its own DNS slow. Unbounded when not given.
   */
  timeoutMs?: number;
}

/** The promise's value, or what `fallback` gives (a value, or a rejection) when it takes longer than ms. */
function bounded<T>(promise: Promise<T>, ms: number | undefined, fallback: () => T | Promise<T>): Promise<T> {
  if (ms === undefined) return promise;
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => resolve(fallback()), ms);
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

/**
 * SPF, DKIM, ARC and DMARC in the order and with the header format of mailauth's
 * authenticate(), without BIMI. Returns mailauth's result shape.
 */
export async function verifyMessage(input: VerifyInput): Promise<AuthenticateResult & { incomplete?: boolean }> {
  const sender = input.sender || undefined;
  // Whether SPF, DKIM or ARC ran out of time (and so passed nothing they might have passed).
  let incomplete = false;
  const timedOut = <T>(value: T): T => {
    incomplete = true;
    return value;
  };
  const deadline = input.timeoutMs === undefined ? undefined : Date.now() + input.timeoutMs;
  const left = () => (deadline === undefined ? undefined : Math.max(0, deadline - Date.now()));
  let helo = input.helo ?? input.ip;
  if (isIP(helo)) helo = `[${helo}]`;
  const spfInput = { ip: input.ip, helo, sender, mta: input.mta, resolver: input.resolver };
  // SPF and DKIM side by side, under one deadline.
  const [dkimResult, spfResult] = await Promise.all([
    bounded(verifyDkim(input.raw, { resolver: input.resolver, sender, minBitLength: 1024 }), left(), () => timedOut({ results: [] } as unknown as DKIMVerifyResult & { arc?: unknown })),
    bounded(input.spfVerdicts ? input.spfVerdicts.check(spfInput) : spf(spfInput), left(), () => timedOut(spfTimedOut(spfInput))),
  ]);
  type ArcOutcome = (ARCResult & { info?: string }) | false;
  const arcResult: ArcOutcome = dkimResult.arc === undefined
    ? false
    : await bounded<ArcOutcome>(arc(dkimResult.arc, { resolver: input.resolver, minBitLength: 1024 }), left(), () => timedOut(false));
  const results: string[] = [];
  const headers: string[] = [];
  for (const row of dkimResult.results ?? []) results.push((row as { info: string }).info);
  if (spfResult) {
    results.push(spfResult.info);
    headers.push(spfResult.header);
  }
  if (arcResult && arcResult.info) results.push(arcResult.info);
  // DMARC for every From: domain, the strictest outcome counting (RFC 7489 6.6.1). mailauth's
  // check gives up on more than one From: address, and its list leaves out group members, so a
  // second From: field (or address) of the sender's own, or a group (`From: x: a@d;`), would
  // otherwise turn DMARC off for a spoofed address, the one clients show.
  // Every From: domain at once, in a time of its own (a slow domain among them does not keep the
  // others from counting).
  const dmarcTime = input.timeoutMs;
  const dmarcResults = await Promise.all(
    onePerDomain(fromAddresses(input.raw)).map((headerFrom) =>
      bounded(
        dmarc({
          headerFrom,
          spfDomains: spfResult?.status.result === "pass" && spfResult.domain ? [spfResult.domain] : [],
          dkimDomains: (dkimResult.results ?? [])
            .filter((r) => r.status.result === "pass")
            .map((r) => ({ id: (r as { id?: string }).id, domain: r.signingDomain, aligned: r.status.aligned, underSized: (r.status as { underSized?: unknown }).underSized })),
          arcResult,
          resolver: input.resolver,
        }),
        dmarcTime,
        () => dmarcTimedOut(headerFrom),
      ),
    ),
  );
  let dmarcResult: (DMARCResult & { info?: string }) | false = false;
  for (const result of dmarcResults) {
    if (result.info) results.push(result.info);
    if (!dmarcResult || dmarcRank(result) > dmarcRank(dmarcResult)) dmarcResult = result;
  }
  headers.push(`Authentication-Results: ${input.mta};\r\n ${results.join(";\r\n ")}`);
  return { dkim: dkimResult, spf: spfResult, dmarc: dmarcResult, arc: arcResult, bimi: false, headers: `${headers.join("\r\n")}\r\n`, incomplete };
}

/** SPF that ran out of time: temperror, which passes nothing. */
function spfTimedOut(input: { ip: string; helo: string; sender: string | undefined; mta: string }): SPFResult & { info: string; header: string } {
  const domain = input.sender ? input.sender.slice(input.sender.lastIndexOf("@") + 1).toLowerCase() : input.helo;
  const mailFrom = input.sender ?? `postmaster@${input.helo}`;
  return {
    status: { result: "temperror", comment: `${input.mta}: DNS lookups timed out` },
    domain,
    info: `spf=temperror (${input.mta}: DNS lookups timed out) smtp.mailfrom=${mailFrom}`,
    header: `Received-SPF: temperror (${input.mta}: DNS lookups timed out) client-ip=${input.ip};`,
  } as unknown as SPFResult & { info: string; header: string };
}

/** DMARC for a From: address whose lookups ran out of time. */
function dmarcTimedOut(headerFrom: string): DMARCResult & { info: string } {
  const domain = headerFrom.slice(headerFrom.lastIndexOf("@") + 1).toLowerCase();
  return { status: { result: "temperror", comment: "DNS lookups timed out" }, domain, info: `dmarc=temperror header.from=${domain}` } as unknown as DMARCResult & { info: string };
}

/**
 * Every address of the message's From: fields, the members of a group (RFC 6854) included. A
 * field that is not a plain RFC 5322 mailbox-list (parseMailboxList) may show mail clients
 * another address than the one a lenient parser finds ('"x" <a@b> <ceo@bank>', an address in a
 * comment or hidden in an encoded-word): then every address-like text in it counts too, so
 * that DMARC is evaluated for each domain a reader could be shown.
 */
function fromAddresses(raw: Buffer): string[] {
  const boundary = headerBoundary(raw);
  const header = raw.subarray(0, boundary ? boundary.headerEnd : raw.length).toString("utf8");
  const flatten = (list: ParsedMailbox[]): string[] => list.flatMap((entry) => (entry.group ? flatten(entry.group) : entry.address ? [entry.address] : []));
  return header
    .split(/\r?\n(?![ \t])/)
    .filter((field) => /^from[ \t]*:/i.test(field))
    .flatMap((field) => {
      const value = field.slice(field.indexOf(":") + 1);
      const strict = parseMailboxList(value);
      if (strict.ok) return strict.mailboxes.map((mailbox) => mailbox.address);
      return [...flatten(addressparser(value.replace(/\r?\n[ \t]/g, " ").trim())), ...addressesNamedIn(value)];
    });
}

/** The most distinct From: domains a message may name (each costs DMARC lookups). */
export const MAX_FROM_DOMAINS = 20;

/** The first From: address of each domain (domains compared without regard to case). */
function onePerDomain(addresses: string[]): string[] {
  const byDomain = new Map<string, string>();
  for (const address of addresses) {
    const domain = address.slice(address.lastIndexOf("@") + 1).toLowerCase();
    if (!byDomain.has(domain)) byDomain.set(domain, address);
  }
  return [...byDomain.values()];
}

/** How strict a DMARC outcome is: a failure under p=reject, then p=quarantine, then any failure. */
function dmarcRank(result: DMARCResult): number {
  if (result.status.result !== "fail") return 0;
  return result.policy === "reject" ? 3 : result.policy === "quarantine" ? 2 : 1;
}

/**
 * mailauth's DKIM (and ARC chain) verification, driven directly: its verifier gets the parsed
 * header block and the whole body in one call, as its stream parser would hand them over, but
 * without that parser's byte-by-byte passes over the message (for an unsigned message they were
 * all of the work). Messages reach this hook with CRLF line endings only (smtp-intake rejects or
 * normalises bare ones), which is what the parser's line-break pass would have produced; one
 * with a bare CR or LF all the same, without an empty line, or starting with one (which that
 * parser does not take for the end of an empty header section) goes through the stream parser.
 */
export async function verifyDkim(raw: Buffer, options: Record<string, unknown>): Promise<DKIMVerifyResult & { arc?: unknown }> {
  const boundary = headerBoundary(raw);
  if (!boundary || boundary.headerEnd === 0 || hasBareLineEnding(raw)) return dkimVerify(raw, options);
  const start = boundary.bodyStart;
  const verifier = new DkimVerifier(options);
  await verifier.messageHeaders(parseHeaders(raw.subarray(0, start)));
  limitSignatures(verifier as unknown as SignatureLists);
  if (start < raw.length) await verifier.nextChunk(raw.subarray(start));
  await verifier.finalChunk();
  const result = { headerFrom: verifier.headerFrom, envelopeFrom: verifier.envelopeFrom, results: verifier.results } as DKIMVerifyResult & { arc?: unknown };
  Object.defineProperty(result, "arc", { enumerable: false, value: verifier.arc });
  return result;
}

/**
 * DKIM-Signature fields verified per message, the top-most (newest) first, as OpenDKIM's
 * MaximumSignaturesToVerify. Each costs a DNS lookup and, with an l= or canonicalization of its
 * own, a hash of the whole body: 200 signatures with distinct l= on a 10 MB body held the event
 * loop (every session of the process) for 11 s; any sender could send that.
 */
export const MAX_DKIM_SIGNATURES = 5;

interface SignatureLists {
  signatureHeaders: Array<{ type: string; bodyHashKey?: string }>;
  bodyHashes: Map<string, unknown>;
  sealBodyHashKey?: string;
}

/** Drops the DKIM signatures past MAX_DKIM_SIGNATURES (ARC's stay) and the body hashes only they needed, before the body is hashed. */
function limitSignatures(verifier: SignatureLists): void {
  let dkim = 0;
  verifier.signatureHeaders = verifier.signatureHeaders.filter((signature) => signature.type !== "DKIM" || ++dkim <= MAX_DKIM_SIGNATURES);
  const needed = new Set(verifier.signatureHeaders.map((signature) => signature.bodyHashKey));
  if (verifier.sealBodyHashKey) needed.add(verifier.sealBodyHashKey);
  for (const key of [...verifier.bodyHashes.keys()]) {
    if (!needed.has(key)) verifier.bodyHashes.delete(key);
  }
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
 * to Junk. A temporary DNS failure never refuses mail for good (see verifyMessage on time limits).
 */
export function createAuthCheck(options: AuthCheckOptions): (message: IncomingMessage) => Promise<TransformResult> {
  const timeoutMs = options.timeoutMs ?? 15_000;
  const spfVerdicts = new SpfVerdicts(options.spfVerdictTtlMs ?? 0);
  return async (message) => {
    // DMARC is looked up for every From: domain, all at once: a From: listing thousands made as
    // many DNS queries (to servers the sender may run) for one message.
    if (onePerDomain(fromAddresses(message.raw)).length > MAX_FROM_DOMAINS) {
      throw new SmtpError({ code: 550, enhanced: "5.7.1", text: `More than ${MAX_FROM_DOMAINS} domains in the From: field, not accepted` });
    }
    let result: AuthenticateResult & { incomplete?: boolean };
    try {
      // verifyMessage bounds its own parts (twice timeoutMs at most); this is a last resort.
      result = await withTimeout(
        verifyMessage({
          raw: message.raw,
          ip: message.session.clientIp,
          helo: message.session.helo,
          sender: message.sender,
          mta: options.hostname,
          resolver: options.resolver,
          spfVerdicts,
          timeoutMs,
        }),
        2 * timeoutMs + 5_000,
      );
    } catch (error) {
      options.logger.warn({ err: error, queueId: message.queueId }, "message authentication failed; accepting with temperror");
      const header = `Authentication-Results: ${options.hostname}; spf=temperror; dkim=temperror; dmarc=temperror\r\n`;
      return { raw: Buffer.concat([Buffer.from(header), withoutOurResults(message.raw, options.hostname)]), authResults: { error: String((error as Error).message) } };
    }
    const summary = summarize(result);
    const raw = Buffer.concat([Buffer.from(result.headers, "utf8"), withoutOurResults(message.raw, options.hostname)]);
    const dmarc = result.dmarc;
    if (!dmarc || dmarc.status.result !== "fail") return { raw, authResults: summary };

    if (dmarc.policy === "reject") {
      const action = await strictestAction(options.pool, message.recipients.map((r) => r.recipient.slice(r.recipient.lastIndexOf("@") + 1)));
      summary.dmarcAction = action;
      if (action === "reject" && result.incomplete) {
        // SPF or DKIM ran out of time: it might have passed. Not a permanent refusal for what
        // may be a DNS problem, but not delivered either (a slow DNS would switch the policy off).
        throw new SmtpError({ code: 451, enhanced: "4.7.1", text: `The DMARC policy of ${dmarc.domain} could not be checked in time, try again later` });
      }
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
  return bounded(promise, ms, () => Promise.reject(new Error(`timed out after ${ms} ms`)));
}

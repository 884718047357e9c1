import dns from "node:dns";
import net from "node:net";
import { SpanKind, withSpan } from "@mailstack/telemetry";
import type { TlsMode } from "./smtp-client.ts";

/** One host to try, with its addresses in the order to try them. */
export interface TargetHost {
  hostname: string;
  preference: number;
  addresses: string[];
}

export interface Destination {
  hosts: TargetHost[];
  port: number;
  tls: TlsMode;
  tlsVerify: boolean;
  auth: { user: string; pass: string } | null;
  /** True when a smart host replaced the MX lookup. */
  smartHost: boolean;
}

export interface SmartHost {
  host: string;
  port: number;
  tls: TlsMode;
  tlsVerify: boolean;
  auth: { user: string; pass: string } | null;
}

export interface DestinationConfig {
  /** host[:port] of the DNS servers; empty means the system resolver. */
  dnsServers: string[];
  dnsTimeoutMs: number;
  /** The SMTP port of MX hosts (25). */
  destPort: number;
  /** Domains whose MX hosts must offer STARTTLS. */
  requireTlsDomains: string[];
  /** A smart host for every domain. */
  smartHost: SmartHost | null;
  /** Smart hosts for single domains (win over the global one). */
  domainSmartHosts: Map<string, SmartHost>;
}

/** Why no host can be tried. temporary: DNS trouble, try later; otherwise the domain cannot receive mail. */
export class DestinationError extends Error {
  readonly temporary: boolean;
  readonly status: string;
  constructor(message: string, temporary: boolean, status: string) {
    super(message);
    this.name = "DestinationError";
    this.temporary = temporary;
    this.status = status;
  }
}

const NO_DATA = new Set<string>([dns.NODATA, dns.NOTFOUND]);

function shuffle<T>(items: T[]): T[] {
  for (let i = items.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [items[i], items[j]] = [items[j]!, items[i]!];
  }
  return items;
}

/** Resolves MX records and host addresses with the configured DNS servers. */
export class DestinationResolver {
  readonly config: DestinationConfig;
  /** Our own host name (MAIL_HOSTNAME), lower case: an MX naming it is ourselves. */
  readonly ownName: string;
  private readonly resolver: dns.promises.Resolver;
  private own: { at: number; addresses: Promise<Set<string>> } | null = null;

  constructor(config: DestinationConfig, ownName = "") {
    this.config = config;
    this.ownName = ownName.toLowerCase().replace(/\.$/, "");
    this.resolver = new dns.promises.Resolver({ timeout: config.dnsTimeoutMs, tries: 2 });
    // node's setServers accepts "1.2.3.4:5353" and "[::1]:5353".
    if (config.dnsServers.length > 0) this.resolver.setServers(config.dnsServers);
  }

  /** Where mail for domain goes: a smart host, the MX hosts in RFC 5321 5.1 order, or the implicit MX. */
  async resolve(domain: string): Promise<Destination> {
    const smart = this.config.domainSmartHosts.get(domain) ?? this.config.smartHost;
    if (smart) {
      const addresses = net.isIP(smart.host) ? [smart.host] : await this.addresses(smart.host);
      if (addresses.length === 0) throw new DestinationError(`smart host ${smart.host} has no address`, true, "4.4.3");
      return {
        hosts: [{ hostname: smart.host, preference: 0, addresses }],
        port: smart.port,
        tls: smart.tls,
        tlsVerify: smart.tlsVerify,
        auth: smart.auth,
        smartHost: true,
      };
    }
    const tls: TlsMode = this.config.requireTlsDomains.includes(domain) ? "required" : "opportunistic";
    const base = { port: this.config.destPort, tls, tlsVerify: false, auth: null, smartHost: false };
    return withSpan("dns resolve destination", { kind: SpanKind.CLIENT, attributes: { "mail.destination.domain": domain } }, async (span) => {
      const mx = await this.lookup(() => this.resolver.resolveMx(domain), `MX ${domain}`);
      if (mx === null) {
        // No MX: the domain itself is the implicit MX (RFC 5321 5.1).
        if (domain.toLowerCase() === this.ownName) throw this.loop(domain);
        const [addresses, own] = await Promise.all([this.addresses(domain), this.ownAddresses()]);
        if (addresses.length === 0) throw new DestinationError(`${domain} has no MX and no address records`, false, "5.1.2");
        if (addresses.some((a) => own.has(a))) throw this.loop(domain);
        span.setAttribute("mail.destination.implicit_mx", true);
        return { ...base, hosts: [{ hostname: domain, preference: 0, addresses }] };
      }
      if (mx.length === 1 && (mx[0]!.exchange === "" || mx[0]!.exchange === ".")) {
        throw new DestinationError(`${domain} does not accept mail (null MX, RFC 7505)`, false, "5.1.10");
      }
      const records = mx.filter((r) => r.exchange !== "" && r.exchange !== ".");
      const byPreference = new Map<number, string[]>();
      for (const record of records) {
        const list = byPreference.get(record.priority) ?? [];
        list.push(record.exchange.toLowerCase().replace(/\.$/, ""));
        byPreference.set(record.priority, list);
      }
      const hosts: TargetHost[] = [];
      for (const preference of [...byPreference.keys()].sort((a, b) => a - b)) {
        for (const hostname of shuffle(byPreference.get(preference)!)) {
          hosts.push({ hostname, preference, addresses: [] });
        }
      }
      const troubled = new Set<TargetHost>();
      const [own] = await Promise.all([
        this.ownAddresses(),
        ...hosts.map(async (host) => {
          // An MX names a host, never an address (RFC 1123 2.1: a host name is never dotted-decimal):
          // "MX 10 192.0.2.1" is a broken record, skipped as Postfix and Exim do.
          if (net.isIP(host.hostname) || host.hostname === this.ownName) return;
          try {
            host.addresses = await this.addresses(host.hostname);
          } catch {
            troubled.add(host); // SERVFAIL, timeout: this host may well have addresses
          }
        }),
      ]);
      // RFC 5321 5.1: when we are one of the MX hosts (by one of our names or addresses), that record
      // and every one at the same or a higher preference value are discarded (a backup MX at our
      // preference is ourselves); nothing left means the mail would loop back to us, and it is
      // returned as undeliverable.
      const ours = hosts.filter((h) => h.hostname === this.ownName || h.addresses.some((a) => own.has(a)));
      const ownPreference = Math.min(Infinity, ...ours.map((h) => h.preference));
      const candidates = hosts.filter((h) => h.preference < ownPreference);
      if (candidates.length === 0 && ours.length > 0) throw this.loop(domain);
      const reachable = candidates.filter((h) => h.addresses.length > 0);
      span.setAttribute("mail.destination.mx_count", candidates.length);
      if (reachable.length === 0) {
        if (candidates.some((h) => troubled.has(h))) throw new DestinationError(`no MX host of ${domain} has an address (DNS lookups failed)`, true, "4.4.3");
        // RFC 5321 5.1: MX records none of which is usable are an error. Every answer was final
        // (no such host, no A/AAAA, an address in place of a name): bounce, as Postfix and Exim do.
        throw new DestinationError(`no MX host of ${domain} exists with an address (${candidates.map((h) => h.hostname).join(", ")})`, false, "5.4.4");
      }
      // An address behind two MX names is tried once, for the more preferred one (Postfix does the
      // same): a dead or refusing server is not waited for twice in one attempt.
      const tried = new Set<string>();
      for (const host of reachable) {
        host.addresses = host.addresses.filter((address) => !tried.has(address));
        for (const address of host.addresses) tried.add(address);
      }
      return { ...base, hosts: reachable.filter((h) => h.addresses.length > 0) };
    });
  }

  /** X.4.6 "routing loop detected" (RFC 3463): the best MX (by name or address) of a domain we do not serve is this host. */
  private loop(domain: string): DestinationError {
    return new DestinationError(`mail for ${domain} loops back to myself (its best MX is this host, ${this.ownName})`, false, "5.4.6");
  }

  /** The addresses our own name resolves to (kept a minute); none when it does not resolve. */
  private ownAddresses(): Promise<Set<string>> {
    if (this.ownName === "") return Promise.resolve(new Set());
    if (!this.own || Date.now() - this.own.at > 60_000) {
      this.own = { at: Date.now(), addresses: this.addresses(this.ownName).then((list) => new Set(list), () => new Set()) };
    }
    return this.own.addresses;
  }

  /** A and AAAA records of a host (IPv4 first); [] when it has none; throws on DNS trouble. */
  async addresses(hostname: string): Promise<string[]> {
    if (net.isIP(hostname)) return [hostname];
    const [v4, v6] = await Promise.allSettled([
      this.lookup(() => this.resolver.resolve4(hostname), `A ${hostname}`),
      this.lookup(() => this.resolver.resolve6(hostname), `AAAA ${hostname}`),
    ]);
    const found = [...(v4.status === "fulfilled" ? v4.value ?? [] : []), ...(v6.status === "fulfilled" ? v6.value ?? [] : [])];
    if (found.length === 0) {
      const failure = [v4, v6].find((r) => r.status === "rejected");
      if (failure) throw (failure as PromiseRejectedResult).reason;
    }
    return found;
  }

  /** Runs a query; null for "no such name / no such record", DestinationError (temporary) for DNS failures. */
  private async lookup<T>(query: () => Promise<T>, what: string): Promise<T | null> {
    try {
      return await query();
    } catch (error) {
      const code = (error as { code?: string }).code ?? "";
      if (NO_DATA.has(code)) return null;
      throw new DestinationError(`DNS lookup ${what} failed: ${code || (error as Error).message}`, true, "4.4.3");
    }
  }
}

/** Parses "host:port", "[v6]:port" or "host" (default port). */
export function parseHostPort(text: string, defaultPort: number): { host: string; port: number } {
  const bracket = /^\[([^\]]+)\](?::(\d+))?$/.exec(text);
  if (bracket) return { host: bracket[1]!, port: bracket[2] ? Number(bracket[2]) : defaultPort };
  const parts = text.split(":");
  if (parts.length === 2 && /^\d+$/.test(parts[1]!)) return { host: parts[0]!, port: Number(parts[1]) };
  return { host: text, port: defaultPort };
}

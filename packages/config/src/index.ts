import { z } from "zod";
import { readFileSync } from "node:fs";
import { hostname } from "node:os";

export { z };

export class ConfigError extends Error {
  readonly problems: string[];
  constructor(problems: string[]) {
    super(`invalid configuration: ${problems.join("; ")}`);
    this.name = "ConfigError";
    this.problems = problems;
  }
}

/**
 * Parses environment variables against a schema and reports every bad or missing
 * variable at once, named, so an operator fixes them in one go.
 */
export function loadConfig<T extends z.ZodRawShape>(
  shape: T,
  env: NodeJS.ProcessEnv = process.env,
): z.infer<z.ZodObject<T>> {
  const input: Record<string, string | undefined> = {};
  for (const key of Object.keys(shape)) {
    const value = env[key];
    input[key] = value === "" ? undefined : value;
  }
  const result = z.object(shape).safeParse(input);
  if (result.success) {
    const problems = crossChecks.map((check) => check(result.data as Record<string, unknown>)).filter((problem) => problem !== null);
    if (problems.length > 0) throw new ConfigError(problems);
    return result.data;
  }
  const problems = result.error.issues.map((issue) => {
    const name = issue.path.join(".");
    const given = input[name];
    const shown = given === undefined ? "missing" : `got ${JSON.stringify(given)}`;
    return `${name}: ${issue.message} (${shown})`;
  });
  throw new ConfigError(problems);
}

export const port = (fallback: number) =>
  z.coerce
    .number({ invalid_type_error: "expected a port number" })
    .int("expected a port number")
    .min(0, "expected a port number 0-65535")
    .max(65535, "expected a port number 0-65535")
    .default(fallback);

export const integer = (fallback: number, min = 0) =>
  z.coerce.number({ invalid_type_error: "expected an integer" }).int("expected an integer").min(min).default(fallback);

export const bool = (fallback: boolean) =>
  z
    .enum(["true", "false", "1", "0", "yes", "no", "on", "off"], {
      errorMap: () => ({ message: "expected true or false" }),
    })
    .transform((value) => ["true", "1", "yes", "on"].includes(value))
    .default(fallback ? "true" : "false");

const SIZE_UNITS: Record<string, number> = {
  "": 1, b: 1, k: 1024, kb: 1024, kib: 1024, m: 1024 ** 2, mb: 1024 ** 2, mib: 1024 ** 2,
  g: 1024 ** 3, gb: 1024 ** 3, gib: 1024 ** 3,
};

/** Parses sizes such as `52428800`, `50M`, `50MiB`, `1.5G` into bytes; null when invalid. */
export function parseSize(text: string): number | null {
  const match = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(text);
  if (!match) return null;
  const unit = SIZE_UNITS[match[2]!.toLowerCase()];
  if (unit === undefined) return null;
  return Math.floor(Number(match[1]) * unit);
}

export const size = (fallback: string) =>
  z
    .string()
    .default(fallback)
    .transform((text, ctx) => {
      const bytes = parseSize(text);
      if (bytes === null) {
        ctx.addIssue({ code: z.ZodIssueCode.custom, message: "expected a size such as 50M or 52428800" });
        return z.NEVER;
      }
      return bytes;
    });

const DURATION_UNITS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };

/** Parses durations such as `30s`, `5m`, `4h`, `5d`, `250ms` into milliseconds; a bare number is seconds. */
export function parseDuration(text: string): number | null {
  const match = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$/.exec(text);
  if (!match) return null;
  return Math.round(Number(match[1]) * DURATION_UNITS[match[2] ?? "s"]!);
}

export const duration = (fallback: string) =>
  z
    .string()
    .default(fallback)
    .transform((text, ctx) => {
      const ms = parseDuration(text);
      if (ms === null) {
        ctx.addIssue({ code: z.ZodIssueCode.custom, message: "expected a duration such as 30s, 5m or 4h" });
        return z.NEVER;
      }
      return ms;
    });

/** A comma-separated list; empty entries dropped. */
export const list = (fallback = "") =>
  z
    .string()
    .default(fallback)
    .transform((text) => text.split(",").map((item) => item.trim()).filter(Boolean));

const url = (fallback: string, protocols: string[]) =>
  z
    .string()
    .default(fallback)
    .refine((text) => {
      try {
        return protocols.includes(new URL(text).protocol);
      } catch {
        return false;
      }
    }, `expected a URL starting with ${protocols.join(" or ")}//`);

/**
 * The system's fully qualified name, else "localhost". A short host name (Debian's usual) is
 * looked up in the hosts file the way the resolver's canonical name is found there: the first
 * name of the line that lists it ("127.0.1.1 mx1.example.org mx1"), as Postfix's myhostname does.
 */
export function defaultMailHostname(systemName: string = hostname(), hostsText: string = readHostsFile()): string {
  const name = systemName.toLowerCase().replace(/\.$/, "");
  if (isFullyQualified(name)) return name;
  const canonical = canonicalNameInHosts(name, hostsText);
  return canonical && isFullyQualified(canonical) ? canonical : "localhost";
}

function readHostsFile(): string {
  try {
    return readFileSync("/etc/hosts", "utf8");
  } catch {
    return "";
  }
}

/** The first name on the first hosts-file line that lists `name`, lower-cased and without a final dot. */
function canonicalNameInHosts(name: string, hostsText: string): string | null {
  for (const line of hostsText.split("\n")) {
    const names = line.replace(/#.*/, "").trim().split(/\s+/).slice(1).map((n) => n.toLowerCase().replace(/\.$/, ""));
    if (names.includes(name)) return names[0]!;
  }
  return null;
}

/** A name with at least two dot-separated labels of letters, digits and inner hyphens, not all-numeric at the top. */
export function isFullyQualified(name: string): boolean {
  const labels = name.split(".");
  if (labels.length < 2 || name.length > 253) return false;
  if (!labels.every((label) => /^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$/i.test(label))) return false;
  return !/^[0-9]+$/.test(labels[labels.length - 1]!);
}

/**
 * Sender Rewriting Scheme for mail this system forwards (docs/srs.md): off unless SRS_DOMAIN is
 * set. Read by mta-outbound (writes SRS senders) and mta-inbound (takes bounces to them back).
 */
export const srsShape = {
  /** The domain SRS addresses are written in; its MX must be this system. Empty: no SRS. */
  SRS_DOMAIN: z
    .string()
    .default("")
    .transform((text) => text.trim().toLowerCase().replace(/\.$/, ""))
    .refine((name) => name === "" || isFullyQualified(name), "expected a fully qualified domain name (ASCII, A-labels for IDN)"),
  /** Comma-separated; the first signs new SRS addresses, every one verifies (rotation). */
  SRS_SECRETS: list(""),
  /** How long an SRS address stays valid (whole days; at most 1023, the timestamp's cycle). */
  SRS_MAX_AGE: duration("21d").refine((ms) => ms >= 86_400_000 && ms < 1024 * 86_400_000, "expected between 1d and 1023d"),
};

/** Rules between variables, which no single variable's schema can state; each gives a problem or null. */
const crossChecks: Array<(config: Record<string, unknown>) => string | null> = [
  (config) =>
    config.SRS_DOMAIN && Array.isArray(config.SRS_SECRETS) && config.SRS_SECRETS.length === 0
      ? "SRS_SECRETS: required when SRS_DOMAIN is set (the first secret signs rewritten senders) (missing)"
      : null,
];

export const DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/mailstack";
export const DEFAULT_NATS_URL = "nats://127.0.0.1:4222";

/** Settings every service reads. */
export const commonShape = {
  DATABASE_URL: url(DEFAULT_DATABASE_URL, ["postgres:", "postgresql:"]),
  DATABASE_POOL_SIZE: integer(10, 1),
  NATS_URL: z.string().default(DEFAULT_NATS_URL),
  /** Prefix for stream names and subjects; lets several deployments (or test files) share one NATS. */
  BUS_PREFIX: z.string().regex(/^[A-Za-z0-9_-]*$/, "letters, digits, _ and - only").default(""),
  LOG_LEVEL: z.enum(["trace", "debug", "info", "warn", "error", "fatal", "silent"]).default("info"),
  /**
   * The name this host gives itself in SMTP greetings, EHLO, Received: headers and DSNs. Like
   * Postfix's myhostname, it defaults to the system's fully qualified name (from the hosts file
   * when the host name is short), else localhost.
   */
  MAIL_HOSTNAME: z.string().default(defaultMailHostname()),
  SHUTDOWN_TIMEOUT: duration("25s"),
  /**
   * V8 starts a full garbage collection when the heap has grown by this percentage over what
   * was live after the last one. V8's own choice (up to 300% on an idle machine) lets a busy
   * service's resident memory double with garbage; 0 keeps V8's choice.
   */
  HEAP_GROWING_PERCENT: integer(50, 0),
};

export type CommonConfig = z.infer<z.ZodObject<typeof commonShape>>;

import { createRequire } from "node:module";
import type { Transporter } from "nodemailer";

// bench/ is not a workspace package: nodemailer is resolved from the msa's dependencies.
const require = createRequire(new URL("../../services/msa/package.json", import.meta.url));
const nodemailer = require("nodemailer") as typeof import("nodemailer");

export interface LoadOptions {
  port: number;
  host?: string;
  /** 'implicit' (465), 'starttls' (587) or 'none' (port 25 style). */
  tls: "implicit" | "starttls" | "none";
  auth?: { user: string; pass: string };
  sessions: number;
  count: number;
  size: number;
  from: string;
  to: string;
}

export interface LoadResult {
  sent: number;
  failed: number;
  seconds: number;
  perSecond: number;
  /** The rate after the first 20% of messages (sessions set up, AUTH done). */
  steadyPerSecond: number;
  /** Seconds until the first message was accepted (sessions, TLS and AUTH set up). */
  firstSeconds: number;
  firstError?: string;
}

/** A 4 KiB-ish message as a mail client writes it. */
export function makeMessage(from: string, to: string, size: number, n: number): string {
  const head = `From: <${from}>\r\nTo: <${to}>\r\nSubject: bench ${n}\r\nDate: ${new Date().toUTCString()}\r\nMessage-ID: <bench-${n}-${process.pid}@bench.test>\r\n\r\n`;
  const line = "The quick brown fox jumps over the lazy dog, again and again and again.\r\n";
  let body = "";
  while (head.length + body.length + line.length <= size) body += line;
  return head + body;
}

/** Sends count messages over `sessions` pooled SMTP connections (each reused for many messages). */
export async function runLoad(options: LoadOptions): Promise<LoadResult> {
  const transport: Transporter = nodemailer.createTransport({
    pool: true,
    maxConnections: options.sessions,
    maxMessages: Infinity,
    host: options.host ?? "127.0.0.1",
    port: options.port,
    secure: options.tls === "implicit",
    requireTLS: options.tls === "starttls",
    ignoreTLS: options.tls === "none",
    tls: { rejectUnauthorized: false },
    ...(options.auth ? { auth: options.auth } : {}),
  } as Parameters<typeof nodemailer.createTransport>[0]);
  let failed = 0;
  let firstError: string | undefined;
  const done: number[] = [];
  const started = process.hrtime.bigint();
  const now = () => Number(process.hrtime.bigint() - started) / 1e9;
  await Promise.all(
    Array.from({ length: options.count }, (_, n) =>
      transport
        .sendMail({ envelope: { from: options.from, to: [options.to] }, raw: makeMessage(options.from, options.to, options.size, n) })
        .then(() => void done.push(now()))
        .catch((error: Error) => {
          failed++;
          firstError ??= error.message;
        }),
    ),
  );
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  transport.close();
  const sent = options.count - failed;
  const from = Math.floor(done.length * 0.2);
  const steadyPerSecond = done.length > 10 ? (done.length - 1 - from) / (done[done.length - 1]! - done[from]!) : NaN;
  return { sent, failed, seconds, perSecond: sent / seconds, steadyPerSecond, firstSeconds: done[0] ?? NaN, ...(firstError ? { firstError } : {}) };
}

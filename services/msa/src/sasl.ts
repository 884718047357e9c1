import type { SMTPServer, SMTPServerSession } from "smtp-server";
import SASL from "smtp-server/lib/sasl.js";
import type { SMTPConnection } from "smtp-server/lib/smtp-connection.js";
import { reply, type SmtpReply } from "@mailstack/mail";

// RFC 4648 base64 with padding, nothing else (smtp-server's decoder silently skips junk).
const BASE64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

/** Decodes strict base64; null when the text is not base64. A lone "=" is the empty response (RFC 4954 4). */
export function decodeBase64Strict(text: string): Buffer | null {
  if (text === "=") return Buffer.alloc(0);
  if (!BASE64.test(text)) return null;
  return Buffer.from(text, "base64");
}

/** Why a PLAIN response (RFC 4616: authzid NUL authcid NUL passwd) is malformed; null when it is well formed. */
export function plainProblem(token: string): string | null {
  const decoded = decodeBase64Strict(token);
  if (!decoded || token === "") return "Malformed SASL data: not base64";
  if (decoded.length === 0) return "Malformed SASL data: empty response";
  const parts = decoded.toString("utf8").split("\x00");
  if (parts.length !== 3) return "Malformed SASL data: expected authzid NUL authcid NUL password";
  if (!parts[1] && !parts[0]) return "Malformed SASL data: missing user name";
  if (!parts[2]) return "Malformed SASL data: missing password";
  return null;
}

/** A PLAIN authorization identity other than the user's own: acting as someone else is not supported. */
export function plainActsAsOther(token: string): boolean {
  const [authzid, authcid] = Buffer.from(token, "base64").toString("utf8").split("\x00");
  return !!authzid && !!authcid && authzid.toLowerCase() !== authcid.toLowerCase();
}

/** Why a LOGIN response line (user name or password) is malformed; null when it is well formed. */
export function loginProblem(line: string, what: "user name" | "password"): string | null {
  const decoded = decodeBase64Strict(line);
  if (!decoded) return "Malformed SASL data: not base64";
  if (decoded.length === 0) return `Malformed SASL data: missing ${what}`;
  return null;
}

const INSTALLED = Symbol.for("mailstack.msa.strictSasl");

/**
 * Decides the reply to a refusal made here (counted as a failure on the connection, so that a
 * client cannot loop on it; a 421 closes the connection). reason names the problem, never the data.
 */
export type SaslRefusalHandler = (session: SMTPServerSession, refusal: SmtpReply, reason: string) => Promise<SmtpReply>;

// By SMTP server (the steps are patched once per process, the handler is each server's own).
const handlers = new WeakMap<SMTPServer, SaslRefusalHandler>();

export function onSaslRefused(server: SMTPServer, handler: SaslRefusalHandler): void {
  handlers.set(server, handler);
}

const actsAsOther = reply(535, "5.7.8", "Authentication as another user (a different authorization identity) is not supported");

type Step<A extends unknown[]> = (this: SMTPConnection, ...args: A) => void;

/**
 * Makes smtp-server's PLAIN and LOGIN steps refuse malformed SASL data (bad base64, a missing
 * part) with 501 5.5.2, and a PLAIN authorization identity other than the user with 535 5.7.8,
 * before the application's onAuth, and so before any password check; onSaslRefused counts them.
 * smtp-server keeps its mechanisms in one table; this wraps three of its steps, once per process.
 * The checks only add refusals: what passes them is handled by smtp-server unchanged.
 */
export function installStrictSasl(): void {
  const table = SASL as unknown as Record<string | symbol, unknown>;
  if (table[INSTALLED]) return;
  table[INSTALLED] = true;

  const refuse = (connection: SMTPConnection, refusal: SmtpReply, reason: string, callback: () => void) => {
    const send = (r: SmtpReply) => {
      connection.send(r.code, `${r.enhanced} ${r.text}`);
      callback();
    };
    const handler = handlers.get(connection._server);
    if (!handler) return send(refusal);
    handler(connection.session, refusal, reason).then(send, () => send(refusal));
  };
  const malformed = (connection: SMTPConnection, problem: string, callback: () => void) =>
    refuse(connection, reply(501, "5.5.2", problem), problem, callback);

  const plainToken = SASL.PLAIN_token as Step<[boolean, Buffer | string, () => void]>;
  SASL.PLAIN_token = function (canAbort, rawToken, callback) {
    const token = String(rawToken ?? "").trim();
    const problem = canAbort && token === "*" ? null : plainProblem(token);
    if (problem) return malformed(this, problem, callback);
    if (!(canAbort && token === "*") && plainActsAsOther(token)) {
      return refuse(this, actsAsOther, "another authorization identity", callback);
    }
    return plainToken.call(this, canAbort, rawToken, callback);
  };

  const loginUsername = SASL.LOGIN_username as Step<[boolean, Buffer | string, () => void]>;
  SASL.LOGIN_username = function (canAbort, rawUsername, callback) {
    const line = String(rawUsername ?? "").trim();
    const problem = canAbort && line === "*" ? null : loginProblem(line, "user name");
    if (problem) return malformed(this, problem, callback);
    return loginUsername.call(this, canAbort, rawUsername, callback);
  };

  const loginPassword = SASL.LOGIN_password as Step<[string, Buffer | string, () => void]>;
  SASL.LOGIN_password = function (username, rawPassword, callback) {
    const line = String(rawPassword ?? "").trim();
    const problem = line === "*" ? null : loginProblem(line, "password");
    if (problem) return malformed(this, problem, callback);
    return loginPassword.call(this, username, rawPassword, callback);
  };
}

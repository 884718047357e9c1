import type { SMTPServer, SMTPServerSession } from "smtp-server";
import { SMTPConnection } from "smtp-server/lib/smtp-connection.js";
import { reply, type SmtpReply } from "@mailstack/mail";

/** The parts of smtp-server's connection a command guard uses. */
export interface GuardedConnection {
  _server: SMTPServer & { [GUARD]?: CommandGuard };
  _ready: boolean;
  _upgrading: boolean;
  secure: boolean;
  hostNameAppearsAs: string | false;
  _nextHandler: unknown;
  _parser: { lastLineEnding?: string; hasPendingInput?: boolean } | false;
  session: SMTPServerSession;
  send(code: number, data?: string | string[] | null, context?: string | false): void;
  close(): void;
  _whenWritable(next: () => void): void;
}

type OnCommand = (this: GuardedConnection, command: Buffer, callback?: () => void) => void;

/** Sees each command line before smtp-server runs it; calls `original` to let the library run it. */
export type CommandGuard = (connection: GuardedConnection, command: Buffer, callback: (() => void) | undefined, original: OnCommand) => void;

const GUARD = Symbol.for("mailstack.smtp-intake.guard");

// smtp-server has no hook before it runs a command; its connection's command handler is
// wrapped once, and a server that was given a guard (guardCommands) has its commands screened.
const proto = SMTPConnection.prototype as unknown as { _onCommand: OnCommand; [GUARD]?: boolean };
if (!proto[GUARD]) {
  const original = proto._onCommand;
  proto._onCommand = function (this: GuardedConnection, command: Buffer, callback?: () => void) {
    const guard = this._server[GUARD];
    if (!guard) return original.call(this, command, callback);
    guard(this, command, callback, original);
  };
  proto[GUARD] = true;
}

/** Every command line of this server's connections goes through `guard` first. */
export function guardCommands(server: SMTPServer, guard: CommandGuard): void {
  (server as SMTPServer & { [GUARD]?: CommandGuard })[GUARD] = guard;
}

export const GuardReplies = {
  bareLfCommand: reply(500, "5.5.2", "Bare LF is not allowed, end command lines with CRLF"),
  noValidRecipients: reply(554, "5.5.1", "No valid recipients, message and any pipelined input discarded"),
  needMail: reply(503, "5.5.1", "Need MAIL and RCPT commands first"),
  dataSyntax: reply(501, "5.5.4", "Syntax: DATA (no argument)"),
  rsetSyntax: reply(501, "5.5.4", "Syntax: RSET (no argument)"),
};

/** A command line ended by a bare LF is refused (no state change); true when it answered. */
export function refuseBareLf(connection: GuardedConnection, answer: (r: SmtpReply) => void): boolean {
  const parser = connection._parser;
  if (!parser || parser.lastLineEnding !== "\n") return false;
  answer(GuardReplies.bareLfCommand);
  return true;
}

/**
 * DATA without an accepted recipient is refused and, when a transaction was open or more input
 * is already waiting, the connection is closed: whatever was pipelined behind that DATA is a
 * message body, and run as commands it would inject a transaction (what Postfix's
 * smtpd_forbid_unauth_pipelining prevents). True when it answered.
 */
export function refuseEmptyData(connection: GuardedConnection, verb: string, answer: (r: SmtpReply) => void): boolean {
  if (verb !== "DATA" || connection.session.envelope?.rcptTo?.length) return false;
  const inTransaction = !!connection.session.envelope?.mailFrom;
  const parser = connection._parser;
  answer(inTransaction ? GuardReplies.noValidRecipients : GuardReplies.needMail);
  if (inTransaction || (parser && parser.hasPendingInput)) connection.close();
  return true;
}

/**
 * DATA and RSET take no argument (RFC 5321 4.1.1.4-5, and LMTP's alike; QUIT's is ignored, as
 * Postfix does). Call it after refuseEmptyData: a DATA refused there must still close the
 * connection whose pipelined body follows it. True when it answered.
 */
export function refuseArguments(verb: string, line: string, answer: (r: SmtpReply) => void): boolean {
  if ((verb !== "DATA" && verb !== "RSET") || line.trim().length === verb.length) return false;
  answer(verb === "DATA" ? GuardReplies.dataSyntax : GuardReplies.rsetSyntax);
  return true;
}

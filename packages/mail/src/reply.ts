/** An SMTP reply: basic code (RFC 5321), enhanced status code (RFC 3463) and text. */
export interface SmtpReply {
  code: number;
  enhanced: string;
  text: string;
}

export function reply(code: number, enhanced: string, text: string): SmtpReply {
  return { code, enhanced, text };
}

export function formatReply(r: SmtpReply): string {
  return `${r.code} ${r.enhanced} ${r.text}`;
}

/** The class of a reply code: 2 success, 4 temporary failure, 5 permanent failure. */
export function replyClass(code: number): "2xx" | "3xx" | "4xx" | "5xx" {
  return `${Math.floor(code / 100)}xx` as "2xx" | "3xx" | "4xx" | "5xx";
}

/** Parses an SMTP reply line such as `550 5.1.1 no such user` or `451 try later`. */
export function parseReply(line: string): SmtpReply | null {
  const match = /^([2-5]\d\d)[ -](?:([245]\.\d{1,3}\.\d{1,3})\s+)?(.*)$/s.exec(line.trim());
  if (!match) return null;
  const code = Number(match[1]);
  const enhanced = match[2] ?? `${String(code)[0]}.0.0`;
  return { code, enhanced, text: match[3] ?? "" };
}

/** Replies used by more than one service, in one place so their wording stays consistent. */
export const Replies = {
  ok: reply(250, "2.0.0", "OK"),
  relayDenied: reply(554, "5.7.1", "Relay access denied"),
  unknownUser: reply(550, "5.1.1", "No such user here"),
  badSenderSyntax: reply(553, "5.1.7", "Bad sender address syntax"),
  badRecipientSyntax: reply(553, "5.1.3", "Bad recipient address syntax"),
  tooManyRecipients: reply(452, "4.5.3", "Too many recipients"),
  messageTooBig: reply(552, "5.3.4", "Message size exceeds fixed maximum message size"),
  localError: reply(451, "4.3.0", "Temporary local problem, please try again later"),
  authRequired: reply(530, "5.7.0", "Authentication required"),
  senderNotOwned: reply(553, "5.7.1", "Sender address not owned by the authenticated user"),
  overQuota: reply(552, "5.2.2", "Mailbox full"),
  commandNotImplemented: reply(502, "5.5.1", "Command not implemented"),
  badSequence: reply(503, "5.5.1", "Bad sequence of commands"),
  syntaxError: reply(500, "5.5.2", "Syntax error"),
} as const satisfies Record<string, SmtpReply>;

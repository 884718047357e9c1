import { randomBytes } from "node:crypto";
import { headerBoundary, utf8AddrXtext } from "@mailstack/mail";

/** RFC 3464 section 2.3.3 actions. */
export type DsnAction = "failed" | "delayed" | "delivered" | "relayed" | "expanded";

export interface DsnRecipient {
  /** The address the delivery was attempted to (Final-Recipient). */
  finalRecipient: string;
  /**
   * The ORCPT parameter as stored (`rfc822;addr`, or `utf-8;addr` decoded), the only source of
   * Original-Recipient: without ORCPT that field MUST NOT appear (RFC 3461 6.3 d).
   */
  originalRecipient?: string | null;
  /** The RCPT TO address when alias expansion made it finalRecipient (named in the human-readable part). */
  expandedFrom?: string | null;
  action: DsnAction;
  /** Enhanced status code, e.g. 5.1.1. */
  status: string;
  /** The host that gave the reply (Remote-MTA), when a remote server answered. */
  remoteMta?: string | null;
  /** The remote reply (`smtp; 550 5.1.1 ...`) or a local explanation. */
  diagnostic?: string | null;
  lastAttemptDate?: Date | null;
  willRetryUntil?: Date | null;
}

export interface DsnInput {
  /** This system's host name: Reporting-MTA and the From: address's domain. */
  reportingMta: string;
  /** The envelope sender of the original message; the DSN goes to it. */
  to: string;
  originalEnvelopeId?: string | null;
  arrivalDate?: Date | null;
  /** FULL returns the whole message, HDRS its header only. */
  ret: "FULL" | "HDRS";
  /** Set when the whole message was due (RET=FULL, or no RET) but is over this size: the human part says only its header is returned. */
  returnLimit?: number | null;
  original: Buffer;
  recipients: DsnRecipient[];
  date?: Date;
}

export interface ComposedDsn {
  raw: Buffer;
  messageId: string;
}

/** Header values must never carry a line break from a remote reply or an address. */
function clean(text: string): string {
  return text.replace(/[\r\n]+/g, " ").replace(/[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]/g, "").trim();
}

const nonAscii = (text: string) => /[^\x00-\x7f]/.test(text);

/** Non-ASCII characters as RFC 6533's \x{HEX}, for the fields of a (7-bit) message/delivery-status. */
function asciiOnly(text: string): string {
  return text.replace(/[^\x00-\x7f]/gu, (char) => `\\x{${char.codePointAt(0)!.toString(16).toUpperCase()}}`);
}

/** An RFC 5322 date-time in UTC. */
function rfc5322Date(date: Date): string {
  return date.toUTCString().replace("GMT", "+0000");
}

/** A remote reply can run to a megabyte (a thousand lines): the report keeps its start. */
const MAX_DIAGNOSTIC = 2000;
/** The longest run of text without a space put on one line (in characters; UTF-8 takes up to 4 octets each). */
const MAX_WORD = 240;

function diagnosticText(text: string): string {
  const cleaned = clean(text);
  return cleaned.length > MAX_DIAGNOSTIC ? `${cleaned.slice(0, MAX_DIAGNOSTIC)} [...]` : cleaned;
}

/** The words of a text, a word longer than MAX_WORD cut in pieces, so no line must exceed 998 octets. */
function words(text: string): string[] {
  return text.split(" ").flatMap((word) => {
    const pieces: string[] = [];
    for (let i = 0; i < word.length; i += MAX_WORD) pieces.push(word.slice(i, i + MAX_WORD));
    return pieces.length ? pieces : [word];
  });
}

/** Lines of at most about `width` characters, broken at spaces; continuation lines are indented. */
function wrap(text: string, width = 76): string[] {
  const lines: string[] = [];
  let line = "";
  for (const word of words(text)) {
    if (line && line.length + 1 + word.length > width) {
      lines.push(line);
      line = `    ${word}`;
    } else {
      line = line ? `${line} ${word}` : word;
    }
  }
  lines.push(line);
  return lines;
}

/** Folds a long header field at spaces so lines stay under 998 octets (RFC 5322 2.1.1). */
function field(name: string, value: string): string {
  const pieces = words(clean(value));
  const lines: string[] = [];
  let line = `${name}:`;
  for (const word of pieces) {
    if (line.length + 1 + word.length > 76 && line.length > name.length + 1) {
      lines.push(line);
      line = ` ${word}`;
    } else {
      line += ` ${word}`;
    }
  }
  lines.push(line);
  return lines.join("\r\n") + "\r\n";
}

/** address-type;address (RFC 3464 2.1.2) for an ORCPT as stored; a bare one is typed as a Final-Recipient is. */
function addressType(address: string): string {
  return address.includes(";") ? address : recipientType(address);
}

/** A bare address typed: rfc822 when ASCII, else RFC 6533's utf-8 type. A ";" in a quoted local part is part of the address. */
function recipientType(address: string): string {
  return nonAscii(address) ? `utf-8;${address}` : `rfc822;${address}`;
}

/**
 * An address field of the status part (Original-Recipient, Final-Recipient): a utf-8 address as
 * UTF-8 in a global status part, in its 7-bit utf-8-addr-xtext form (\x{HEX}) in a plain one
 * (RFC 6533 3); other types as given.
 */
function statusAddress(typed: string, global: boolean): string {
  const semicolon = typed.indexOf(";");
  if (global || typed.slice(0, semicolon).toLowerCase() !== "utf-8") return typed;
  return `utf-8;${utf8AddrXtext(typed.slice(semicolon + 1))}`;
}

/** The header section of a message (up to and including the blank line), CRLF-normalised. */
export function headerSection(raw: Buffer): Buffer {
  const boundary = headerBoundary(raw);
  const head = boundary ? raw.subarray(0, boundary.bodyStart) : raw;
  return Buffer.from(head.toString("latin1").replace(/\r?\n/g, "\r\n"), "latin1");
}

function expanded(r: DsnRecipient): string {
  return r.expandedFrom && r.expandedFrom.toLowerCase() !== r.finalRecipient.toLowerCase() ? ` (expanded from <${r.expandedFrom}>)` : "";
}

function humanText(input: DsnInput): string {
  const failed = input.recipients.filter((r) => r.action === "failed");
  const delayed = input.recipients.filter((r) => r.action === "delayed");
  const done = input.recipients.filter((r) => r.action === "delivered" || r.action === "relayed");
  const lines = [`This is the mail system at host ${input.reportingMta}.`, ""];
  if (failed.length) {
    lines.push("I'm sorry to have to inform you that your message could not be delivered to one or more", "recipients. It is attached below.", "");
    if (input.returnLimit != null && input.ret === "HDRS") {
      lines.push(`The message is larger than ${input.returnLimit} bytes, so only its header is attached.`, "");
    }
    for (const r of failed) lines.push(...wrap(`<${r.finalRecipient}>${expanded(r)}: ${diagnosticText(r.diagnostic ?? r.status)}`));
    lines.push("");
  }
  if (delayed.length) {
    lines.push("Your message could not be delivered yet to the recipients below. The mail system will keep", "trying; you do not need to send it again.", "");
    for (const r of delayed) {
      const until = r.willRetryUntil ? ` (will retry until ${r.willRetryUntil.toUTCString()})` : "";
      lines.push(...wrap(`<${r.finalRecipient}>${expanded(r)}: ${diagnosticText(r.diagnostic ?? r.status)}${until}`));
    }
    lines.push("");
  }
  if (done.length) {
    lines.push("Your message was delivered to the recipients below, as you asked to be told.", "");
    for (const r of done) lines.push(`<${r.finalRecipient}>${expanded(r)}: ${r.action}`);
    lines.push("");
  }
  return lines.join("\r\n");
}

/** The returned part named for what happened to it: a success notice's message was delivered. */
function returnedDescription(input: DsnInput): string {
  const what = input.recipients.some((r) => r.action === "failed")
    ? "Undelivered Message"
    : input.recipients.some((r) => r.action === "delayed")
      ? "Delayed Message"
      : "Delivered Message";
  return input.ret === "FULL" ? what : `${what} Headers`;
}

function subject(input: DsnInput): string {
  if (input.recipients.some((r) => r.action === "failed")) return "Undelivered Mail Returned to Sender";
  if (input.recipients.some((r) => r.action === "delayed")) return "Delayed Mail (still being retried)";
  return "Successful Mail Delivery Report";
}

/**
 * Builds an RFC 3464 delivery status notification: multipart/report with a human part,
 * the message/delivery-status part and the original message (RET=FULL) or its header (HDRS).
 * Every line ends in CRLF. An original whose header has UTF-8, or a report to a UTF-8 address,
 * gets RFC 6533's message/global-delivery-status, message/global and message/global-headers;
 * otherwise UTF-8 recipient addresses go into the plain status part as utf-8-addr-xtext, and the
 * human part names them as they are (text/plain; charset=utf-8). 8-bit content is labelled 8bit
 * on its part and on the report itself (RFC 2045 6.4).
 */
export function composeDsn(input: DsnInput): ComposedDsn {
  if (input.recipients.length === 0) throw new Error("a DSN needs at least one recipient");
  const date = input.date ?? new Date();
  const boundary = `dsn-${randomBytes(12).toString("hex")}`;
  const messageId = `<${Date.now().toString(36)}.${randomBytes(8).toString("hex")}@${input.reportingMta}>`;
  const originalHeader = headerSection(input.original);
  // Global only when it must be: the returned header has UTF-8 (message/global-headers or
  // message/global), or the report's own To: is UTF-8. A UTF-8 recipient address alone fits a
  // plain, widely understood message/delivery-status in its 7-bit utf-8-addr-xtext form (RFC 6533 3).
  const international = nonAscii(input.to) || originalHeader.some((byte) => byte > 0x7f);
  // A message/delivery-status is 7-bit text; the global one carries UTF-8 as it is.
  const statusText = international ? (text: string) => text : asciiOnly;

  let status = "";
  status += field("Reporting-MTA", `dns; ${input.reportingMta}`);
  if (input.originalEnvelopeId) status += field("Original-Envelope-Id", statusText(input.originalEnvelopeId));
  if (input.arrivalDate) status += field("Arrival-Date", rfc5322Date(input.arrivalDate));
  for (const r of input.recipients) {
    status += "\r\n";
    if (r.originalRecipient) status += field("Original-Recipient", statusAddress(addressType(r.originalRecipient), international));
    status += field("Final-Recipient", statusAddress(recipientType(r.finalRecipient), international));
    status += field("Action", r.action);
    status += field("Status", r.status);
    if (r.remoteMta) status += field("Remote-MTA", `dns; ${r.remoteMta}`);
    if (r.diagnostic) status += field("Diagnostic-Code", statusText(diagnosticCode(diagnosticText(r.diagnostic))));
    if (r.lastAttemptDate) status += field("Last-Attempt-Date", rfc5322Date(r.lastAttemptDate));
    if (r.willRetryUntil && r.action === "delayed") status += field("Will-Retry-Until", rfc5322Date(r.willRetryUntil));
  }

  const human = humanText(input);
  const original = input.ret === "FULL" ? normaliseCrlf(input.original) : originalHeader;
  const originalType =
    input.ret === "FULL" ? (international ? "message/global" : "message/rfc822") : international ? "message/global-headers" : "text/rfc822-headers";
  const eightBit = { human: nonAscii(human), status: nonAscii(status), original: original.some((byte) => byte > 0x7f) };
  const cte = (is8bit: boolean) => (is8bit ? "Content-Transfer-Encoding: 8bit\r\n" : "");

  const head =
    field("From", `Mail Delivery System <MAILER-DAEMON@${input.reportingMta}>`) +
    field("To", `<${input.to}>`) +
    field("Subject", subject(input)) +
    field("Date", rfc5322Date(date)) +
    field("Message-ID", messageId) +
    field("Auto-Submitted", "auto-replied") +
    "MIME-Version: 1.0\r\n" +
    `Content-Type: multipart/report; report-type=${international ? "global-delivery-status" : "delivery-status"};\r\n boundary="${boundary}"\r\n` +
    cte(eightBit.human || eightBit.status || eightBit.original) +
    "\r\n";

  const parts: Buffer[] = [
    Buffer.from(head + "This is a MIME-encapsulated message.\r\n\r\n"),
    Buffer.from(
      `--${boundary}\r\nContent-Description: Notification\r\nContent-Type: text/plain; charset=${eightBit.human ? "utf-8" : "us-ascii"}\r\n${cte(eightBit.human)}\r\n${human}\r\n`,
    ),
    Buffer.from(
      `--${boundary}\r\nContent-Description: Delivery report\r\nContent-Type: ${international ? "message/global-delivery-status" : "message/delivery-status"}\r\n${cte(eightBit.status)}\r\n${status}\r\n`,
    ),
    Buffer.from(
      `--${boundary}\r\nContent-Description: ${returnedDescription(input)}\r\n` +
        `Content-Type: ${originalType}\r\n` +
        cte(eightBit.original) +
        "\r\n",
    ),
    original,
    Buffer.from(`${original.subarray(-2).toString() === "\r\n" ? "" : "\r\n"}\r\n--${boundary}--\r\n`),
  ];
  return { raw: Buffer.concat(parts), messageId };
}

function normaliseCrlf(raw: Buffer): Buffer {
  return Buffer.from(raw.toString("latin1").replace(/\r?\n/g, "\r\n"), "latin1");
}

/**
 * RFC 3464 §2.3.6: the "smtp" type is for a remote server's reply; a failure of our own (no MX,
 * a refused connection, a full mailbox decided here) gets an X- type of its own, as Postfix's
 * "X-Postfix;" does.
 */
export function diagnosticCode(diagnostic: string): string {
  if (/^(?:smtp|x-[a-z0-9-]+);/i.test(diagnostic)) return diagnostic;
  return /^[245]\d\d(?:[ -]|$)/.test(diagnostic) ? `smtp; ${diagnostic}` : `X-mailstack; ${diagnostic}`;
}

import { randomBytes } from "node:crypto";
import addressparser, { type Address } from "nodemailer/lib/addressparser";
import { headerBoundary, parseAddress, parseMailboxList, reply, type SmtpReply } from "@mailstack/mail";

/** The largest header section examined; a bigger one is refused. */
export const MAX_HEADER_BYTES = 1024 * 1024;

export interface FixContext {
  /** The authenticated account's address (the Sender: when one is added). */
  user: string;
  /** The lookup keys (addressKey) of the addresses the account may send as. */
  owned: ReadonlySet<string>;
  /** The envelope sender (already checked to be owned). */
  envelopeFrom: string;
  /** The domain that completes an address without one (the account's domain). */
  defaultDomain: string;
  /** This host's name, for a Message-ID: this service adds. */
  hostname: string;
  now?: Date;
}

export type FixResult =
  | {
      ok: true;
      message: Buffer;
      /** From: addresses as lookup keys (their domains are the DKIM signing candidates). */
      fromAddresses: string[];
      messageId: string | null;
      /** Names of the header fields this service added, changed or removed. */
      changes: string[];
    }
  | { ok: false; reply: SmtpReply };

interface Field {
  /** Lower-case field name. */
  name: string;
  /** The whole field, folded lines included, without the final CRLF (latin1 text). */
  text: string;
}

const FIELD_START = /^([\x21-\x39\x3b-\x7e]+)[ \t]*:/;
/** Completed with nodemailer's lenient parser; From: and Sender: are read strictly (authorField). */
const ADDRESS_FIELDS = new Set(["reply-to", "to", "cc"]);
const AUTHOR_FIELDS: Record<string, string> = { from: "From:", sender: "Sender:" };
const UTF8 = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });

/** RFC 5322 date-time. */
export function messageDate(date: Date): string {
  return date.toUTCString().replace(/GMT$/, "+0000");
}

/** Splits a header section into fields; null when it is not a valid header block. */
export function parseHeaderSection(text: string): Field[] | null {
  const fields: Field[] = [];
  for (const line of text.split("\r\n")) {
    if (line.startsWith(" ") || line.startsWith("\t")) {
      const last = fields[fields.length - 1];
      if (!last) return null;
      last.text += `\r\n${line}`;
      continue;
    }
    const match = FIELD_START.exec(line);
    if (!match) return null;
    fields.push({ name: match[1]!.toLowerCase(), text: line });
  }
  return fields.length > 0 ? fields : null;
}

function fieldValue(field: Field): string {
  return field.text.slice(field.text.indexOf(":") + 1).replace(/\r\n[ \t]/g, " ").trim();
}

function formatName(name: string): string {
  if (!name) return "";
  if (/^[\w !#$%&'*+\-/=?^`{|}~]+$/.test(name) || /^=\?.+\?=$/.test(name)) return `${name} `;
  return `"${name.replace(/(["\\])/g, "\\$1")}" `;
}

function formatEntry(entry: Address): string {
  if (entry.group) return `${entry.name}: ${entry.group.map(formatEntry).join(", ")};`;
  return entry.name && !entry.address ? formatName(entry.name).trim() : `${formatName(entry.name)}<${entry.address}>`;
}

/**
 * `Name: entry, entry, ...` folded between entries so that its lines stay within 78 characters
 * where the entries allow (RFC 5322 2.1.1; never over 998, which a relay would break, and a
 * DKIM signature with it).
 */
function foldedField(name: string, list: Address[]): string {
  const entries = list.map(formatEntry);
  let text = `${name}:`;
  let lineLength = text.length;
  entries.forEach((entry, i) => {
    const piece = i < entries.length - 1 ? `${entry},` : entry;
    if (i > 0 && lineLength + 1 + piece.length > 78) {
      text += `\r\n ${piece}`;
      lineLength = 1 + piece.length;
    } else {
      text += ` ${piece}`;
      lineLength += 1 + piece.length;
    }
  });
  return text;
}

/** Splits an address list at the commas that separate its entries (not those in quotes, comments, <> or groups). */
function splitList(value: string): string[] {
  const parts: string[] = [];
  let current = "";
  let quoted = false;
  let comment = 0;
  let angle = false;
  let group = false;
  for (let i = 0; i < value.length; i++) {
    const c = value[i]!;
    current += c;
    if (c === "\\" && (quoted || comment > 0)) {
      current += value[++i] ?? "";
    } else if (quoted) {
      if (c === '"') quoted = false;
    } else if (comment > 0) {
      if (c === "(") comment++;
      else if (c === ")") comment--;
    } else if (c === '"') quoted = true;
    else if (c === "(") comment++;
    else if (c === "<") angle = true;
    else if (c === ">") angle = false;
    else if (!angle && c === ":") group = true;
    else if (!angle && c === ";") group = false;
    else if (!angle && !group && c === ",") {
      parts.push(current.slice(0, -1));
      current = "";
    }
  }
  parts.push(current);
  return parts.map((part) => part.trim()).filter(Boolean);
}

const BARE_LOCAL_PART = /^[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.\x80-\xff]+$/;

/** Parses an address list; an entry that is a bare local part (`To: bob`) is an address, not a name. */
function parseList(value: string): Address[] {
  return splitList(value).flatMap((part) => (BARE_LOCAL_PART.test(part) ? [{ name: "", address: part }] : addressparser(part)));
}

/** Completes addresses that have no domain (RFC 6409 8.6); returns the new field or null when nothing changed. */
function completeAddresses(field: Field, domain: string): Field | null {
  const list = parseList(fieldValue(field));
  let changed = false;
  const complete = (entries: Address[]): void => {
    for (const entry of entries) {
      if (entry.group) complete(entry.group);
      else if (entry.address && !entry.address.includes("@")) {
        entry.address = `${entry.address}@${domain}`;
        changed = true;
      }
    }
  };
  complete(list);
  if (!changed) return null;
  const displayName = field.text.slice(0, field.text.indexOf(":"));
  return { name: field.name, text: foldedField(displayName, list) };
}

/** An author address's lookup key, as `owned` holds them. */
function normalized(address: string): string | null {
  const parsed = parseAddress(address, { utf8: true });
  return parsed.ok ? parsed.key : null;
}

/** An address from the envelope or the login (a JavaScript string, UTF-8 on the wire) as header text, which is handled as latin1 here. */
function headerText(address: string): string {
  return Buffer.from(address, "utf8").toString("latin1");
}

function refuse(code: number, text: string): FixResult {
  const [enhanced, ...words] = text.split(" ");
  return { ok: false, reply: reply(code, enhanced!, words.join(" ")) };
}

type AuthorResult = { ok: true; field: Field; addresses: string[]; completed: boolean } | { ok: false; result: FixResult };

/**
 * Reads a From: or Sender: strictly (parseMailboxList: one unambiguous mailbox list, or one
 * mailbox) and completes its addresses without a domain in place, the rest of the field kept
 * byte for byte. Addresses are returned as UTF-8 text.
 */
function authorField(field: Field, domain: string): AuthorResult {
  const label = AUTHOR_FIELDS[field.name]!;
  const colon = field.text.indexOf(":") + 1;
  let value: string;
  try {
    value = UTF8.decode(Buffer.from(field.text.slice(colon), "latin1"));
  } catch {
    return { ok: false, result: refuse(554, `5.6.0 Message refused: ${label} field is not valid UTF-8`) };
  }
  const parsed = parseMailboxList(value, { allowNoDomain: true, single: field.name === "sender" });
  if (!parsed.ok) {
    const what = field.name === "sender" ? "one mailbox" : "an unambiguous mailbox list";
    return { ok: false, result: refuse(554, `5.6.0 Message refused: ${label} field is not ${what} (RFC 5322 3.4): ${parsed.problem}`) };
  }
  // Each address without a domain gets "@domain" right after it; nothing else is rewritten.
  let completed = "";
  let copied = 0;
  const addresses = parsed.mailboxes.map((mailbox) => {
    if (mailbox.address.includes("@")) return mailbox.address;
    completed += `${value.slice(copied, mailbox.end)}@${domain}`;
    copied = mailbox.end;
    return `${mailbox.address}@${domain}`;
  });
  if (copied === 0) return { ok: true, field, addresses, completed: false };
  completed += value.slice(copied);
  const text = field.text.slice(0, colon) + Buffer.from(completed, "utf8").toString("latin1");
  return { ok: true, field: { name: field.name, text }, addresses, completed: true };
}

/**
 * Fixes a submitted message as RFC 6409 section 8 allows and checks its author fields:
 * refuses a message without a valid header block; completes addresses without a domain;
 * adds From: (the envelope sender), Date: and Message-ID: when missing; requires every
 * From: and Sender: address to be owned by the account and adds Sender: when From: names
 * several; removes Bcc: and Resent-Bcc:. The body is not touched.
 */
export function fixMessage(raw: Buffer, context: FixContext): FixResult {
  const boundary = headerBoundary(raw);
  const headerEnd = boundary ? boundary.headerEnd : raw.length;
  if (headerEnd > MAX_HEADER_BYTES) return refuse(552, "5.3.4 Header section too large");
  const bodyStart = boundary ? boundary.bodyStart : raw.length;
  const text = raw.subarray(0, headerEnd).toString("latin1").replace(/\r\n$/, "");
  const parsed = text ? parseHeaderSection(text) : null;
  if (!parsed) {
    return refuse(554, "5.6.0 Message refused: it has no valid header block (header fields, then an empty line, then the body)");
  }

  const changes: string[] = [];
  let fields: Field[] = [];
  // The addresses of each From: and Sender: field, as its strict reading found them.
  const authors = new Map<Field, string[]>();
  for (const field of parsed) {
    // Blind recipients stay blind, also a resend's (RFC 5322 3.6.6), as Postfix's cleanup drops both.
    if (field.name === "bcc" || field.name === "resent-bcc") {
      changes.push(`${field.name}-removed`);
      continue;
    }
    if (AUTHOR_FIELDS[field.name]) {
      const author = authorField(field, context.defaultDomain);
      if (!author.ok) return author.result;
      if (author.completed) changes.push(`${field.name}-completed`);
      authors.set(author.field, author.addresses);
      fields.push(author.field);
      continue;
    }
    const completed = ADDRESS_FIELDS.has(field.name) ? completeAddresses(field, context.defaultDomain) : null;
    if (completed) changes.push(`${field.name}-completed`);
    fields.push(completed ?? field);
  }

  const fromFields = fields.filter((f) => f.name === "from");
  if (fromFields.length > 1) return refuse(554, "5.6.0 Message refused: more than one From: field");
  let fromAddresses: string[];
  if (fromFields.length === 0) {
    fields.push({ name: "from", text: `From: <${headerText(context.envelopeFrom)}>` });
    fromAddresses = [context.envelopeFrom];
    changes.push("from-added");
  } else {
    fromAddresses = [];
    for (const written of authors.get(fromFields[0]!)!) {
      const address = normalized(written);
      if (!address || !context.owned.has(address)) {
        // Reply text is printable US-ASCII (RFC 5321 4.2); the header's bytes are not echoed as they are.
        const shown = headerText(written).slice(0, 200).replace(/[^\x20-\x7e]/g, "?");
        return refuse(553, `5.7.1 From: address <${shown}> is not owned by the authenticated user`);
      }
      fromAddresses.push(address);
    }
  }

  const senderFields = fields.filter((f) => f.name === "sender");
  if (senderFields.length > 1) return refuse(554, "5.6.0 Message refused: more than one Sender: field");
  if (senderFields.length === 1) {
    const address = normalized(authors.get(senderFields[0]!)![0]!);
    if (!address || !context.owned.has(address)) {
      return refuse(553, "5.7.1 Sender: address is not owned by the authenticated user");
    }
  } else if (new Set(fromAddresses).size > 1) {
    fields.push({ name: "sender", text: `Sender: <${headerText(context.user)}>` });
    changes.push("sender-added");
  }

  if (!fields.some((f) => f.name === "date")) {
    fields.push({ name: "date", text: `Date: ${messageDate(context.now ?? new Date())}` });
    changes.push("date-added");
  }
  const messageIdField = fields.find((f) => f.name === "message-id");
  let messageId = messageIdField ? fieldValue(messageIdField) : null;
  if (!messageId) {
    messageId = `<${randomBytes(12).toString("hex")}@${context.hostname}>`;
    fields = fields.filter((f) => f.name !== "message-id");
    fields.push({ name: "message-id", text: `Message-ID: ${messageId}` });
    changes.push("message-id-added");
  }

  if (changes.length === 0) return { ok: true, message: raw, fromAddresses, messageId, changes };
  const header = Buffer.from(`${fields.map((f) => f.text).join("\r\n")}\r\n\r\n`, "latin1");
  return { ok: true, message: Buffer.concat([header, raw.subarray(bodyStart)]), fromAddresses, messageId, changes };
}

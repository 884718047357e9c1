import { Readable } from "node:stream";
import { MailParser, type AddressObject, type AttachmentStream, type EmailAddress, type MessageText } from "mailparser";
import { MimeNode, Splitter } from "@zone-eu/mailsplit";
import libmime from "libmime";
import { headerBoundary } from "@mailstack/mail";

/** One MIME part: its type, name and size (bytes of its body as transmitted, children included). */
export interface MimePart {
  partId: string;
  type: string;
  filename?: string;
  disposition?: string;
  encoding?: string;
  charset?: string;
  size: number;
  parts?: MimePart[];
}

export interface Mailbox {
  name: string;
  address: string;
}

/** What the MDA keeps on messages.parsed: what a mail client or an admin needs, bounded. */
export interface ParsedMessage {
  subject: string | null;
  from: Mailbox[];
  to: Mailbox[];
  cc: Mailbox[];
  replyTo: Mailbox[];
  date: string | null;
  messageId: string | null;
  inReplyTo: string | null;
  references: string[];
  size: number;
  /** Top-level header fields, lower-cased name and decoded, unfolded value, in message order (bounded). */
  headers: Array<[string, string]>;
  /** X-Spam-Flag: YES was present. */
  spam: boolean;
  structure: MimePart | null;
  attachments: Array<{ partId: string | null; type: string; filename: string | null; size: number }>;
  /** Set when part of the message could not be parsed; what could be read is still there. */
  errors?: string[];
}

const MAX_HEADERS = 300;
/**
 * Filter rules read these values: a long To: or Cc: list must be seen whole, or a rule on an
 * address far down it never matches. Postfix's header_size_limit (102400) bounds one field;
 * the header section as a whole is bounded by MAX_HEADER_SECTION.
 */
const MAX_HEADER_VALUE = 102_400;
const MAX_PARTS = 500;
const MAX_ADDRESSES = 200;
const MAX_TEXT = 1_000;

function clip(text: string, max = MAX_TEXT): string {
  return text.length > max ? text.slice(0, max) : text;
}

function mailboxes(value: AddressObject | AddressObject[] | undefined): Mailbox[] {
  const out: Mailbox[] = [];
  const add = (entries: EmailAddress[]) => {
    for (const entry of entries) {
      if (out.length >= MAX_ADDRESSES) return;
      if (entry.group) add(entry.group);
      else if (entry.address || entry.name) out.push({ name: clip(entry.name ?? ""), address: clip(entry.address ?? "") });
    }
  };
  for (const object of Array.isArray(value) ? value : value ? [value] : []) add(object.value ?? []);
  return out;
}

/**
 * Unfolds and decodes the raw header lines of the top-level header (RFC 5322 §2.2.3, RFC 2047).
 * mailparser hands the lines over as one character per byte; the section it read is UTF-8.
 */
function headerList(lines: ReadonlyArray<{ key: string; line: string }>): Array<[string, string]> {
  const out: Array<[string, string]> = [];
  for (const { key, line: bytes } of lines.slice(0, MAX_HEADERS)) {
    if (!key) continue;
    const line = Buffer.from(bytes, "latin1").toString("utf8");
    const colon = line.indexOf(":");
    const raw = (colon >= 0 ? line.slice(colon + 1) : "").replace(/\r?\n(?=[ \t])/g, "").trim();
    let value = raw;
    try {
      value = libmime.decodeWords(raw);
    } catch {
      // Keep the undecoded text: a bad encoded-word must not lose the header.
    }
    out.push([key.toLowerCase(), clip(value, MAX_HEADER_VALUE)]);
  }
  return out;
}

interface SplitNode {
  root?: boolean;
  parentNode?: unknown;
  contentType?: string | false;
  filename?: string | false;
  disposition?: string | false;
  encoding?: string | false;
  charset?: string | false;
  partNr?: Array<number | string> | false;
  headers?: { get(key: string): unknown[] } | false;
  _boundary?: Buffer | false;
}

const MAX_DEPTH = 8;
/** The header section handed to mailparser is cut here (a header this large is abuse anyway). */
const MAX_HEADER_SECTION = 512 * 1024;

/** Bytes a part's body decodes to, counted as it streams by (no decoded copy is made). */
class DecodedSize {
  private readonly encoding: string;
  private count = 0;
  private padding = 0;
  private carry = "";
  constructor(encoding: string) {
    this.encoding = encoding;
  }
  add(chunk: Buffer): void {
    if (this.encoding === "base64") {
      for (const byte of chunk) {
        if (byte === 0x3d) this.padding++;
        else if ((byte >= 0x41 && byte <= 0x5a) || (byte >= 0x61 && byte <= 0x7a) || (byte >= 0x30 && byte <= 0x39) || byte === 0x2b || byte === 0x2f) this.count++;
      }
    } else if (this.encoding === "quoted-printable") {
      // Each =XX is one byte, each soft break (= at a line end) none; a trailing partial escape waits for the next chunk.
      const text = this.carry + chunk.toString("latin1");
      const cut = Math.max(0, text.length - 3);
      const head = text.slice(0, cut);
      this.carry = text.slice(cut);
      this.count += this.qpLength(head);
    } else {
      this.count += chunk.length;
    }
  }
  private qpLength(text: string): number {
    const softBreaks = (text.match(/=\r?\n/g) ?? []).reduce((sum, m) => sum + m.length, 0);
    const escapes = (text.replace(/=\r?\n/g, "").match(/=[0-9A-Fa-f]{2}/g) ?? []).length;
    return text.length - softBreaks - escapes * 2;
  }
  get bytes(): number {
    if (this.encoding === "base64") return Math.floor(((this.count + this.padding) * 3) / 4) - this.padding;
    if (this.encoding === "quoted-printable") return this.count + this.qpLength(this.carry);
    return this.count;
  }
}

const SPLITTER_OPTIONS = { ignoreEmbedded: true };
const TOO_MANY_PARTS = `mime: more than ${MAX_PARTS} parts, the rest are not listed`;

/** Parts left to list in the whole tree, and what could not be read as given. */
interface Budget {
  parts: number;
  notes: string[];
}
/** Larger header sections take the full walk, whose splitter enforces its own header limit. */
const SINGLE_PART_HEADER_LIMIT = 64 * 1024;

/** A part as the splitter describes it, before its body is counted. */
function partOf(node: SplitNode, partId: string): MimePart {
  const part: MimePart = { partId, type: (node.contentType || "text/plain").toLowerCase(), size: 0 };
  if (node.filename) part.filename = clip(String(node.filename), 255);
  if (node.disposition) part.disposition = String(node.disposition);
  if (node.encoding) part.encoding = String(node.encoding);
  if (node.charset) part.charset = String(node.charset);
  return part;
}

/**
 * Walks the MIME tree with mailsplit (the splitter mailparser itself uses), counting body bytes
 * per part. An attached message/rfc822 is walked as well (decoded when base64), as a child of its part.
 */
async function mimeStructure(
  raw: Buffer,
  attachments: ParsedMessage["attachments"],
  prefix = "",
  depth = 0,
  budget: Budget = { parts: MAX_PARTS, notes: [] },
): Promise<MimePart | null> {
  const splitter = new Splitter(SPLITTER_OPTIONS);
  const parts = new Map<unknown, MimePart>();
  const decoded = new Map<MimePart, DecodedSize>();
  const embedded = new Map<MimePart, Buffer[]>();
  // What a multipart holds outside its parts (preamble, epilogue, or all of it without a boundary).
  const unsplit = new Map<MimePart, number>();
  let root: MimePart | null = null;
  let count = 0;
  Readable.from([raw]).pipe(splitter as unknown as NodeJS.WritableStream);
  for await (const chunk of splitter as AsyncIterable<{ type: string; value?: Buffer; node?: unknown } & SplitNode>) {
    if (chunk.type === "node") {
      const node = chunk as SplitNode;
      if (budget.parts <= 0) {
        if (!budget.notes.includes(TOO_MANY_PARTS)) budget.notes.push(TOO_MANY_PARTS);
        continue;
      }
      budget.parts--;
      count++;
      const partNr = Array.isArray(node.partNr) ? node.partNr.filter((n) => typeof n === "number").join(".") : "";
      const parent = node.parentNode ? parts.get(node.parentNode) : undefined;
      // RFC 2046 §5.1.5: a digest's parts without a Content-Type are messages.
      // (mailsplit itself defaults every part without one to text/plain).
      const typed = node.headers ? node.headers.get("content-type").length > 0 : true;
      const inDigest = parent?.type === "multipart/digest" && !typed;
      const part = partOf(node, node.root ? prefix.replace(/\.$/, "") : prefix + (partNr || String(count)));
      if (inDigest) part.type = "message/rfc822";
      parts.set(chunk, part);
      if (!part.type.startsWith("multipart/")) decoded.set(part, new DecodedSize(part.encoding ?? ""));
      else unsplit.set(part, 0);
      if (part.type === "message/rfc822" && depth < MAX_DEPTH) embedded.set(part, []);
      if (parent) (parent.parts ??= []).push(part);
      else if (!root) root = part;
    } else if (chunk.type === "body" && chunk.value && chunk.node) {
      const part = parts.get(chunk.node);
      if (!part) continue;
      part.size += chunk.value.length;
      decoded.get(part)?.add(chunk.value);
      embedded.get(part)?.push(chunk.value);
    } else if (chunk.type === "data" && chunk.value && chunk.node) {
      const part = parts.get(chunk.node);
      if (part && unsplit.has(part)) unsplit.set(part, unsplit.get(part)! + chunk.value.length);
    }
  }
  // A multipart without a boundary, or whose boundary never occurs, has no parts: its body is
  // read as text/plain, as RFC 2045 §5.2 says of a Content-Type that cannot be used.
  for (const [part, bytes] of unsplit) {
    // (When the part budget ran out its parts may just not be listed.)
    if (part.parts?.length || budget.parts <= 0) continue;
    budget.notes.push(`mime: ${part.type} ${part.partId ? `part ${part.partId} ` : ""}has no parts (no usable boundary); read as text/plain`);
    part.type = "text/plain";
    part.size = bytes;
  }
  // A multipart's size is the sum of its parts' bodies.
  const total = (part: MimePart): number => {
    if (part.parts && part.type.startsWith("multipart/")) part.size = part.parts.reduce((sum, child) => sum + total(child), 0);
    return part.size;
  };
  if (root) total(root);
  // What mailparser would list as attachments: every part that is not inline text.
  if (depth === 0) {
    for (const [part, size] of decoded) {
      const inlineText = (part.type === "text/plain" || part.type === "text/html") && part.disposition !== "attachment";
      if (inlineText || part === root || attachments.length >= MAX_PARTS) continue;
      attachments.push({ partId: part.partId || null, type: part.type, filename: part.filename ?? null, size: size.bytes });
    }
  }
  for (const [part, chunks] of embedded) {
    let body = Buffer.concat(chunks);
    if (part.encoding === "base64") body = Buffer.from(body.toString("latin1").replace(/[^A-Za-z0-9+/=]/g, ""), "base64");
    const inner = await mimeStructure(body, attachments, `${part.partId}.`, depth + 1, budget);
    if (inner) part.parts = [inner];
  }
  return root;
}

/**
 * The MIME structure. A message whose top part is a single leaf (text, or one attachment as the
 * whole body: no multipart, no attached message) has nothing below its header to walk: its
 * header is read by the same splitter and its size is the rest of the message, which spares
 * the line-by-line pass over the body. Anything else, or a header ended by a bare LF, gets the walk.
 */
export async function structureOf(raw: Buffer, attachments: ParsedMessage["attachments"], notes: string[] = []): Promise<MimePart | null> {
  const boundary = headerBoundary(raw);
  // Four bytes from the end of the fields to the body: CRLF CRLF (a bare LF, or an empty first line, is fewer).
  if (boundary && boundary.bodyStart - boundary.headerEnd === 4 && boundary.bodyStart <= SINGLE_PART_HEADER_LIMIT) {
    // The splitter's own header reader, without the stream around it.
    const node = new MimeNode(false, SPLITTER_OPTIONS) as unknown as SplitNode & { addHeaderChunk(line: Buffer): boolean; parseHeaders(): void };
    node.addHeaderChunk(raw.subarray(0, boundary.bodyStart));
    node.parseHeaders();
    const root = partOf(node, "");
    if (!root.type.startsWith("multipart/") && root.type !== "message/rfc822") {
      root.size = raw.length - boundary.bodyStart;
      return root;
    }
  }
  return mimeStructure(raw, attachments, "", 0, { parts: MAX_PARTS, notes });
}

/** The structure by walking the whole message (exported for the test that compares the two). */
export function walkStructure(raw: Buffer, attachments: ParsedMessage["attachments"]): Promise<MimePart | null> {
  return mimeStructure(raw, attachments);
}

/** The header section of a message (up to and including the empty line), bounded. */
function headerSection(raw: Buffer): Buffer {
  return raw.subarray(0, Math.min(headerBoundary(raw)?.bodyStart ?? raw.length, MAX_HEADER_SECTION));
}

const strictUtf8 = new TextDecoder("utf-8", { fatal: true });
const windows1252 = new TextDecoder("windows-1252");

/**
 * The header section with every line in UTF-8. RFC 6532 header fields are UTF-8 already;
 * a line whose 8-bit bytes are not UTF-8 is legacy mail (RFC 5322 forbids it, senders still
 * write Latin-1 or Windows-1252), read as Windows-1252, a superset of Latin-1 for text, rather
 * than turned into U+FFFD by a UTF-8 reading.
 */
export function utf8HeaderSection(section: Buffer): Buffer {
  let eightBit = false;
  for (const byte of section) {
    if (byte >= 0x80) {
      eightBit = true;
      break;
    }
  }
  if (!eightBit) return section;
  const lines: Buffer[] = [];
  let start = 0;
  while (start < section.length) {
    const lf = section.indexOf(0x0a, start);
    const end = lf < 0 ? section.length : lf + 1;
    const line = section.subarray(start, end);
    try {
      strictUtf8.decode(line);
      lines.push(line);
    } catch {
      lines.push(Buffer.from(windows1252.decode(line), "utf8"));
    }
    start = end;
  }
  return Buffer.concat(lines);
}

/**
 * Runs mailparser over the header section for the header fields (decoded words, address
 * lists, dates, ids). The body is walked by mimeStructure with mailsplit, the splitter
 * mailparser is built on: running mailparser's text decoding over every body only to throw
 * the text away cost a lot of native memory for nothing.
 */
async function readHeaders(raw: Buffer, parsed: ParsedMessage): Promise<void> {
  const parser = new MailParser({
    skipHtmlToText: true,
    skipTextToHtml: true,
    skipTextLinks: true,
    skipImageLinks: true,
    checksumAlgo: false,
  });
  let headers: Map<string, unknown> = new Map();
  let lines: ReadonlyArray<{ key: string; line: string }> = [];
  parser.on("headers", (value: Map<string, unknown>) => (headers = value));
  parser.on("headerLines", (value: ReadonlyArray<{ key: string; line: string }>) => (lines = value));
  parser.on("data", (data: AttachmentStream | MessageText) => {
    if (data.type === "attachment") {
      data.content.resume();
      data.content.on("end", () => data.release?.());
    }
  });
  await new Promise<void>((resolve, reject) => {
    parser.once("end", resolve);
    parser.once("error", reject);
    parser.end(utf8HeaderSection(headerSection(raw)));
  });
  const text = (name: string) => {
    const value = headers.get(name);
    return typeof value === "string" ? clip(value) : null;
  };
  parsed.subject = text("subject");
  parsed.from = mailboxes(headers.get("from") as AddressObject | undefined);
  parsed.to = mailboxes(headers.get("to") as AddressObject | AddressObject[] | undefined);
  parsed.cc = mailboxes(headers.get("cc") as AddressObject | AddressObject[] | undefined);
  parsed.replyTo = mailboxes(headers.get("reply-to") as AddressObject | undefined);
  parsed.headers = headerList(lines);
  // Every field counts, not only the ones listed: a filter in front may append its flag after
  // a padded header section (more than MAX_HEADERS fields) that would otherwise hide it.
  parsed.spam = lines.some(({ key, line }) => key.toLowerCase() === "x-spam-flag" && /^[^:]*:\s*yes\b/i.test(line));
  // mailparser puts the current time in place of a Date it cannot read: that is no date.
  const date = headers.get("date");
  const given = parsed.headers.find(([name]) => name === "date")?.[1];
  const readable = given !== undefined && !Number.isNaN(new Date(given).getTime());
  parsed.date = readable && date instanceof Date && !Number.isNaN(date.getTime()) ? date.toISOString() : null;
  parsed.messageId = text("message-id");
  parsed.inReplyTo = text("in-reply-to");
  const references = headers.get("references");
  parsed.references = (Array.isArray(references) ? references : typeof references === "string" ? [references] : [])
    .slice(0, 100)
    .map((r) => clip(String(r)));
}

/**
 * Parses a message once, for metadata only. Never throws: a malformed message yields
 * whatever could be read plus `errors`, so a parse failure never fails a delivery.
 */
export async function parseMessage(raw: Buffer): Promise<ParsedMessage> {
  const parsed: ParsedMessage = {
    subject: null, from: [], to: [], cc: [], replyTo: [], date: null, messageId: null, inReplyTo: null,
    references: [], size: raw.length, headers: [], spam: false, structure: null, attachments: [],
  };
  const errors: string[] = [];
  try {
    await readHeaders(raw, parsed);
  } catch (error) {
    errors.push(`headers: ${(error as Error).message}`);
  }
  try {
    parsed.structure = await structureOf(raw, parsed.attachments, errors);
  } catch (error) {
    errors.push(`mime: ${(error as Error).message}`);
  }
  if (errors.length) parsed.errors = errors;
  return parsed;
}

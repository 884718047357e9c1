import { hasEightBit } from "./dot-stuff.ts";

/** Parts within parts the walk follows; deeper than that, any 8-bit byte counts as UTF-8 header fields. */
const MAX_DEPTH = 20;
const EIGHT_BIT = /[\x80-\xff]/;

/**
 * Whether the message holds UTF-8 header fields (RFC 6532) at any level of its MIME structure,
 * which RFC 6531 3.2 forbids sending to a server without SMTPUTF8: the message's own header,
 * the header of any body part, the header of an embedded message/rfc822 or message/global, and
 * a message/global-headers part (RFC 6533 4.3: the header of an internationalized message, as
 * a DSN returns it). A part encoded base64 or quoted-printable is 7-bit whatever it holds, and
 * 8-bit body content (message/global-delivery-status included) only needs 8BITMIME.
 */
export function hasUtf8HeaderFields(raw: Buffer): boolean {
  // Bytes are read as latin1: one character per byte, so a character above 0x7f is an 8-bit byte.
  return hasEightBit(raw) && entityHasUtf8Header(raw.toString("latin1"), "text/plain", 0);
}

function entityHasUtf8Header(entity: string, defaultType: string, depth: number): boolean {
  const { header, body } = splitEntity(entity);
  if (EIGHT_BIT.test(header)) return true;
  if (!EIGHT_BIT.test(body)) return false;
  if (depth >= MAX_DEPTH) return true;
  const encoding = (headerField(header, "content-transfer-encoding") ?? "").trim().toLowerCase();
  if (encoding === "base64" || encoding === "quoted-printable") return false;
  const contentType = headerField(header, "content-type");
  const type = contentType === null ? defaultType : mediaType(contentType);
  if (type.startsWith("multipart/")) {
    const boundary = boundaryOf(contentType ?? "");
    if (!boundary) return false;
    // RFC 2046 5.1.5: the parts of a digest are messages unless they say otherwise.
    const partDefault = type === "multipart/digest" ? "message/rfc822" : "text/plain";
    return bodyParts(body, boundary).some((part) => entityHasUtf8Header(part, partDefault, depth + 1));
  }
  if (type === "message/rfc822" || type === "message/global") return entityHasUtf8Header(body, "text/plain", depth + 1);
  // A header section with 8-bit bytes (the body has some, see above).
  return type === "message/global-headers";
}

/**
 * One of our own DSNs made 7-bit, for a next hop that cannot take it as it is (no SMTPUTF8 for a
 * returned message/global or message/global-headers, or no 8BITMIME): every 8-bit part of the
 * report is base64-encoded. RFC 6532 3.5 lifts RFC 2045's ban on encoding message/ subtypes for
 * these, RFC 6532 3.7 and RFC 6533 allow base64 or quoted-printable on message/global,
 * message/global-headers and message/global-delivery-status, and RFC 6533 has a server encode the
 * returned message so when the return path does not support SMTPUTF8.
 * Null when that cannot make the report 7-bit: 8-bit bytes in its own header
 * (a UTF-8 To:), a returned message/rfc822 with 8-bit content (RFC 2046 5.2.1 allows it no
 * encoding), or a message that is not a multipart.
 */
export function sevenBitReport(raw: Buffer): Buffer | null {
  const text = raw.toString("latin1");
  const { header, body } = splitEntity(text);
  if (header === text) return null;
  const contentType = headerField(header, "content-type");
  if (EIGHT_BIT.test(header) || !contentType || !mediaType(contentType).startsWith("multipart/")) return null;
  const boundary = boundaryOf(contentType);
  if (!boundary) return null;
  let out = "";
  let last = 0;
  for (const [start, end] of partRanges(body, boundary)) {
    const part = body.slice(start, end);
    const encoded = EIGHT_BIT.test(part) ? base64Part(part) : part;
    if (encoded === null) return null;
    out += body.slice(last, start) + encoded;
    last = end;
  }
  out += body.slice(last);
  if (EIGHT_BIT.test(out)) return null;
  // The report's own label said 8bit; it now holds 7-bit data only (RFC 2045 6.4).
  return Buffer.from(withEncoding(header, "7bit") + "\r\n\r\n" + out, "latin1");
}

/** A body part (ending in the line break that belongs to the next delimiter) with its content in base64; null when that is not allowed. */
function base64Part(part: string): string | null {
  const { header, body } = splitEntity(part);
  const contentType = headerField(header, "content-type");
  const type = contentType === null ? "text/plain" : mediaType(contentType);
  const encoding = (headerField(header, "content-transfer-encoding") ?? "").trim().toLowerCase();
  if (EIGHT_BIT.test(header) || type.startsWith("multipart/") || type === "message/rfc822" || type === "message/partial" || type === "message/external-body") return null;
  if (encoding === "base64" || encoding === "quoted-printable") return null;
  const content = Buffer.from(body.replace(/\r?\n$/, ""), "latin1").toString("base64");
  const lines = content.match(/.{1,76}/g) ?? [];
  return `${withEncoding(header, "base64")}\r\n\r\n${lines.join("\r\n")}\r\n`;
}

/** A header section (without the empty line) whose Content-Transfer-Encoding field says `encoding`, last. */
function withEncoding(header: string, encoding: string): string {
  const fields = header ? header.split(/\r?\n(?![ \t])/) : [];
  const kept = fields.filter((f) => !/^content-transfer-encoding\s*:/i.test(f));
  return [...kept, `Content-Transfer-Encoding: ${encoding}`].join("\r\n");
}

/** The header section (without the empty line) and the body; a leading empty line means no header. */
function splitEntity(entity: string): { header: string; body: string } {
  const leading = /^\r?\n/.exec(entity);
  if (leading) return { header: "", body: entity.slice(leading[0].length) };
  const blank = /\r?\n\r?\n/.exec(entity);
  return blank ? { header: entity.slice(0, blank.index), body: entity.slice(blank.index + blank[0].length) } : { header: entity, body: "" };
}

/** The first field of that (lower-case) name, unfolded; null when absent. */
function headerField(header: string, name: string): string | null {
  for (const line of header.replace(/\r?\n(?=[ \t])/g, "").split(/\r?\n/)) {
    const colon = line.indexOf(":");
    if (colon > 0 && line.slice(0, colon).trim().toLowerCase() === name) return line.slice(colon + 1);
  }
  return null;
}

/** type/subtype in lower case; text/plain for a value that is not one (RFC 2045 5.2). */
function mediaType(value: string): string {
  const type = value.split(";", 1)[0]!.trim().toLowerCase();
  return /^[^\s/]+\/[^\s/]+$/.test(type) ? type : "text/plain";
}

function boundaryOf(contentType: string): string | null {
  const match = /;\s*boundary\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s;"]+))/i.exec(contentType);
  if (!match) return null;
  return match[1] !== undefined ? match[1].replace(/\\(.)/g, "$1") : match[2]!;
}

/** The body parts between "--boundary" lines, up to "--boundary--" (or the end, when it is missing). */
function bodyParts(body: string, boundary: string): string[] {
  return partRanges(body, boundary).map(([start, end]) => body.slice(start, end));
}

/** Where each body part starts and ends (before its closing delimiter line) in the body. */
function partRanges(body: string, boundary: string): Array<[number, number]> {
  const delimiter = `--${boundary}`;
  const parts: Array<[number, number]> = [];
  let start = -1;
  for (let position = 0; position < body.length; ) {
    let end = body.indexOf("\n", position);
    if (end < 0) end = body.length;
    if (body.startsWith(delimiter, position)) {
      const rest = body.slice(position + delimiter.length, end).replace(/\r$/, "");
      if (/^(?:--)?[ \t]*$/.test(rest)) {
        if (start >= 0) parts.push([start, position]);
        if (rest.startsWith("--")) return parts;
        start = end + 1;
      }
    }
    position = end + 1;
  }
  if (start >= 0 && start < body.length) parts.push([start, body.length]);
  return parts;
}

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
  const delimiter = `--${boundary}`;
  const parts: string[] = [];
  let start = -1;
  for (let position = 0; position < body.length; ) {
    let end = body.indexOf("\n", position);
    if (end < 0) end = body.length;
    if (body.startsWith(delimiter, position)) {
      const rest = body.slice(position + delimiter.length, end).replace(/\r$/, "");
      if (/^(?:--)?[ \t]*$/.test(rest)) {
        if (start >= 0) parts.push(body.slice(start, position));
        if (rest.startsWith("--")) return parts;
        start = end + 1;
      }
    }
    position = end + 1;
  }
  if (start >= 0 && start < body.length) parts.push(body.slice(start));
  return parts;
}

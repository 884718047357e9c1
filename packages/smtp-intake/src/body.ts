import { headerBoundary } from "@mailstack/mail";

/**
 * Checks a message body as it streams in, without holding more than one chunk's worth of
 * state: bare CR or LF (the raw material of SMTP smuggling), NUL bytes, and 8-bit bytes
 * in the header section (which need SMTPUTF8, RFC 6531/6532).
 */
export class BodyScanner {
  bareLineEnding = false;
  nul = false;
  eightBitHeader = false;
  /** Offset just past the blank line ending the header section, or -1 while still in headers. */
  headerEnd = -1;
  private offset = 0;
  private previous = -1;
  /** The last 3 bytes seen, to find CRLFCRLF across chunk boundaries. */
  private tail = 0;

  push(chunk: Buffer): void {
    if (!this.nul && chunk.indexOf(0) >= 0) this.nul = true;
    if (!this.bareLineEnding) this.bareLineEnding = hasBareLineEnding(chunk, this.previous);
    if (this.headerEnd < 0) {
      for (let i = 0; i < chunk.length; i++) {
        const byte = chunk[i]!;
        if (byte >= 0x80) this.eightBitHeader = true;
        this.tail = ((this.tail << 8) | byte) >>> 0;
        if (this.tail === 0x0d0a0d0a || (this.offset + i === 1 && (this.tail & 0xffff) === 0x0d0a)) {
          // CRLFCRLF ends the headers; a message starting with CRLF has none.
          this.headerEnd = this.offset + i + 1;
          break;
        }
      }
    }
    this.offset += chunk.length;
    if (chunk.length > 0) this.previous = chunk[chunk.length - 1]!;
  }

  /** Call at the end: a CR as the very last byte was not followed by LF. */
  finish(): void {
    if (this.previous === 0x0d) this.bareLineEnding = true;
  }
}

/** Whether the bytes hold a bare CR or LF (`previous`: the byte before them, when they continue a stream). */
export function hasBareLineEnding(chunk: Buffer, previous = -1): boolean {
  // A CR that ended the previous chunk must be followed by LF here.
  if (previous === 0x0d && chunk.length > 0 && chunk[0] !== 0x0a) return true;
  for (let i = chunk.indexOf(0x0a); i >= 0; i = chunk.indexOf(0x0a, i + 1)) {
    const before = i === 0 ? previous : chunk[i - 1];
    if (before !== 0x0d) return true;
  }
  for (let i = chunk.indexOf(0x0d); i >= 0; i = chunk.indexOf(0x0d, i + 1)) {
    if (i + 1 < chunk.length && chunk[i + 1] !== 0x0a) return true;
  }
  return false;
}

/** Rewrites every bare CR and bare LF as CRLF. */
export function normalizeLineEndings(raw: Buffer): Buffer {
  const out = Buffer.allocUnsafe(raw.length * 2);
  let n = 0;
  for (let i = 0; i < raw.length; i++) {
    const byte = raw[i]!;
    if (byte === 0x0d) {
      out[n++] = 0x0d;
      out[n++] = 0x0a;
      if (raw[i + 1] === 0x0a) i++;
    } else if (byte === 0x0a) {
      out[n++] = 0x0d;
      out[n++] = 0x0a;
    } else {
      out[n++] = byte;
    }
  }
  return Buffer.from(out.subarray(0, n));
}

/** The header fields of a message (up to its first empty line), as latin1 text. */
export function headerSection(raw: Buffer, limit = 256 * 1024): string {
  const end = headerBoundary(raw)?.headerEnd ?? raw.length;
  return raw.subarray(0, Math.min(end, limit)).toString("latin1");
}

/** How many trace fields (`Received:`) the header section holds: the hops the message has made. */
export function receivedCount(raw: Buffer): number {
  return headerSection(raw).match(/^received[ \t]*:/gim)?.length ?? 0;
}

/** The first value of a header field (unfolded, trimmed), or null. */
export function headerValue(raw: Buffer, name: string): string | null {
  const lines = headerSection(raw).replace(/\r\n[ \t]+/g, " ").split("\r\n");
  const prefix = `${name.toLowerCase()}:`;
  for (const line of lines) {
    if (line.toLowerCase().startsWith(prefix)) return line.slice(prefix.length).trim();
  }
  return null;
}

// A header field's first line: a name of printable characters other than ":", then ":" (RFC 5322 2.2; the WSP is obs-optional).
const FIELD_START = /^[\x21-\x39\x3b-\x7e]+[ \t]*:/;

/**
 * Gives a message that does not begin with a header field an empty header section (a leading
 * CRLF), as Postfix's cleanup does, so that trace fields put on top of it stay a header
 * section of their own: its first line must not become a malformed field, nor a leading space
 * a continuation of our Received:. Other messages, and an empty one, are returned unchanged.
 */
export function withHeaderSection(raw: Buffer): Buffer {
  if (raw.length === 0 || (raw[0] === 0x0d && raw[1] === 0x0a)) return raw;
  const end = raw.indexOf("\r\n");
  const firstLine = raw.subarray(0, end < 0 ? raw.length : end).toString("latin1");
  return FIELD_START.test(firstLine) ? raw : Buffer.concat([Buffer.from("\r\n"), raw]);
}

/**
 * The message without the Authentication-Results: fields that claim our authserv-id. They did
 * not come from us, and RFC 8601 5 says they MUST be deleted: a forged "dkim=pass" under our
 * name would be believed downstream. Other fields, others' results included, stay byte for byte.
 * mta-inbound applies it to every message, the msa to every submission (a user's forgery).
 */
export function withoutOurResults(raw: Buffer, authservId: string): Buffer {
  const boundary = headerBoundary(raw);
  const headerEnd = boundary ? boundary.headerEnd : raw.length;
  const header = raw.subarray(0, headerEnd).toString("latin1");
  if (!/^authentication-results[ \t]*:/im.test(header)) return raw;
  const fields: string[][] = [];
  for (const line of header.split("\r\n")) {
    if ((line.startsWith(" ") || line.startsWith("\t")) && fields.length > 0) fields[fields.length - 1]!.push(line);
    else fields.push([line]);
  }
  const ours = authservId.toLowerCase();
  const kept = fields.filter((lines) => {
    const field = /^authentication-results[ \t]*:(.*)$/is.exec(lines.join("\r\n"));
    if (!field) return true;
    // authserv-id: the first token after any comments, perhaps quoted (RFC 8601 2.2).
    const id = /^[^\s;(]+/.exec(field[1]!.replace(/^(?:\s|\([^()]*\))*/, ""))?.[0]?.replace(/^"(.*)"$/, "$1");
    return id?.toLowerCase() !== ours;
  });
  if (kept.length === fields.length) return raw;
  // With no field left, the CRLF that ended the last one goes too (the empty line stays).
  const rest = kept.length > 0 ? raw.subarray(headerEnd) : raw.subarray(Math.min(headerEnd + 2, raw.length));
  return Buffer.concat([Buffer.from(kept.flat().join("\r\n"), "latin1"), rest]);
}

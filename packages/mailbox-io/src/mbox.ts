// mboxrd (https://www.loc.gov/preservation/digital/formats/fdd/fdd000385.shtml): each message starts
// with a "From sender date" line; body lines matching /^>*From / get one more ">" on the way out
// and lose one on the way in. The writer appends exactly one "\n" after each message and the reader
// removes exactly one, so message bytes (CRLF or LF, with or without a final newline) round-trip exactly.

const FROM = Buffer.from("From ");
const NEWLINE = 0x0a;
const GT = 0x3e;

const DAYS = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

function two(n: number): string {
  return String(n).padStart(2, "0");
}

/** asctime(3) in UTC, as mbox "From " lines carry it: `Fri Nov 27 09:10:02 2026`. */
export function asctime(date: Date): string {
  return `${DAYS[date.getUTCDay()]} ${MONTHS[date.getUTCMonth()]} ${String(date.getUTCDate()).padStart(2, " ")} `
    + `${two(date.getUTCHours())}:${two(date.getUTCMinutes())}:${two(date.getUTCSeconds())} ${date.getUTCFullYear()}`;
}

export function parseAsctime(text: string): Date | null {
  const match = /^[A-Z][a-z]{2} ([A-Z][a-z]{2}) +(\d{1,2}) (\d{2}):(\d{2}):(\d{2}) (\d{4})/.exec(text.trim());
  if (!match) return null;
  const month = MONTHS.indexOf(match[1]!);
  if (month < 0) return null;
  const date = new Date(Date.UTC(Number(match[6]), month, Number(match[2]), Number(match[3]), Number(match[4]), Number(match[5])));
  return Number.isNaN(date.getTime()) ? null : date;
}

/**
 * The separator line for a message; the null sender is written as MAILER-DAEMON, as mail tools
 * do. The sender is written in UTF-8: an SMTPUTF8 address (RFC 6531) may hold any character.
 */
export function fromLine(envelopeFrom: string, receivedAt: Date): Buffer {
  const sender = envelopeFrom && !/\s/.test(envelopeFrom) ? envelopeFrom : "MAILER-DAEMON";
  return Buffer.from(`From ${sender} ${asctime(receivedAt)}\n`, "utf8");
}

function isQuotedFrom(line: Buffer, start: number): boolean {
  let i = start;
  while (i < line.length && line[i] === GT) i++;
  return line.length - i >= FROM.length && line.compare(FROM, 0, FROM.length, i, i + FROM.length) === 0;
}

/** One message as mboxrd: separator line, quoted body, one "\n". Returned as chunks to avoid copying the body. */
export function mboxrdEntry(envelopeFrom: string, receivedAt: Date, message: Buffer): Buffer[] {
  const chunks: Buffer[] = [fromLine(envelopeFrom, receivedAt)];
  let lineStart = 0;
  let copied = 0;
  while (lineStart < message.length) {
    const end = message.indexOf(NEWLINE, lineStart);
    const lineEnd = end === -1 ? message.length : end + 1;
    if (isQuotedFrom(message, lineStart)) {
      if (lineStart > copied) chunks.push(message.subarray(copied, lineStart));
      chunks.push(Buffer.from(">"));
      copied = lineStart;
    }
    lineStart = lineEnd;
  }
  if (copied < message.length) chunks.push(message.subarray(copied));
  chunks.push(Buffer.from("\n"));
  return chunks;
}

export interface MboxMessage {
  envelopeFrom: string;
  receivedAt: Date | null;
  raw: Buffer;
}

export class MboxFormatError extends Error {
  /** True when the input is refused for its size rather than its shape. */
  readonly tooLarge: boolean;
  constructor(message: string, tooLarge = false) {
    super(message);
    this.name = "MboxFormatError";
    this.tooLarge = tooLarge;
  }
}

/**
 * Reads mboxrd from a byte stream, yielding one message at a time; memory is bounded by
 * `maxMessageBytes` (a longer message is an error, not a truncation).
 */
export async function* readMboxrd(input: AsyncIterable<Buffer | string>, maxMessageBytes: number): AsyncGenerator<MboxMessage> {
  let current: { envelopeFrom: string; receivedAt: Date | null; parts: Buffer[]; size: number } | null = null;

  const finish = (): MboxMessage | null => {
    if (!current) return null;
    let raw = Buffer.concat(current.parts, current.size);
    if (raw.length > 0 && raw[raw.length - 1] === NEWLINE) raw = raw.subarray(0, raw.length - 1);
    const message = { envelopeFrom: current.envelopeFrom, receivedAt: current.receivedAt, raw };
    current = null;
    return message;
  };

  const takeLine = (line: Buffer): MboxMessage | null => {
    if (line.length >= FROM.length && line.compare(FROM, 0, FROM.length, 0, FROM.length) === 0) {
      const done = finish();
      const text = line.toString("utf8").replace(/\r?\n$/, "");
      const match = /^From (\S*)\s*(.*)$/.exec(text);
      const sender = match?.[1] ?? "";
      current = {
        envelopeFrom: sender === "MAILER-DAEMON" || sender === "<>" ? "" : sender,
        receivedAt: parseAsctime(match?.[2] ?? ""),
        parts: [],
        size: 0,
      };
      return done;
    }
    if (!current) throw new MboxFormatError("not an mbox file: it does not start with a \"From \" line");
    const body = isQuotedFrom(line, 0) && line[0] === GT ? line.subarray(1) : line;
    current.size += body.length;
    if (current.size > maxMessageBytes + 1) throw new MboxFormatError(`a message is larger than the limit of ${maxMessageBytes} bytes`, true);
    current.parts.push(body);
    return null;
  };

  // The start of a line not ended yet, in the pieces it came in: joined once, when its end comes
  // (joining at every chunk made a long line cost quadratic time).
  let carry: Buffer[] = [];
  let carryBytes = 0;
  for await (const chunk of input) {
    const data: Buffer = typeof chunk === "string" ? Buffer.from(chunk) : chunk;
    let start = 0;
    for (;;) {
      const end = data.indexOf(NEWLINE, start);
      if (end === -1) break;
      const piece = data.subarray(start, end + 1);
      // Copied out so the (possibly large) chunk it came from can be freed.
      const line = carryBytes ? Buffer.concat([...carry, piece], carryBytes + piece.length) : Buffer.from(piece);
      carry = [];
      carryBytes = 0;
      const done = takeLine(line);
      if (done) yield done;
      start = end + 1;
    }
    if (start < data.length) {
      const rest = Buffer.from(data.subarray(start));
      carry.push(rest);
      carryBytes += rest.length;
    }
    if (carryBytes > maxMessageBytes + 1) throw new MboxFormatError(`a line is longer than the limit of ${maxMessageBytes} bytes`, true);
  }
  if (carryBytes) {
    const done = takeLine(Buffer.concat(carry, carryBytes));
    if (done) yield done;
  }
  const last = finish();
  if (last) yield last;
}

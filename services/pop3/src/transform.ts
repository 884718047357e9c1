const CR = 0x0d;
const LF = 0x0a;
const DOT = 0x2e;
const DOT_BYTES = Buffer.from(".");
const CRLF_BYTES = Buffer.from("\r\n");

/**
 * Turns stored message bytes into what POP3 sends, chunk by chunk: every bare LF becomes CRLF,
 * a final CRLF is added when the last line lacks one, and (when `stuff`) a line starting with
 * "." gets a second ".". With `bodyLines` set (TOP), output stops after the header, the blank
 * line and that many body lines. Bare CR is passed through unchanged.
 *
 * The octet count of the unstuffed output is the size LIST and STAT report (`canonicalLength`).
 */
export class MessageEncoder {
  private atLineStart = true;
  private lastCR = false;
  private lineBytes = 0;
  private inBody = false;
  private bodyLinesSent = 0;
  private readonly stuff: boolean;
  private readonly bodyLines: number | null;
  /** True once TOP's line limit is reached; further input is ignored. */
  done = false;
  /** Octets produced so far, byte-stuffing excluded. */
  length = 0;

  constructor(options: { stuff?: boolean; bodyLines?: number | null } = {}) {
    this.stuff = options.stuff ?? true;
    this.bodyLines = options.bodyLines ?? null;
  }

  /** Encodes a chunk into one buffer (convenience for tests and small inputs). */
  push(chunk: Buffer): Buffer {
    const out: Buffer[] = [];
    this.pushTo(chunk, out);
    return out.length === 1 ? out[0]! : Buffer.concat(out);
  }

  /**
   * Encodes a chunk by appending slices of it (no copy) and the few inserted bytes to `out`.
   * Mail stored with CRLF and without leading dots passes through as one slice.
   */
  pushTo(chunk: Buffer, out: Buffer[] | null): void {
    if (this.done) return;
    let segmentStart = 0;
    let i = 0;
    while (i < chunk.length) {
      if (this.atLineStart && this.stuff && chunk[i] === DOT) {
        if (i > segmentStart) out?.push(chunk.subarray(segmentStart, i));
        out?.push(DOT_BYTES);
        segmentStart = i; // the line's own dot starts the next slice
      }
      const lf = chunk.indexOf(LF, i);
      const end = lf < 0 ? chunk.length : lf;
      if (end > i) {
        this.length += end - i;
        this.lineBytes += end - i;
        this.lastCR = chunk[end - 1] === CR;
        this.atLineStart = false;
      }
      if (lf < 0) break;
      if (this.lastCR) {
        this.length += 1;
      } else {
        out?.push(chunk.subarray(segmentStart, lf), CRLF_BYTES);
        segmentStart = lf + 1;
        this.length += 2;
      }
      i = lf + 1;
      this.endLine();
      if (this.done) break;
    }
    const stop = this.done ? i : chunk.length;
    if (stop > segmentStart) out?.push(chunk.subarray(segmentStart, stop));
  }

  /** The bytes that complete the last line, if it lacked its line ending. */
  end(): Buffer {
    if (this.done || this.atLineStart) return Buffer.alloc(0);
    const tail = this.lastCR ? Buffer.from([LF]) : Buffer.from([CR, LF]);
    this.length += tail.length;
    this.endLine();
    return tail;
  }

  private endLine(): void {
    const empty = this.lineBytes === 0 || (this.lineBytes === 1 && this.lastCR);
    this.atLineStart = true;
    this.lastCR = false;
    this.lineBytes = 0;
    if (this.bodyLines === null) return;
    if (!this.inBody) {
      if (empty) this.inBody = true;
    } else {
      this.bodyLinesSent++;
    }
    this.checkLimit();
  }

  private checkLimit(): void {
    if (this.bodyLines !== null && this.inBody && this.bodyLinesSent >= this.bodyLines) this.done = true;
  }
}

/** The octet count POP3 sends for these bytes (CRLF-normalised, final CRLF, before byte-stuffing). */
export function canonicalLength(chunks: Iterable<Buffer>): number {
  const encoder = new MessageEncoder({ stuff: false });
  for (const chunk of chunks) encoder.pushTo(chunk, null);
  encoder.end();
  return encoder.length;
}


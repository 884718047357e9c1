const CR = 0x0d;
const LF = 0x0a;
const DOT = 0x2e;

/**
 * Turns stored message bytes into the SMTP DATA stream: every line ending becomes CRLF
 * (bare CR and bare LF included), a line starting with "." gets a second one, and the
 * stream ends with CRLF "." CRLF. Whatever the stored message holds, the next hop sees
 * one message: no bare line ending can be read as an end of data (SMTP smuggling).
 */
export class DotStuffer {
  private atLineStart = true;
  private pendingCr = false;

  /** Encodes one chunk; state carries across chunk boundaries. */
  push(chunk: Buffer): Buffer {
    const out = Buffer.allocUnsafe(chunk.length * 2 + 2);
    let n = 0;
    for (let i = 0; i < chunk.length; i++) {
      const byte = chunk[i]!;
      if (this.pendingCr) {
        this.pendingCr = false;
        out[n++] = CR;
        out[n++] = LF;
        this.atLineStart = true;
        if (byte === LF) continue;
      }
      if (byte === CR) {
        this.pendingCr = true;
      } else if (byte === LF) {
        out[n++] = CR;
        out[n++] = LF;
        this.atLineStart = true;
      } else {
        if (this.atLineStart && byte === DOT) out[n++] = DOT;
        out[n++] = byte;
        this.atLineStart = false;
      }
    }
    return out.subarray(0, n);
  }

  /** The end of the data: a final line ending if the message lacked one, then ".". */
  end(): Buffer {
    let tail = "";
    if (this.pendingCr) {
      this.pendingCr = false;
      this.atLineStart = true;
      tail += "\r\n";
    }
    if (!this.atLineStart) tail += "\r\n";
    this.atLineStart = true;
    return Buffer.from(tail + ".\r\n");
  }
}

/** Encodes a whole message at once (tests and small messages). */
export function dotStuff(raw: Buffer): Buffer {
  const stuffer = new DotStuffer();
  return Buffer.concat([stuffer.push(raw), stuffer.end()]);
}

/** True when the message holds any byte above 127 (needs 8BITMIME). */
export function hasEightBit(raw: Buffer): boolean {
  for (let i = 0; i < raw.length; i++) if (raw[i]! > 0x7f) return true;
  return false;
}

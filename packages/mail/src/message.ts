/** Where a message's header section ends and its body begins. */
export interface HeaderBoundary {
  /** Where the header fields end: the line break of the last field starts here (0 when there is no field). */
  headerEnd: number;
  /** Just past the empty line: where the body starts. */
  bodyStart: number;
}

/**
 * The first empty line of a message, which ends its header section (RFC 5322 2.1). Lines end in
 * CRLF or, in mail stored or imported as it came, a bare LF, so the empty line is an LF followed
 * by LF or CRLF, or a line break as the very first line (a message without header fields).
 * `raw.subarray(0, headerEnd)` is the header fields without the last line break,
 * `raw.subarray(0, bodyStart)` the header section with the empty line. Null when there is no
 * empty line: the whole message is header.
 */
export function headerBoundary(raw: Buffer): HeaderBoundary | null {
  if (raw[0] === 0x0a) return { headerEnd: 0, bodyStart: 1 };
  if (raw[0] === 0x0d && raw[1] === 0x0a) return { headerEnd: 0, bodyStart: 2 };
  for (let lf = raw.indexOf(0x0a); lf >= 0; lf = raw.indexOf(0x0a, lf + 1)) {
    const next = raw[lf + 1];
    const blank = next === 0x0a ? 1 : next === 0x0d && raw[lf + 2] === 0x0a ? 2 : 0;
    if (blank > 0) return { headerEnd: raw[lf - 1] === 0x0d ? lf - 1 : lf, bodyStart: lf + 1 + blank };
  }
  return null;
}

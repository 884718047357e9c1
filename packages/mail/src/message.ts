/**
 * Where a message's body starts: just after the first empty line, found the way mailauth's
 * parser finds it (a LF followed by LF, or by CRLF); -1 when the message has no empty line
 * (header fields only).
 */
export function bodyStart(message: Buffer): number {
  for (let lf = message.indexOf(0x0a); lf >= 0; lf = message.indexOf(0x0a, lf + 1)) {
    const next = message[lf + 1];
    if (next === 0x0a) return lf + 2;
    if (next === 0x0d && message[lf + 2] === 0x0a) return lf + 3;
  }
  return -1;
}

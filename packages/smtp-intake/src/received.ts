/** RFC 5322 date-time in UTC, for trace headers. */
export function rfc5322Date(date = new Date()): string {
  return date.toUTCString().replace(/GMT$/, "+0000");
}

/**
 * Keeps a client-supplied token (a HELO name) printable and short enough for a header, without
 * the characters that would change how the field is read: "(", ")" and "\" (comments), '"' (an
 * unclosed quoted string would swallow the ";" before the date) and ";" (which ends the tokens).
 */
function clean(text: string, max = 200): string {
  return text.replace(/[^\x21-\x7e]/g, "").replace(/[()\\";]/g, "").slice(0, max) || "unknown";
}

/**
 * An address (as parseAddress gives it) for `for <...>`: as it is, spaces and quoting of a quoted
 * local part included, and UTF-8 where the message may carry it; only control characters go.
 */
function pathText(address: string, utf8: boolean): string {
  return [...address.replace(utf8 ? /[\x00-\x1f\x7f]/g : /[^\x20-\x7e]/g, "")].slice(0, 256).join("");
}

/**
 * The AUTH identity for a comment, every character kept but controls: "(", ")" and "\" as
 * quoted-pairs (RFC 5322 3.2.2); UTF-8 as it is where the message may carry it (RFC 6532), else
 * as RFC 2047 encoded-words, which a comment may hold (RFC 2047 5(2)), each at most 75
 * characters and split between characters.
 */
function commentText(text: string, utf8: boolean): string {
  const chars = [...text.replace(/[\x00-\x1f\x7f]/g, "")].slice(0, 320);
  if (utf8 || chars.every((char) => char <= "\x7f")) return chars.join("").replace(/[()\\]/g, "\\$&");
  const words: string[] = [];
  let chunk = "";
  for (const char of chars) {
    if (Buffer.byteLength(chunk + char) > 45) {
      words.push(chunk);
      chunk = "";
    }
    chunk += char;
  }
  words.push(chunk);
  return words.map((word) => `=?utf-8?B?${Buffer.from(word).toString("base64")}?=`).join(" ");
}

export interface ReceivedFields {
  helo: string | null;
  clientHostname: string | null;
  clientIp: string;
  hostname: string;
  /** ESMTP, ESMTPS, ESMTPA, ESMTPSA, SMTP (RFC 3848), LMTP. */
  protocol: string;
  /** The transaction used SMTPUTF8: the "with" type becomes UTF8SMTP/UTF8LMTP and its S/A forms (RFC 6531 3.7.3). */
  smtpUtf8?: boolean;
  queueId: string;
  traceId: string | null;
  tlsCipher?: string | null;
  /** The AUTH identity, shown as a comment (RFC 4954 section 7 allows it). */
  authenticatedUser?: string | null;
  /** Named in `for` only when the message goes to exactly one final mailbox (RFC 5321 4.4 privacy note). */
  recipient?: string | null;
  date?: Date;
}

/**
 * The registered "with" type (RFC 3848). TLS and AUTH are ESMTP extensions, so a session that
 * used them and then said HELO (smtp-server's SMTPS, SMTPA, SMTPSA) is written as ESMTP. A
 * transaction with SMTPUTF8 (an ESMTP extension too) is UTF8SMTP, UTF8SMTPS, UTF8SMTPA,
 * UTF8SMTPSA, or UTF8LMTP... over LMTP (RFC 6531 3.7.3).
 */
function withType(protocol: string, smtpUtf8: boolean): string {
  const type = /^SMTPS?A?$/.test(protocol) && protocol !== "SMTP" ? `E${protocol}` : protocol;
  if (!smtpUtf8) return type;
  return type.replace(/^E?SMTP/, "UTF8SMTP").replace(/^LMTP/, "UTF8LMTP");
}

/**
 * A Received: header (RFC 5321 4.4) with the queue id and, as a comment, the trace id,
 * folded at reasonable places and ending in CRLF. It may hold UTF-8 (the recipient, the AUTH
 * identity) when `smtpUtf8` is set: write it to the message as UTF-8.
 */
export function receivedHeader(f: ReceivedFields): string {
  const ip = f.clientIp.includes(":") ? `IPv6:${f.clientIp}` : f.clientIp;
  const from = `from ${clean(f.helo ?? "unknown")} (${f.clientHostname ? `${clean(f.clientHostname)} ` : ""}[${ip}])`;
  const utf8 = f.smtpUtf8 ?? false;
  const auth = f.authenticatedUser ? `\r\n\t(Authenticated sender: ${commentText(f.authenticatedUser, utf8)})` : "";
  const tls = f.tlsCipher ? ` (${clean(f.tlsCipher)})` : "";
  const by = `by ${clean(f.hostname)} (mailstack) with ${withType(f.protocol, utf8)}${tls} id ${f.queueId}${f.traceId ? ` (trace ${f.traceId})` : ""}`;
  const forPart = f.recipient ? `\r\n\tfor <${pathText(f.recipient, utf8)}>` : "";
  return `Received: ${from}${auth}\r\n\t${by}${forPart};\r\n\t${rfc5322Date(f.date)}\r\n`;
}

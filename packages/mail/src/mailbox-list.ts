/**
 * The author fields of a message (From:, Sender:) read strictly, RFC 5322 3.4 with RFC 6532
 * (UTF-8): mailbox *("," mailbox), a mailbox being `addr-spec` or `[display-name] <addr-spec>`,
 * with comments and folding white space between the parts. Groups, source routes, domain
 * literals, empty list entries and spaces or comments inside an address are refused, and so is
 * every form where a lenient parser (a mail client, a receiver's DMARC check, a filter) could
 * find an address this reading does not (the "header parsing differential" of Chen et al.,
 * "Composition Kills", USENIX Security 2020):
 *   - an "@" in a comment (some show or parse a comment as the address);
 *   - an RFC 2047 encoded-word, anywhere in the field, whose charset cannot be decoded or whose
 *     text decodes to "@", "<", ">" or a control character (clients that decode before parsing
 *     would see it);
 *   - control characters, and line breaks that are not folding;
 *   - a display name with an "@" (`"b@bank.test" <a@ours.test>`, common and accepted) in a field
 *     that also has comments, encoded-words, backslash escapes or "<" ">" in a name: each of
 *     those can move a quote's boundary for a parser that does not know it.
 */

export interface HeaderMailbox {
  /** The display name as written (quotes and encoded-words kept); "" when there is none. */
  name: string;
  /** The addr-spec as written: `local@domain`, or a bare local part when `allowNoDomain`. */
  address: string;
  /** Where the addr-spec is in the parsed text: [start, end). */
  start: number;
  end: number;
}

export type MailboxListResult = { ok: true; mailboxes: HeaderMailbox[] } | { ok: false; problem: string };

export interface MailboxListOptions {
  /** Exactly one mailbox (Sender:). */
  single?: boolean;
  /** Accept an address without "@domain" (`alice`, `Alice <alice>`), for a submission server to complete (RFC 6409 8.6). */
  allowNoDomain?: boolean;
}

interface Token {
  kind: "atom" | "quoted" | "special";
  /** The atom or special as written; a quoted string's content with its escapes removed. */
  text: string;
  start: number;
  end: number;
  /** White space or a comment came before it. */
  spaced: boolean;
  /** A quoted string that used a backslash escape. */
  escaped: boolean;
}

class Refused extends Error {}

/** What atoms and dot-atoms are made of: atext, ".", and (RFC 6532) non-ASCII characters. */
const ATOM_CHAR = /[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.\u00a0-\uffff]/;
const SPECIALS = "<>@,:;[]";
/** Control characters (HTAB and folding CRLF aside), DEL, C1 controls, and the Unicode line and paragraph separators. */
const CONTROL = /[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]/;
/** An encoded-word as lenient decoders find it (Python's email.header uses the same pattern). */
const ENCODED_WORD = /=\?([^?]*?)\?([BbQq])\?(.*?)\?=/gs;
const DOT_ATOM = /^[^.]+(?:\.[^.]+)*$/;

function isFold(text: string, i: number): boolean {
  return text[i] === "\r" && text[i + 1] === "\n" && (text[i + 2] === " " || text[i + 2] === "\t");
}

function tokenize(text: string): { tokens: Token[]; comments: boolean } {
  const tokens: Token[] = [];
  let comments = false;
  let spaced = false;
  let i = 0;
  while (i < text.length) {
    const c = text[i]!;
    if (c === " " || c === "\t") {
      i++;
      spaced = true;
    } else if (isFold(text, i)) {
      i += 2;
      spaced = true;
    } else if (c === "(") {
      i = skipComment(text, i);
      comments = true;
      spaced = true;
    } else if (c === '"') {
      const start = i;
      let content = "";
      let escaped = false;
      for (i++; text[i] !== '"'; i++) {
        if (i >= text.length) throw new Refused("a quoted string is not closed");
        if (isFold(text, i)) i += 1;
        else if (text[i] === "\\") {
          escaped = true;
          content += text[++i] ?? "";
        } else content += text[i];
      }
      i++;
      tokens.push({ kind: "quoted", text: content, start, end: i, spaced, escaped });
      spaced = false;
    } else if (ATOM_CHAR.test(c)) {
      const start = i;
      while (i < text.length && ATOM_CHAR.test(text[i]!)) i++;
      tokens.push({ kind: "atom", text: text.slice(start, i), start, end: i, spaced, escaped: false });
      spaced = false;
    } else if (SPECIALS.includes(c)) {
      tokens.push({ kind: "special", text: c, start: i, end: i + 1, spaced, escaped: false });
      i++;
      spaced = false;
    } else {
      throw new Refused(c === ")" ? "a ')' without its '('" : `'${c}' outside a quoted string`);
    }
  }
  return { tokens, comments };
}

/** Skips a comment (nested ones and escapes included) starting at `start`; returns the index after it. */
function skipComment(text: string, start: number): number {
  let depth = 0;
  for (let i = start; i < text.length; i++) {
    const c = text[i];
    if (c === "\\") i++;
    if (c === "@" || (c === "\\" && text[i] === "@")) throw new Refused("an '@' in a comment");
    if (c === "(") depth++;
    else if (c === ")" && --depth === 0) return i + 1;
  }
  throw new Refused("a comment is not closed");
}

function isSpecial(token: Token | undefined, char: string): boolean {
  return token?.kind === "special" && token.text === char;
}

/** An addr-spec made of exactly `tokens`, with no white space or comment inside. */
function addrSpec(text: string, tokens: Token[], options: MailboxListOptions): HeaderMailbox {
  const [local, at, domain] = tokens;
  if (!local) throw new Refused("an empty address");
  if (local.kind === "special") throw new Refused(local.text === "@" ? "a source route or an address without local part" : `'${local.text}' where an address should be`);
  if (!at && options.allowNoDomain && local.kind === "atom" && DOT_ATOM.test(local.text) && !/\s/.test(local.text)) {
    return { name: "", address: local.text, start: local.start, end: local.end };
  }
  if (!at) throw new Refused("an address without '@'");
  if (!isSpecial(at, "@")) throw new Refused("an entry that is neither an address nor a name with an address in '<>'");
  if (isSpecial(domain, "[")) throw new Refused("a domain literal");
  if (tokens.length > 3) throw new Refused("text after the address");
  // Unicode spaces are atom characters here, but trimmed or split on by others.
  if (at.spaced || domain?.spaced || /\s/.test(local.kind === "atom" ? local.text : "") || /\s/.test(domain?.text ?? "")) {
    throw new Refused("a space or comment inside an address");
  }
  if (local.kind === "atom" && !DOT_ATOM.test(local.text)) throw new Refused("a local part with a leading, trailing or double '.'");
  if (!domain || domain.kind !== "atom" || !DOT_ATOM.test(domain.text)) throw new Refused("an address without a valid domain");
  return { name: "", address: text.slice(local.start, domain.end), start: local.start, end: domain.end };
}

/** One entry of the list: `addr-spec` or `[phrase] <addr-spec>`; returns the mailbox and its display-name words. */
function mailbox(text: string, tokens: Token[], options: MailboxListOptions): { found: HeaderMailbox; phrase: Token[] } {
  if (tokens.length === 0) throw new Refused("an empty entry in the list");
  const open = tokens.findIndex((t) => isSpecial(t, "<"));
  if (open < 0) {
    if (!tokens.some((t) => isSpecial(t, "@")) && (tokens.length > 1 || tokens[0]!.kind === "quoted")) {
      throw new Refused("a display name without an address in '<>'");
    }
    return { found: addrSpec(text, tokens, options), phrase: [] };
  }
  const phrase = tokens.slice(0, open);
  for (const word of phrase) {
    if (isSpecial(word, "@")) throw new Refused("an '@' outside an address (a display name with '@' must be quoted)");
    if (word.kind === "special") throw new Refused(`'${word.text}' in a display name`);
  }
  const close = tokens.findIndex((t, i) => i > open && isSpecial(t, ">"));
  if (close < 0) throw new Refused("a '<' without its '>'");
  const inner = tokens.slice(open + 1, close);
  if (inner.some((t) => isSpecial(t, "<"))) throw new Refused("a '<' inside '<>'");
  if (inner[0]?.spaced || tokens[close]!.spaced) throw new Refused("a space or comment inside an address");
  const found = addrSpec(text, inner, options);
  const after = tokens.slice(close + 1);
  if (after.some((t) => isSpecial(t, "<"))) throw new Refused("more than one address in '<>' in one entry");
  if (after.length > 0) throw new Refused("text after the address");
  const name = phrase.length > 0 ? text.slice(phrase[0]!.start, phrase[phrase.length - 1]!.end) : "";
  return { found: { ...found, name }, phrase };
}

/** The text of an encoded-word, or null when its charset is unknown here. */
function decodeEncodedWord(charset: string, encoding: string, encoded: string): string | null {
  let decoder: InstanceType<typeof TextDecoder>;
  try {
    decoder = new TextDecoder(charset.split("*")[0]!.trim());
  } catch {
    return null;
  }
  // Characters beyond latin1 are not valid in an encoded-word; taking their low byte only errs towards refusing.
  const bytes = /^b$/i.test(encoding)
    ? Buffer.from(encoded, "base64")
    : Buffer.from(encoded.replace(/_/g, " ").replace(/=([0-9A-Fa-f]{2})/g, (_, hex: string) => String.fromCharCode(parseInt(hex, 16))), "latin1");
  return decoder.decode(bytes);
}

function checkEncodedWords(text: string): boolean {
  let found = false;
  // Nothing after the last "?=" can be an encoded-word; cutting it off keeps the scan linear.
  const candidates = text.slice(0, text.lastIndexOf("?=") + 2);
  for (const [, charset, encoding, encoded] of candidates.matchAll(ENCODED_WORD)) {
    found = true;
    const decoded = decodeEncodedWord(charset!, encoding!, encoded!);
    if (decoded === null) throw new Refused("an encoded-word (RFC 2047) in a charset that cannot be decoded here");
    if (/[@<>\t]/.test(decoded) || CONTROL.test(decoded)) {
      throw new Refused("an encoded-word (RFC 2047) that decodes to '@', '<', '>' or a control character");
    }
  }
  return found;
}

/**
 * Parses the value of a From: (or, with `single`, Sender:) field: the text after the colon,
 * folding line breaks (CRLF before a space or tab) included, as a JavaScript string (the
 * caller decodes the header's UTF-8). `problem` says in plain words what is wrong.
 */
export function parseMailboxList(text: string, options: MailboxListOptions = {}): MailboxListResult {
  try {
    if (CONTROL.test(text.replace(/\r\n(?=[ \t])/g, ""))) throw new Refused("a control character or a line break that is not folding");
    const encodedWords = checkEncodedWords(text);
    const { tokens, comments } = tokenize(text);
    if (tokens.some((t) => isSpecial(t, ":") || isSpecial(t, ";"))) throw new Refused("a group or a source route (':' or ';')");
    const entries: Token[][] = [[]];
    for (const token of tokens) {
      if (isSpecial(token, ",")) entries.push([]);
      else entries[entries.length - 1]!.push(token);
    }
    if (tokens.length === 0) throw new Refused("no address");
    if (options.single && entries.length > 1) throw new Refused("more than one mailbox");
    const parsed = entries.map((entry) => mailbox(text, entry, options));
    const names = parsed.flatMap((entry) => entry.phrase);
    if (names.some((t) => t.kind === "quoted" && t.text.includes("@")) && (comments || encodedWords || names.some((t) => t.escaped || /[<>]/.test(t.text)))) {
      throw new Refused("a display name with '@' in a field that also has comments, encoded-words, '\\' escapes or '<' '>' in a name");
    }
    const mailboxes = parsed.map((entry) => entry.found);
    return { ok: true, mailboxes };
  } catch (error) {
    if (error instanceof Refused) return { ok: false, problem: error.message };
    throw error;
  }
}

const LOCAL_STOP = new Set([..." \t\r\n<>()\",;:\\[]@"]);
const DOMAIN_CHAR = /[A-Za-z0-9.-]/;

/**
 * Every address-like `local@domain` in a header field's text, the text of its encoded-words
 * (RFC 2047) decoded included: what some reader of a malformed field might take for its address.
 * For a receiver that must evaluate every domain a mail client could show (DMARC on a From: that
 * parseMailboxList refuses). Each "@" is looked at once, with bounded scans either side, so a
 * long field costs linear time.
 */
export function addressesNamedIn(text: string): string[] {
  const decoded = [...text.slice(0, text.lastIndexOf("?=") + 2).matchAll(ENCODED_WORD)]
    .map(([, charset, encoding, encoded]) => decodeEncodedWord(charset!, encoding!, encoded!) ?? "");
  const all = [text, ...decoded].join(" ");
  const found: string[] = [];
  for (let at = all.indexOf("@"); at !== -1; at = all.indexOf("@", at + 1)) {
    let start = at;
    while (start > 0 && at - start < 64 && !LOCAL_STOP.has(all[start - 1]!)) start--;
    let end = at + 1;
    while (end < all.length && end - at <= 255 && DOMAIN_CHAR.test(all[end]!)) end++;
    const domain = all.slice(at + 1, end).replace(/^[.-]+|[.-]+$/g, "");
    if (start < at && /\.[A-Za-z0-9-]*[A-Za-z][A-Za-z0-9-]*$/.test(domain)) found.push(`${all.slice(start, at)}@${domain}`);
  }
  return found;
}

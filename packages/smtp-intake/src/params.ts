import { decodeUtf8Addr, pathEnd, reply, type SmtpReply } from "@mailstack/mail";

/**
 * Checks the ESMTP parameters of a MAIL or RCPT command line, as sent (before smtp-server
 * decodes xtext). smtp-server validates the values of the parameters it knows (SIZE, BODY,
 * SMTPUTF8, RET, NOTIFY, duplicates) but accepts any other keyword silently and decodes xtext
 * without checking it. Here: a keyword we do not implement is 555 5.5.4 (RFC 5321 4.1.1.11);
 * ENVID, ORCPT and AUTH must be well-formed xtext (RFC 3461 4, RFC 4954 5) of printable
 * US-ASCII, ENVID at most 100 characters and ORCPT at most 500 (RFC 3461 4.2, 4.4): else
 * 501 5.5.4. An ORCPT of addr-type utf-8 is RFC 6533's form instead (see orcptProblem).
 * `smtpUtf8`: the transaction's MAIL carried SMTPUTF8. Returns the refusal, or null.
 */
export function checkParameters(verb: "MAIL" | "RCPT", line: string, options: { auth: boolean; smtpUtf8?: boolean }): SmtpReply | null {
  // The parameters follow the path; a quoted local part may hold ">".
  const open = line.indexOf("<");
  const end = open < 0 ? -1 : pathEnd(line.slice(open));
  if (end < 0) return null; // the library answers the syntax error
  const known = verb === "MAIL" ? MAIL_KEYWORDS : RCPT_KEYWORDS;
  for (const param of line.slice(open + end).trim().split(/\s+/)) {
    if (!param) continue;
    const eq = param.indexOf("=");
    const keyword = (eq < 0 ? param : param.slice(0, eq)).toUpperCase();
    const value = eq < 0 ? "" : param.slice(eq + 1);
    if (!known.has(keyword) && !(keyword === "AUTH" && verb === "MAIL" && options.auth)) {
      // Reply text is printable US-ASCII (RFC 5321 4.2): the client's bytes are not echoed as they are.
      return reply(555, "5.5.4", `Unsupported parameter ${keyword.slice(0, 40).replace(/[^\x21-\x7e]/g, "?")}`);
    }
    switch (keyword) {
      case "ENVID":
        if (!printableXtext(value, 100)) return reply(501, "5.5.4", "Bad ENVID parameter syntax (xtext of printable US-ASCII, at most 100 characters)");
        break;
      case "ORCPT": {
        const problem = orcptProblem(value, !!options.smtpUtf8);
        if (problem) return problem;
        break;
      }
      case "AUTH":
        if (value !== "<>" && !printableXtext(value, 500)) return reply(501, "5.5.4", "Bad AUTH parameter syntax (xtext or <>)");
        break;
    }
  }
  return null;
}

/**
 * ORCPT=addr-type;xtext (RFC 3461 4.2), at most 500 characters. For addr-type utf-8 (RFC 6533 3)
 * the address is in utf-8-addr-xtext (\x{HEX} for non-ASCII, always allowed) or, only in a
 * transaction with SMTPUTF8, utf-8-addr-unitext (UTF-8 as it is); anything else is refused.
 */
function orcptProblem(value: string, smtpUtf8: boolean): SmtpReply | null {
  const semicolon = value.indexOf(";");
  const bad = reply(501, "5.5.4", "Bad ORCPT parameter syntax (addr-type;xtext, at most 500 characters)");
  if (value.length > 500 || semicolon < 1 || !ADDR_TYPE.test(value.slice(0, semicolon))) return bad;
  const address = value.slice(semicolon + 1);
  if (value.slice(0, semicolon).toLowerCase() !== "utf-8") return printableXtext(address, 500) ? null : bad;
  if (!smtpUtf8 && /[^\x00-\x7f]/.test(address)) {
    return reply(501, "5.6.7", "Non-ASCII ORCPT needs SMTPUTF8; without it use the utf-8-addr-xtext form (RFC 6533 3)");
  }
  if (decodeUtf8Addr(address, { unitext: smtpUtf8 }) === null) {
    return reply(501, "5.5.4", "Bad ORCPT parameter syntax (utf-8;utf-8-addr-xtext or utf-8-addr-unitext, RFC 6533 3)");
  }
  return null;
}

/**
 * The ORCPT as stored (and used for Original-Recipient and passed on by the relay): addr-type;
 * address, decoded. smtp-server has already undone the xtext; a utf-8 address is decoded from
 * RFC 6533's form here (checkParameters has checked it), with the addr-type in lower case.
 */
export function storedOrcpt(value: string): string {
  const semicolon = value.indexOf(";");
  if (semicolon < 1 || value.slice(0, semicolon).toLowerCase() !== "utf-8") return value;
  const address = decodeUtf8Addr(value.slice(semicolon + 1), { unitext: true });
  return address === null ? value : `utf-8;${address}`;
}

const MAIL_KEYWORDS = new Set(["SIZE", "BODY", "SMTPUTF8", "RET", "ENVID"]);
const RCPT_KEYWORDS = new Set(["NOTIFY", "ORCPT"]);
// RFC 3461 4.2: addr-type is an atom.
const ADDR_TYPE = /^[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+$/;
// RFC 3461 4: xchar is "!".."~" except "+" and "="; hexchar is "+" and two upper-case hex digits.
const XTEXT = /^(?:[!-*,-<>-~]|\+[0-9A-F]{2})*$/;

/** Well-formed, non-empty xtext whose decoded value is printable US-ASCII of at most `max` characters. */
function printableXtext(value: string, max: number): boolean {
  if (!value || !XTEXT.test(value)) return false;
  const decoded = value.replace(/\+([0-9A-F]{2})/g, (_, hex: string) => String.fromCharCode(parseInt(hex, 16)));
  return decoded.length <= max && /^[\x20-\x7e]+$/.test(decoded);
}

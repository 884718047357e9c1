import { pathEnd, reply, type SmtpReply } from "@mailstack/mail";

/**
 * Checks the ESMTP parameters of a MAIL or RCPT command line, as sent (before smtp-server
 * decodes xtext). smtp-server validates the values of the parameters it knows (SIZE, BODY,
 * SMTPUTF8, RET, NOTIFY, duplicates) but accepts any other keyword silently and decodes xtext
 * without checking it. Here: a keyword we do not implement is 555 5.5.4 (RFC 5321 4.1.1.11);
 * ENVID, ORCPT and AUTH must be well-formed xtext (RFC 3461 4, RFC 4954 5) of printable
 * US-ASCII, ENVID at most 100 characters and ORCPT at most 500 (RFC 3461 4.2, 4.4): else
 * 501 5.5.4. Returns the refusal, or null.
 */
export function checkParameters(verb: "MAIL" | "RCPT", line: string, options: { auth: boolean }): SmtpReply | null {
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
      return reply(555, "5.5.4", `Unsupported parameter ${keyword.slice(0, 40)}`);
    }
    switch (keyword) {
      case "ENVID":
        if (!printableXtext(value, 100)) return reply(501, "5.5.4", "Bad ENVID parameter syntax (xtext of printable US-ASCII, at most 100 characters)");
        break;
      case "ORCPT": {
        const semicolon = value.indexOf(";");
        if (value.length > 500 || semicolon < 1 || !ADDR_TYPE.test(value.slice(0, semicolon)) || !printableXtext(value.slice(semicolon + 1), 500)) {
          return reply(501, "5.5.4", "Bad ORCPT parameter syntax (addr-type;xtext, at most 500 characters)");
        }
        break;
      }
      case "AUTH":
        if (value !== "<>" && !printableXtext(value, 500)) return reply(501, "5.5.4", "Bad AUTH parameter syntax (xtext or <>)");
        break;
    }
  }
  return null;
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

import type { Readable } from "node:stream";
import { dkimSign } from "mailauth/lib/dkim/sign.js";
import type { DKIMSignOptions } from "mailauth";
import type { DkimAlgorithm } from "./keys.ts";

export interface DkimSigningKey {
  /** The d= domain. */
  domain: string;
  selector: string;
  algorithm: DkimAlgorithm;
  /** PKCS#8 PEM. */
  privateKey: string;
}

/**
 * Computes DKIM-Signature header fields (relaxed/relaxed) for a message, one per key, via
 * mailauth, which signs its default header list (From, Subject, Date, To, Message-ID...).
 * Returns CRLF-terminated lines to put in front of the message ('' without keys).
 * Throws when mailauth reports a signing error, so the caller never sends half-signed mail silently.
 */
export async function dkimSignatures(message: Buffer | Readable, keys: DkimSigningKey[], signTime = new Date()): Promise<string> {
  if (keys.length === 0) return "";
  const options = {
    canonicalization: "relaxed/relaxed",
    signTime,
    signatureData: keys.map((key) => ({
      signingDomain: key.domain,
      selector: key.selector,
      privateKey: key.privateKey,
      algorithm: key.algorithm,
      canonicalization: "relaxed/relaxed",
    })),
  } as unknown as DKIMSignOptions;
  const result = await dkimSign(message, options);
  if (result.errors.length > 0) throw new Error(`DKIM signing failed: ${result.errors.map((e) => e.message).join("; ")}`);
  return result.signatures;
}

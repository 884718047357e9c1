import { createPrivateKey, type KeyObject } from "node:crypto";
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

// Parsing a PEM key costs more than the RSA signature itself; keys are parsed once per process.
// (mailauth takes a KeyObject through patches/mailauth@4.13.3.patch.)
const parsedKeys = new Map<string, KeyObject>();
const MAX_PARSED_KEYS = 1000;

function parsedKey(signing: DkimSigningKey): KeyObject {
  let key = parsedKeys.get(signing.privateKey);
  if (!key) {
    try {
      key = createPrivateKey(signing.privateKey);
    } catch (error) {
      throw new Error(`DKIM signing failed: the private key of ${signing.selector}._domainkey.${signing.domain} is unreadable (${(error as Error).message})`);
    }
    if (parsedKeys.size >= MAX_PARSED_KEYS) parsedKeys.clear();
    parsedKeys.set(signing.privateKey, key);
  }
  return key;
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
      privateKey: parsedKey(key),
      algorithm: key.algorithm,
      canonicalization: "relaxed/relaxed",
    })),
  } as unknown as DKIMSignOptions;
  const result = await dkimSign(message, options);
  if (result.errors.length > 0) throw new Error(`DKIM signing failed: ${result.errors.map((e) => e.message).join("; ")}`);
  return result.signatures;
}

import { createHash, createPrivateKey, sign, type KeyObject } from "node:crypto";
import type { Readable } from "node:stream";
import { dkimSign } from "mailauth/lib/dkim/sign.js";
import { generateCanonicalizedHeader } from "mailauth/lib/dkim/header/index.js";
import { dkimBody } from "mailauth/lib/dkim/body/index.js";
import { formatSignatureHeaderLine, getSigningHeaderLines, parseHeaders } from "mailauth/lib/tools.js";
import type { DKIMSignOptions } from "mailauth";
import { headerBoundary } from "@mailstack/mail";
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
 * Throws when signing fails, so the caller never sends half-signed mail silently.
 *
 * A message in memory is not streamed through mailauth's parser, which looks at every byte in
 * JavaScript several times over and cost about 200 µs per 4 KiB message, more than an ed25519
 * signature. Instead the steps of mailauth's signer are run here with mailauth's own functions:
 * its header parser on the header block, its relaxed body canonicaliser on the body in one call,
 * its header canonicalisation and its DKIM-Signature formatting. Only the signature itself is
 * computed differently: an RSA signature on libuv's thread pool (node:crypto's asynchronous
 * sign), so the SMTP event loop goes on serving other sessions meanwhile.
 */
export async function dkimSignatures(message: Buffer | Readable, keys: DkimSigningKey[], signTime = new Date()): Promise<string> {
  if (keys.length === 0) return "";
  const signatureData = keys.map((key) => ({
    signingDomain: key.domain,
    selector: key.selector,
    privateKey: parsedKey(key),
    algorithm: key.algorithm,
    canonicalization: "relaxed/relaxed",
  }));
  const boundary = Buffer.isBuffer(message) ? headerBoundary(message) : null;
  // mailauth's parser does not take an empty first line for the end of an empty header section:
  // such a message is left to it, so that its signature is the one mailauth makes.
  if (!Buffer.isBuffer(message) || boundary?.headerEnd === 0) {
    const options = { canonicalization: "relaxed/relaxed", signTime, signatureData } as unknown as DKIMSignOptions;
    const result = await dkimSign(message, options);
    if (result.errors.length > 0) throw signingError(result.errors);
    return result.signatures;
  }
  const bodyStart = boundary ? boundary.bodyStart : message.length;
  const bodyHasher = dkimBody("relaxed", "sha256", false);
  bodyHasher.update(message.subarray(bodyStart));
  const bodyHash = bodyHasher.digest("base64");
  const signingHeaderLines = getSigningHeaderLines(parseHeaders(message.subarray(0, bodyStart)).parsed);
  const lines: string[] = [];
  for (const data of signatureData) {
    const { canonicalizedHeader, dkimHeaderOpts } = generateCanonicalizedHeader("DKIM", signingHeaderLines, {
      ...data,
      instance: false,
      signTime,
      bodyHash,
    });
    let signature: Buffer;
    try {
      signature = await signHeader(data.algorithm, canonicalizedHeader, data.privateKey);
    } catch (error) {
      throw new Error(`DKIM signing failed for ${data.selector}._domainkey.${data.signingDomain}: ${(error as Error).message}`);
    }
    dkimHeaderOpts.b = signature.toString("base64");
    lines.push(formatSignatureHeaderLine("DKIM", dkimHeaderOpts, true));
  }
  return lines.join("\r\n") + "\r\n";
}

/**
 * The signature over the canonicalised header, as mailauth computes it: RSA PKCS#1 v1.5 with
 * SHA-256 (on the thread pool), or Ed25519 over the SHA-256 digest (RFC 8463; fast enough inline).
 */
function signHeader(algorithm: DkimAlgorithm, canonicalizedHeader: Buffer, key: KeyObject): Promise<Buffer> {
  if (algorithm === "ed25519-sha256") {
    if (key.asymmetricKeyType !== "ed25519") return Promise.reject(new Error(`the key is ${key.asymmetricKeyType}, not ed25519`));
    return Promise.resolve(sign(null, createHash("sha256").update(canonicalizedHeader).digest(), key));
  }
  if (algorithm !== "rsa-sha256") return Promise.reject(new Error(`unsupported algorithm ${algorithm}`));
  if (key.asymmetricKeyType !== "rsa") return Promise.reject(new Error(`the key is ${key.asymmetricKeyType}, not rsa`));
  return new Promise((resolve, reject) => {
    sign("sha256", canonicalizedHeader, key, (error, signature) => (error ? reject(error) : resolve(signature)));
  });
}

function signingError(errors: Array<{ err?: Error; message?: string }>): Error {
  return new Error(`DKIM signing failed: ${errors.map((e) => e.err?.message ?? e.message).join("; ")}`);
}

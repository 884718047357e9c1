import { createPrivateKey, createPublicKey, generateKeyPair } from "node:crypto";
import { promisify } from "node:util";

const generate = promisify(generateKeyPair);

export const DKIM_ALGORITHMS = ["rsa-sha256", "ed25519-sha256"] as const;
export type DkimAlgorithm = (typeof DKIM_ALGORITHMS)[number];

export function isDkimAlgorithm(value: string): value is DkimAlgorithm {
  return (DKIM_ALGORITHMS as readonly string[]).includes(value);
}

export interface DkimKeyPair {
  algorithm: DkimAlgorithm;
  /** PKCS#8 PEM; what domains.dkim_private_key stores. */
  privateKeyPem: string;
  /** The p= value of the DNS record (base64). */
  publicKey: string;
}

/** Generates a signing key: RSA 2048 bits (RFC 8301) or Ed25519 (RFC 8463). */
export async function generateDkimKey(algorithm: DkimAlgorithm, rsaBits = 2048): Promise<DkimKeyPair> {
  const pair =
    algorithm === "rsa-sha256"
      ? await generate("rsa", { modulusLength: rsaBits })
      : await generate("ed25519");
  const privateKeyPem = pair.privateKey.export({ type: "pkcs8", format: "pem" }).toString();
  return { algorithm, privateKeyPem, publicKey: publicKeyValue(privateKeyPem, algorithm) };
}

/**
 * The p= value for a private key. RSA publishes the DER SubjectPublicKeyInfo (RFC 6376 3.6.1);
 * Ed25519 publishes the bare 32-byte key (RFC 8463 4.2), the tail of its SubjectPublicKeyInfo.
 */
export function publicKeyValue(privateKeyPem: string, algorithm: DkimAlgorithm): string {
  const privateKey = createPrivateKey(privateKeyPem);
  const expected = algorithm === "rsa-sha256" ? "rsa" : "ed25519";
  if (privateKey.asymmetricKeyType !== expected) {
    throw new Error(`the stored key is ${privateKey.asymmetricKeyType}, not ${expected}`);
  }
  const spki = createPublicKey(privateKey).export({ type: "spki", format: "der" });
  return (algorithm === "rsa-sha256" ? spki : spki.subarray(spki.length - 32)).toString("base64");
}

const SELECTOR_LABEL = /^(?!-)[a-z0-9-]{1,63}(?<!-)$/;

/** A selector is one or more DNS labels (RFC 6376 3.1). */
export function isValidSelector(selector: string): boolean {
  return selector.length <= 200 && selector.split(".").every((label) => SELECTOR_LABEL.test(label));
}

/** A selector named after the day a key was made, so a rotated key gets a new name. */
export function defaultSelector(now = new Date()): string {
  return `ms${now.toISOString().slice(0, 10).replaceAll("-", "")}`;
}

export interface DkimDnsRecord {
  domain: string;
  selector: string;
  algorithm: DkimAlgorithm;
  /** The owner name of the TXT record, without the trailing dot. */
  name: string;
  type: "TXT";
  /** The record's text as one string (what a DNS provider's web form wants). */
  value: string;
  /** The value split into strings of at most 255 characters, as a zone file (and DNS) carries it. */
  strings: string[];
  /** A line for a BIND zone file. */
  zoneLine: string;
}

/** The TXT record that publishes a key (RFC 6376 3.6.1). */
export function dkimDnsRecord(domain: string, selector: string, algorithm: DkimAlgorithm, publicKey: string): DkimDnsRecord {
  const k = algorithm === "rsa-sha256" ? "rsa" : "ed25519";
  const value = `v=DKIM1; k=${k}; p=${publicKey}`;
  const strings: string[] = [];
  for (let i = 0; i < value.length; i += 255) strings.push(value.slice(i, i + 255));
  const name = `${selector}._domainkey.${domain}`;
  const zoneLine = `${name}. 3600 IN TXT ( ${strings.map((s) => `"${s}"`).join(" ")} )`;
  return { domain, selector, algorithm, name, type: "TXT", value, strings, zoneLine };
}

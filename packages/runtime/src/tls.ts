import { createPrivateKey, type KeyObject, X509Certificate } from "node:crypto";
import { mkdir, readFile, rename, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { createSecureContext, type SecureContext } from "node:tls";
import { duration, z } from "@mailstack/config";
import { generate } from "selfsigned";

/** Settings of every service that speaks TLS; spread into a service's `shape`. */
export const tlsShape = {
  /** PEM certificate chain; with TLS_KEY_FILE. When both are unset a self-signed pair is used. */
  TLS_CERT_FILE: z.string().optional(),
  TLS_KEY_FILE: z.string().optional(),
  /** Where a generated self-signed pair is cached between starts (shared by every service). */
  TLS_DIR: z.string().default(".data/tls"),
  /** How often TLS_CERT_FILE and TLS_KEY_FILE are read again, so a renewed certificate is served without a restart (SIGHUP reloads at once); 0 turns polling off. */
  TLS_RELOAD_INTERVAL: duration("60s"),
};

export interface TlsOptions {
  certFile?: string | undefined;
  keyFile?: string | undefined;
  dir?: string | undefined;
  /** Name put into a generated certificate's CN and subjectAltName. */
  hostname?: string | undefined;
}

export interface TlsCredentials {
  key: string;
  cert: string;
  selfSigned: boolean;
  /** Where the pair was read from, for logs. */
  source: string;
  /** The leaf certificate's validity period. */
  validFrom: Date;
  validTo: Date;
  /** For `new tls.TLSSocket(socket, { isServer: true, secureContext })` (STARTTLS/STLS upgrades). */
  context: SecureContext;
  /** For `tls.createServer(serverOptions, ...)` (implicit TLS listeners). */
  serverOptions: { key: string; cert: string; minVersion: "TLSv1.2" };
}

/**
 * TLS credentials for a server: the operator's TLS_CERT_FILE/TLS_KEY_FILE when set (both
 * required, checked to match), else a self-signed pair generated once and cached under
 * TLS_DIR, regenerated when it is within 30 days of expiry.
 */
export async function loadTlsCredentials(options: TlsOptions = {}): Promise<TlsCredentials> {
  if (options.certFile || options.keyFile) {
    if (!options.certFile || !options.keyFile) throw new Error("TLS_CERT_FILE and TLS_KEY_FILE must be set together");
    const { cert, key } = await readTlsFiles(options.certFile, options.keyFile);
    return tlsCredentialsFrom(key, cert, options.certFile, options.keyFile);
  }
  const hostname = options.hostname || "localhost";
  const dir = options.dir || ".data/tls";
  // One file holding key and certificate, replaced atomically, so concurrent starts never pair
  // one process's key with another's certificate.
  const file = join(dir, `selfsigned-${hostname.replace(/[^A-Za-z0-9.-]/g, "_")}.pem`);
  try {
    const cached = splitPem(await readFile(file, "utf8"));
    const result = credentials(cached.key, cached.cert, true, file);
    if (result.validTo.getTime() - Date.now() > 30 * 86_400_000) return result;
  } catch {
    // missing, unreadable, mismatched or expiring: generate a fresh pair below
  }
  const pems = await generate([{ name: "commonName", value: hostname }], {
    keyType: "rsa",
    keySize: 2048,
    algorithm: "sha256",
    notAfterDate: new Date(Date.now() + 825 * 86_400_000),
    extensions: [
      { name: "basicConstraints", cA: false },
      { name: "keyUsage", digitalSignature: true, keyEncipherment: true },
      { name: "extKeyUsage", serverAuth: true },
      {
        name: "subjectAltName",
        altNames: [
          { type: 2, value: hostname },
          ...(hostname === "localhost" ? [] : [{ type: 2 as const, value: "localhost" }]),
          { type: 7, ip: "127.0.0.1" },
          { type: 7, ip: "::1" },
        ],
      },
    ],
  });
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const temporary = `${file}.${process.pid}.${Date.now()}.tmp`;
  const text = `${pems.private.trim()}\n${pems.cert.trim()}\n`;
  await writeFile(temporary, text, { mode: 0o600 });
  await rename(temporary, file);
  const fresh = splitPem(text);
  return credentials(fresh.key, fresh.cert, true, file);
}

/** Why a certificate is not valid at `now` (expired, or not yet valid), or undefined when it is. */
export function validityProblem(credentials: Pick<TlsCredentials, "validFrom" | "validTo">, now: Date = new Date()): string | undefined {
  if (now > credentials.validTo) return `expired on ${credentials.validTo.toISOString()}`;
  if (now < credentials.validFrom) return `not valid before ${credentials.validFrom.toISOString()}`;
  return undefined;
}

function splitPem(text: string): { key: string; cert: string } {
  const key = /-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]+?-----END [A-Z ]*PRIVATE KEY-----/.exec(text)?.[0];
  const certs = text.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g);
  if (!key || !certs) throw new Error("expected a private key and a certificate");
  return { key: `${key}\n`, cert: `${certs.join("\n")}\n` };
}

/** Reads an operator's pair; an error names the variable and file it is about. */
export async function readTlsFiles(certFile: string, keyFile: string): Promise<{ cert: string; key: string }> {
  const read = async (variable: string, file: string) => {
    try {
      return await readFile(file, "utf8");
    } catch (error) {
      const { code, message } = error as NodeJS.ErrnoException;
      // Commonly a root-only privkey.pem (certbot's /etc/letsencrypt/live) read by a service user.
      const why = code === "EACCES" ? `permission denied for uid ${process.getuid?.()} (make it readable by the user the service runs as)` : message;
      throw new Error(`cannot read ${variable} ${file}: ${why}`);
    }
  };
  const [cert, key] = await Promise.all([read("TLS_CERT_FILE", certFile), read("TLS_KEY_FILE", keyFile)]);
  return { cert, key };
}

/** Checks an operator's PEM pair (the key must match the certificate) and builds the credentials. */
export function tlsCredentialsFrom(key: string, cert: string, source: string, keySource: string = source): TlsCredentials {
  return credentials(key, cert, false, source, keySource);
}

function credentials(key: string, cert: string, selfSigned: boolean, source: string, keySource: string = source): TlsCredentials {
  let leaf: X509Certificate;
  try {
    leaf = new X509Certificate(cert);
  } catch (error) {
    throw new Error(`no PEM certificate in ${source} (${(error as Error).message})`);
  }
  let privateKey: KeyObject;
  try {
    privateKey = createPrivateKey(key);
  } catch (error) {
    // Node would ask for the passphrase on the terminal; a service has none to give.
    if (key.includes("-----BEGIN ENCRYPTED PRIVATE KEY-----") || /Proc-Type: 4,ENCRYPTED/.test(key)) {
      throw new Error(`the private key in ${keySource} is encrypted; give the service an unencrypted copy (openssl pkey -in KEY -out KEY.plain)`);
    }
    throw new Error(`no PEM private key in ${keySource} (${(error as Error).message})`);
  }
  if (!leaf.checkPrivateKey(privateKey)) throw new Error(`TLS key ${keySource} does not match the certificate ${source}`);
  let context: SecureContext;
  try {
    context = createSecureContext({ key, cert, minVersion: "TLSv1.2" });
  } catch (error) {
    // A chain whose later certificates do not parse (a fullchain.pem cut off while written).
    throw new Error(`the certificate chain in ${source} does not load (${(error as Error).message})`);
  }
  return {
    key,
    cert,
    selfSigned,
    source,
    validFrom: new Date(leaf.validFrom),
    validTo: new Date(leaf.validTo),
    context,
    serverOptions: { key, cert, minVersion: "TLSv1.2" },
  };
}

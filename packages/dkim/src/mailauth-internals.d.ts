// The parts of mailauth's DKIM signer that dkimSignatures uses directly (mailauth ships no
// declarations for them).
declare module "mailauth/lib/dkim/header/index.js" {
  export function generateCanonicalizedHeader(
    type: "DKIM",
    signingHeaderLines: unknown,
    options: object,
  ): { canonicalizedHeader: Buffer; dkimHeaderOpts: Record<string, unknown> };
}

declare module "mailauth/lib/dkim/body/index.js" {
  export function dkimBody(
    canonicalization: string,
    hashAlgorithm: string,
    maxBodyLength: number | false,
  ): { update(chunk: Buffer | null, final?: boolean): void; digest(encoding: "base64"): string };
}

declare module "mailauth/lib/tools.js" {
  export function parseHeaders(header: Buffer): { parsed: unknown[] };
  export function getSigningHeaderLines(parsedHeaders: unknown[], fieldNames?: string): unknown;
  export function formatSignatureHeaderLine(type: "DKIM", values: Record<string, unknown>, folded: boolean): string;
}

// The parts of mailauth's DKIM signer that dkimSignatures uses directly (mailauth ships no
// declarations for them).
declare module "mailauth/lib/dkim/dkim-signer.js" {
  export class DkimSigner {
    constructor(options: {
      canonicalization: string;
      signTime: Date;
      signatureData: object[];
      headers: unknown;
      bodyHash: string;
    });
    errors: Array<{ err?: Error }>;
    signatureHeaders: string[];
    finalize(): Promise<void>;
  }
}

declare module "mailauth/lib/dkim/body/index.js" {
  export function dkimBody(
    canonicalization: string,
    hashAlgorithm: string,
    maxBodyLength: number | false,
  ): { update(chunk: Buffer | null, final?: boolean): void; digest(encoding: "base64"): string };
}

declare module "mailauth/lib/tools.js" {
  export function parseHeaders(header: Buffer): unknown;
}

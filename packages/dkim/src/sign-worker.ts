// A worker thread that computes DKIM signatures, so RSA signing and canonicalisation run on
// another core instead of blocking the SMTP event loop.
import { parentPort } from "node:worker_threads";
import { dkimSignatures, type DkimSigningKey } from "./sign.ts";

interface Request {
  id: number;
  message: Uint8Array;
  keys: DkimSigningKey[];
  signTime: number;
}

parentPort!.on("message", (request: Request) => {
  dkimSignatures(Buffer.from(request.message.buffer, request.message.byteOffset, request.message.byteLength), request.keys, new Date(request.signTime)).then(
    (signatures) => parentPort!.postMessage({ id: request.id, signatures }),
    (error: Error) => parentPort!.postMessage({ id: request.id, error: error.message }),
  );
});

import { Worker } from "node:worker_threads";
import { dkimSignatures, type DkimSigningKey } from "./sign.ts";

export interface DkimSigner {
  /** DKIM-Signature header lines (CRLF-terminated) for the message, one per key. */
  sign(message: Buffer, keys: DkimSigningKey[], signTime?: Date): Promise<string>;
  close(): Promise<void>;
}

interface Pending {
  resolve: (signatures: string) => void;
  reject: (error: Error) => void;
}

interface Slot {
  worker: Worker;
  pending: Map<number, Pending>;
}

/** Signs on the calling thread: for tests and for deployments configured with no worker threads. */
export const inlineSigner: DkimSigner = {
  sign: (message, keys, signTime) => dkimSignatures(message, keys, signTime),
  close: async () => {},
};

/**
 * A pool of worker threads that sign messages, round-robin. A worker that dies fails only the
 * signatures it had in hand (the SMTP session answers 451 and the client retries) and is replaced.
 */
export function createSigningPool(threads: number): DkimSigner {
  if (threads <= 0) return inlineSigner;
  let nextId = 1;
  let turn = 0;
  let closed = false;
  const slots: Slot[] = [];

  const spawn = (index: number) => {
    const worker = new Worker(new URL("./sign-worker.ts", import.meta.url));
    const slot: Slot = { worker, pending: new Map() };
    worker.unref();
    worker.on("message", (reply: { id: number; signatures?: string; error?: string }) => {
      const waiting = slot.pending.get(reply.id);
      if (!waiting) return;
      slot.pending.delete(reply.id);
      if (reply.error !== undefined) waiting.reject(new Error(reply.error));
      else waiting.resolve(reply.signatures ?? "");
    });
    const fail = (error: Error) => {
      for (const waiting of slot.pending.values()) waiting.reject(error);
      slot.pending.clear();
      if (!closed) spawn(index);
    };
    worker.on("error", fail);
    worker.on("exit", (code) => {
      if (slots[index] === slot) fail(new Error(`DKIM signing thread exited with code ${code}`));
    });
    slots[index] = slot;
  };
  for (let i = 0; i < threads; i++) spawn(i);

  return {
    sign(message, keys, signTime = new Date()) {
      if (keys.length === 0) return Promise.resolve("");
      if (closed) return Promise.reject(new Error("the DKIM signing pool is closed"));
      const slot = slots[turn++ % slots.length]!;
      const id = nextId++;
      return new Promise<string>((resolve, reject) => {
        slot.pending.set(id, { resolve, reject });
        slot.worker.postMessage({ id, message, keys, signTime: signTime.getTime() });
      });
    },
    async close() {
      closed = true;
      const all = slots.splice(0);
      await Promise.all(all.map((slot) => slot.worker.terminate()));
      for (const slot of all) for (const waiting of slot.pending.values()) waiting.reject(new Error("the DKIM signing pool is closed"));
    },
  };
}

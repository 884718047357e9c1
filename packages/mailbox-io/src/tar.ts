// A minimal ustar writer and reader for folders of .eml files over HTTP: regular files and
// directories only, names up to 255 bytes (prefix + name), sizes below 8 GiB.

import { MailboxIoError } from "./store.ts";

const BLOCK = 512;

function octal(value: number, width: number): string {
  return value.toString(8).padStart(width - 1, "0") + "\0";
}

function splitName(path: string): { name: string; prefix: string } {
  const bytes = Buffer.byteLength(path);
  if (bytes <= 100) return { name: path, prefix: "" };
  for (let i = path.indexOf("/"); i !== -1; i = path.indexOf("/", i + 1)) {
    const prefix = path.slice(0, i);
    const name = path.slice(i + 1);
    if (Buffer.byteLength(prefix) <= 155 && Buffer.byteLength(name) <= 100) return { name, prefix };
  }
  throw new MailboxIoError("invalid", `path too long for a tar entry: ${path}`);
}

export function tarHeader(path: string, size: number, mtime: Date): Buffer {
  const header = Buffer.alloc(BLOCK);
  const { name, prefix } = splitName(path);
  header.write(name, 0, 100, "utf8");
  header.write(octal(0o644, 8), 100, "latin1");
  header.write(octal(0, 8), 108, "latin1");
  header.write(octal(0, 8), 116, "latin1");
  header.write(octal(size, 12), 124, "latin1");
  header.write(octal(Math.floor(mtime.getTime() / 1000), 12), 136, "latin1");
  header.write("        ", 148, "latin1");
  header.write("0", 156, "latin1");
  header.write("ustar\0", 257, "latin1");
  header.write("00", 263, "latin1");
  header.write(prefix, 345, 155, "utf8");
  let sum = 0;
  for (const byte of header) sum += byte;
  header.write(octal(sum, 7) + " ", 148, "latin1");
  return header;
}

/** Streams files as a tar archive; each file's bytes are passed through without copying. */
export async function* tarStream(files: AsyncIterable<{ path: string; bytes: Buffer; mtime: Date }>): AsyncGenerator<Buffer> {
  for await (const file of files) {
    yield tarHeader(file.path, file.bytes.length, file.mtime);
    yield file.bytes;
    const pad = (BLOCK - (file.bytes.length % BLOCK)) % BLOCK;
    if (pad) yield Buffer.alloc(pad);
  }
  yield Buffer.alloc(BLOCK * 2);
}

export interface TarFile {
  path: string;
  bytes: Buffer;
  mtime: Date;
}

function readString(block: Buffer, start: number, length: number): string {
  const field = block.subarray(start, start + length);
  const end = field.indexOf(0);
  return field.subarray(0, end === -1 ? length : end).toString("utf8");
}

function readOctal(block: Buffer, start: number, length: number): number {
  const text = readString(block, start, length).trim();
  if (!/^[0-7]*$/.test(text)) throw new MailboxIoError("invalid", "not a tar archive: bad number field");
  return text ? parseInt(text, 8) : 0;
}

/** Reads regular files from a tar stream one at a time; a file above maxFileBytes is an error. */
export async function* readTar(input: AsyncIterable<Buffer | string>, maxFileBytes: number): AsyncGenerator<TarFile> {
  let pending: Buffer[] = [];
  let pendingBytes = 0;
  const iterator = input[Symbol.asyncIterator]();

  // Returns exactly n bytes, or null at a clean end of input.
  const take = async (n: number): Promise<Buffer | null> => {
    while (pendingBytes < n) {
      const next = await iterator.next();
      if (next.done) {
        if (pendingBytes === 0) return null;
        throw new MailboxIoError("invalid", "truncated tar archive");
      }
      const chunk = Buffer.from(next.value);
      pending.push(chunk);
      pendingBytes += chunk.length;
    }
    const all = pending.length === 1 ? pending[0]! : Buffer.concat(pending, pendingBytes);
    const out = Buffer.from(all.subarray(0, n));
    const rest = all.subarray(n);
    pending = rest.length ? [rest] : [];
    pendingBytes = rest.length;
    return out;
  };

  let longName: string | null = null;
  for (;;) {
    const header = await take(BLOCK);
    if (!header || header.every((b) => b === 0)) return;
    const stored = readOctal(header, 148, 8);
    let sum = 0;
    for (let i = 0; i < BLOCK; i++) sum += i >= 148 && i < 156 ? 0x20 : header[i]!;
    if (sum !== stored) throw new MailboxIoError("invalid", "not a tar archive: header checksum mismatch");
    const size = readOctal(header, 124, 12);
    const type = String.fromCharCode(header[156]!);
    const prefix = header.toString("latin1", 257, 262) === "ustar" ? readString(header, 345, 155) : "";
    const name = readString(header, 0, 100);
    // Every entry's data is held in memory (skipped ones too), so every type is bound: a pax
    // header or a link declaring gigabytes must not be buffered.
    if (size > maxFileBytes) {
      throw new MailboxIoError("too-large", `an entry in the archive is larger than the limit of ${maxFileBytes} bytes`);
    }
    const data = size ? await take(size) : Buffer.alloc(0);
    if (size && !data) throw new MailboxIoError("invalid", "truncated tar archive");
    const pad = (BLOCK - (size % BLOCK)) % BLOCK;
    if (pad && !(await take(pad))) throw new MailboxIoError("invalid", "truncated tar archive");
    if (type === "L") {
      // GNU long name: the next entry's path.
      longName = data!.toString("utf8").replace(/\0+$/, "");
      continue;
    }
    const path = longName ?? (prefix ? `${prefix}/${name}` : name);
    longName = null;
    if (type === "0" || type === "\0") {
      yield { path, bytes: data!, mtime: new Date(readOctal(header, 136, 12) * 1000) };
    }
    // Directories, links and pax headers carry nothing to import.
  }
}

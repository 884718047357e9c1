import { createReadStream, createWriteStream } from "node:fs";
import { mkdir, readdir, readFile, stat, utimes, writeFile } from "node:fs/promises";
import path from "node:path";
import { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import type { Pool } from "@mailstack/db";
import { readMboxrd, type MboxFormatError } from "./mbox.ts";
import { importMessages, listFolders, mailboxEntries, mboxStream, MailboxIoError, returnPath, validateFolderName, type ImportResult } from "./store.ts";

// How exports are laid out, shared by mailctl (directories) and the API (tar archives):
//   one folder:  <uid>.eml ...             or one mbox stream
//   everything:  <folder>/<uid>.eml ...    or <folder>.mbox per folder (mailctl only)
// Imports map a file's directory back to a folder: top level -> the given folder (INBOX by default),
// sub/dir -> "<given folder>/sub/dir" (or "sub/dir" without one).

export interface ExportFile {
  path: string;
  bytes: Buffer;
  mtime: Date;
}

/** The .eml files of one folder (flat) or of the whole mailbox (one directory per folder). */
export async function* emlFiles(pool: Pool, accountId: number, folder?: string): AsyncGenerator<ExportFile> {
  for await (const entry of mailboxEntries(pool, accountId, folder)) {
    // A folder stored before its name was checked ("../x" from an old filter rule) must not
    // become a path outside the export.
    if (folder === undefined) validateFolderName(entry.folder);
    yield {
      path: folder === undefined ? `${entry.folder}/${entry.uid}.eml` : `${entry.uid}.eml`,
      bytes: entry.bytes,
      mtime: entry.receivedAt,
    };
  }
}

/** The folder an imported file goes to, from its directory inside the export. */
export function folderForPath(relativePath: string, folder?: string): string {
  const dir = path.posix.dirname(relativePath.replace(/\\/g, "/").replace(/^\.\//, ""));
  if (dir === "." || dir === "") return validateFolderName(folder ?? "INBOX");
  return validateFolderName(folder ? `${folder}/${dir}` : dir);
}

function uidOrder(a: string, b: string): number {
  const na = Number(path.basename(a, ".eml"));
  const nb = Number(path.basename(b, ".eml"));
  if (Number.isInteger(na) && Number.isInteger(nb) && na !== nb) return na - nb;
  return a < b ? -1 : a > b ? 1 : 0;
}

/** Maps .eml files (from a tar or a directory) to messages to import; other files are skipped. */
export async function* emlMessages(files: AsyncIterable<ExportFile>, folder?: string) {
  for await (const file of files) {
    if (!file.path.endsWith(".eml")) continue;
    yield { folder: folderForPath(file.path, folder), raw: file.bytes, envelopeFrom: returnPath(file.bytes), receivedAt: file.mtime };
  }
}

/** The .eml files under a directory, folder by folder, in UID order (numeric names first). */
export async function* readEmlDirectory(root: string, maxMessageBytes: number): AsyncGenerator<ExportFile> {
  const entries = await readdir(root, { recursive: true, withFileTypes: true });
  const byDir = new Map<string, string[]>();
  for (const entry of entries) {
    if (!entry.isFile() || !entry.name.endsWith(".eml")) continue;
    const rel = path.relative(root, path.join(entry.parentPath, entry.name)).split(path.sep).join("/");
    const dir = path.posix.dirname(rel);
    byDir.set(dir, [...(byDir.get(dir) ?? []), rel]);
  }
  for (const dir of [...byDir.keys()].sort()) {
    for (const rel of byDir.get(dir)!.sort(uidOrder)) {
      const full = path.join(root, rel);
      const info = await stat(full);
      if (info.size > maxMessageBytes) throw new MailboxIoError("too-large", `${rel} is larger than the limit of ${maxMessageBytes} bytes`);
      yield { path: rel, bytes: await readFile(full), mtime: info.mtime };
    }
  }
}

/** Writes .eml files under a directory, each file's mtime set to when the message was received. */
export async function writeEmlDirectory(root: string, files: AsyncIterable<ExportFile>): Promise<number> {
  let count = 0;
  for await (const file of files) {
    const full = path.join(root, ...file.path.split("/"));
    await mkdir(path.dirname(full), { recursive: true });
    await writeFile(full, file.bytes);
    await utimes(full, file.mtime, file.mtime);
    count++;
  }
  return count;
}

/** Exports one folder to an mbox file. */
export async function exportMboxFile(pool: Pool, accountId: number, folder: string, file: string): Promise<void> {
  await mkdir(path.dirname(path.resolve(file)), { recursive: true });
  await pipeline(Readable.from(mboxStream(pool, accountId, folder)), createWriteStream(file));
}

/** Exports every folder to `<dir>/<folder>.mbox`. */
export async function exportMboxDirectory(pool: Pool, accountId: number, dir: string): Promise<string[]> {
  const folders = await listFolders(pool, accountId);
  // Every name is checked before anything is written (see emlFiles).
  for (const folder of folders) validateFolderName(folder);
  for (const folder of folders) await exportMboxFile(pool, accountId, folder, path.join(dir, ...`${folder}.mbox`.split("/")));
  return folders;
}

/** Imports an mbox stream into one folder. */
export async function importMboxStream(
  pool: Pool,
  accountId: number,
  folder: string,
  input: AsyncIterable<Buffer | string>,
  maxMessageBytes: number,
): Promise<ImportResult> {
  const target = validateFolderName(folder);
  async function* messages() {
    try {
      for await (const message of readMboxrd(input, maxMessageBytes)) yield { ...message, folder: target };
    } catch (error) {
      if (error instanceof MailboxIoError) throw error;
      throw new MailboxIoError((error as MboxFormatError).tooLarge ? "too-large" : "invalid", (error as Error).message);
    }
  }
  return importMessages(pool, accountId, messages());
}

/** Imports an mbox file into a folder, or a directory of `*.mbox` files into the folders their paths name. */
export async function importMboxPath(pool: Pool, accountId: number, source: string, maxMessageBytes: number, folder?: string): Promise<ImportResult> {
  const info = await stat(source);
  if (!info.isDirectory()) return importMboxStream(pool, accountId, folder ?? "INBOX", createReadStream(source), maxMessageBytes);
  const total: ImportResult = { imported: 0, bytes: 0, folders: [] };
  const files = (await readdir(source, { recursive: true, withFileTypes: true }))
    .filter((e) => e.isFile() && e.name.endsWith(".mbox"))
    .map((e) => path.relative(source, path.join(e.parentPath, e.name)).split(path.sep).join("/"))
    .sort();
  for (const rel of files) {
    const name = rel.slice(0, -".mbox".length);
    const target = folder ? `${folder}/${name}` : name;
    const result = await importMboxStream(pool, accountId, target, createReadStream(path.join(source, rel)), maxMessageBytes);
    total.imported += result.imported;
    total.bytes += result.bytes;
    total.folders.push(...result.folders);
  }
  return total;
}

import { stat } from "node:fs/promises";
import { parseSize } from "@mailstack/config";
import { DirectoryError, getAccount, type Pool } from "@mailstack/db";
import {
  emlFiles, emlMessages, existingFolder, exportMboxDirectory, exportMboxFile, importMboxPath, importMessages, MailboxIoError,
  readEmlDirectory, validateFolderName, writeEmlDirectory,
} from "@mailstack/mailbox-io";
import { parse } from "../args.ts";
import { register, UsageError } from "../registry.ts";

async function accountId(pool: Pool, address: string): Promise<number> {
  const account = await getAccount(pool, address);
  if (!account) throw new DirectoryError("not-found", `no such account: ${address}`);
  return account.id;
}

function format(value: string | undefined): "mbox" | "eml" {
  if (value === "mbox" || value === "eml") return value;
  throw new UsageError(`--format must be mbox or eml${value === undefined ? "" : `, not ${value}`}`);
}

/** mailctl reports refusals as DirectoryError (exit 1); mailbox-io's own refusals become one. */
async function refusals<T>(fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (error) {
    if (error instanceof MailboxIoError) throw new DirectoryError(error.code === "not-found" ? "not-found" : "invalid", error.message);
    throw error;
  }
}

const options = { format: { type: "string" }, folder: { type: "string" } } as const;

register(
  {
    name: "mailbox export",
    usage: "mailbox export ADDRESS --format mbox|eml --output PATH [--folder F]   "
      + "(mbox: one file with --folder, else PATH/<folder>.mbox; eml: PATH/[<folder>/]<uid>.eml)",
    async run(args, { pool, out }) {
      const { values, positionals } = parse(args, { ...options, output: { type: "string" } }, { min: 1, max: 1 });
      const kind = format(values.format);
      if (!values.output) throw new UsageError("--output PATH is needed");
      const output = values.output;
      await refusals(async () => {
        if (values.folder !== undefined) validateFolderName(values.folder);
        const id = await accountId(pool, positionals[0]!);
        const folder = values.folder === undefined ? undefined : await existingFolder(pool, id, values.folder);
        if (kind === "mbox" && folder !== undefined) {
          await exportMboxFile(pool, id, folder, output);
          out(`exported ${positionals[0]} ${folder} to ${output}`);
        } else if (kind === "mbox") {
          const folders = await exportMboxDirectory(pool, id, output);
          out(`exported ${folders.length} folder(s) of ${positionals[0]} to ${output}`);
        } else {
          const count = await writeEmlDirectory(output, emlFiles(pool, id, folder));
          out(`exported ${count} message(s) of ${positionals[0]} to ${output}`);
        }
      });
    },
  },
  {
    name: "mailbox import",
    usage: "mailbox import ADDRESS --format mbox|eml --input PATH [--folder F]   "
      + "(mbox: a file into F (INBOX), or a directory of *.mbox; eml: a directory, subdirectories become folders)",
    async run(args, { pool, out, env }) {
      const { values, positionals } = parse(args, { ...options, input: { type: "string" } }, { min: 1, max: 1 });
      const kind = format(values.format);
      if (!values.input) throw new UsageError("--input PATH is needed");
      const input = values.input;
      const limit = parseSize(env.API_IMPORT_MAX_MESSAGE_SIZE ?? "50M");
      if (limit === null) throw new UsageError("API_IMPORT_MAX_MESSAGE_SIZE is not a size");
      const result = await refusals(async () => {
        if (values.folder !== undefined) validateFolderName(values.folder);
        const id = await accountId(pool, positionals[0]!);
        await stat(input).catch(() => {
          throw new MailboxIoError("not-found", `no such file or directory: ${input}`);
        });
        if (kind === "mbox") return importMboxPath(pool, id, input, limit, values.folder);
        return importMessages(pool, id, emlMessages(readEmlDirectory(input, limit), values.folder));
      });
      out(`imported ${result.imported} message(s), ${result.bytes} bytes, into ${positionals[0]}: ${result.folders.join(", ") || "(nothing)"}`);
    },
  },
);

import { parseArgs, type ParseArgsConfig } from "node:util";
import { parseSize } from "@mailstack/config";
import { UsageError } from "./registry.ts";

type Options = NonNullable<ParseArgsConfig["options"]>;

/** Parses a command's arguments strictly; unknown flags and wrong positional counts are usage errors. */
export function parse<O extends Options>(args: string[], options: O, positionals: { min: number; max: number }) {
  let parsed;
  try {
    parsed = parseArgs({ args, options, allowPositionals: true, strict: true });
  } catch (error) {
    throw new UsageError((error as Error).message.split("\n")[0]!);
  }
  const count = parsed.positionals.length;
  if (count < positionals.min) throw new UsageError("missing argument");
  if (count > positionals.max) throw new UsageError(`unexpected argument: ${parsed.positionals[positionals.max]}`);
  return parsed;
}

export function sizeArgument(text: string, what: string): number {
  const bytes = parseSize(text);
  if (bytes === null || !Number.isSafeInteger(bytes)) throw new UsageError(`invalid ${what}: ${text} (expected a size such as 1G, 500M or 1048576)`);
  return bytes;
}

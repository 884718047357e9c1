import type { Pool } from "@mailstack/db";

export interface CommandContext {
  pool: Pool;
  /** Writes one line of output. */
  out: (line: string) => void;
  /** Reads standard input to the end (for --password-stdin and imports). */
  readStdin: () => Promise<string>;
  env: NodeJS.ProcessEnv;
}

export interface Command {
  /** Words that select the command, e.g. "domain add". */
  name: string;
  usage: string;
  /** Whether the command needs the database (all do today; kept explicit for `help`). */
  run: (args: string[], context: CommandContext) => Promise<void>;
}

/** A mistake in how the command was called: printed with the usage, exit code 2. */
export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "UsageError";
  }
}

const commands: Command[] = [];

export function register(...list: Command[]): void {
  commands.push(...list);
}

export function allCommands(): readonly Command[] {
  return commands;
}

/** Finds the command whose name matches the longest prefix of argv. */
export function findCommand(argv: string[]): { command: Command; rest: string[] } | null {
  let best: { command: Command; rest: string[] } | null = null;
  for (const command of commands) {
    const words = command.name.split(" ");
    if (words.every((word, i) => argv[i] === word) && (!best || words.length > best.command.name.split(" ").length)) {
      best = { command, rest: argv.slice(words.length) };
    }
  }
  return best;
}

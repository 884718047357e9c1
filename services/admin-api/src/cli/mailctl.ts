import { ConfigError, commonShape, loadConfig } from "@mailstack/config";
import { DirectoryError, createPool, databaseFailure, migrate } from "@mailstack/db";
import "./commands/index.ts";
import { allCommands, findCommand, UsageError } from "./registry.ts";

function usage(): string {
  return ["usage: mailctl COMMAND", "", ...allCommands().map((c) => `  mailctl ${c.usage}`)].join("\n");
}

/** The usage of every command of a group (`mailctl queue`), or null when the word names none. */
function groupUsage(group: string | undefined): string | null {
  const members = allCommands().filter((c) => c.name.split(" ")[0] === group);
  return members.length ? ["usage:", ...members.map((c) => `  mailctl ${c.usage}`)].join("\n") : null;
}

const HELP_FLAGS = new Set(["--help", "-h"]);

async function readStdin(): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks).toString("utf8");
}

/** Runs mailctl with argv; returns the exit code. Output goes to the given writers (tests capture it). */
export async function mailctl(
  argv: string[],
  io: { out: (line: string) => void; err: (line: string) => void; readStdin?: () => Promise<string> } = {
    out: (line) => process.stdout.write(`${line}\n`),
    err: (line) => process.stderr.write(`${line}\n`),
  },
  env: NodeJS.ProcessEnv = process.env,
): Promise<number> {
  if (argv.length === 0 || argv[0] === "help" || argv[0] === "--help" || argv[0] === "-h") {
    io.out(usage());
    return argv.length === 0 ? 2 : 0;
  }
  // `--help` anywhere before a `--` asks for the usage of what precedes it, without touching the database.
  const end = argv.includes("--") ? argv.indexOf("--") : argv.length;
  if (argv.slice(0, end).some((arg) => HELP_FLAGS.has(arg))) {
    const words = argv.slice(0, end).filter((arg) => !HELP_FLAGS.has(arg));
    const asked = findCommand(words);
    const text = asked ? `usage: mailctl ${asked.command.usage}` : groupUsage(words[0]);
    if (text) {
      io.out(text);
      return 0;
    }
  }
  const found = findCommand(argv);
  if (!found) {
    const group = argv.length === 1 ? groupUsage(argv[0]) : null;
    io.err(group ? `mailctl: ${argv[0]} needs a subcommand\n${group}` : `mailctl: unknown command: ${argv.join(" ")}\n${usage()}`);
    return 2;
  }
  let config;
  try {
    config = loadConfig({ DATABASE_URL: commonShape.DATABASE_URL }, env);
  } catch (error) {
    if (error instanceof ConfigError) {
      io.err(`mailctl: ${error.message}`);
      return 78;
    }
    throw error;
  }
  const pool = createPool({ url: config.DATABASE_URL, max: 2, applicationName: "mailctl" });
  try {
    // Never creates the database (the migrate command and ./mailstack start do): a typo in
    // DATABASE_URL must not end in an empty new database that every list command shows as empty.
    try {
      await migrate(pool);
    } catch (error) {
      io.err(`mailctl: ${databaseProblem(error, config.DATABASE_URL)}`);
      return 1;
    }
    await found.command.run(found.rest, { pool, out: io.out, readStdin: io.readStdin ?? readStdin, env });
    return 0;
  } catch (error) {
    if (error instanceof UsageError) {
      io.err(`mailctl: ${error.message}\nusage: mailctl ${found.command.usage}`);
      return 2;
    }
    // Refusals (DirectoryError and the like) and unexpected failures alike: one line, non-zero.
    io.err(`mailctl: ${(error as Error).message}`);
    return error instanceof DirectoryError ? 1 : 70;
  } finally {
    await pool.end();
  }
}

/** One line saying why the database at DATABASE_URL cannot be used (the URL without its password). */
function databaseProblem(error: unknown, url: string): string {
  if ((error as { code?: string }).code === "3D000") {
    const name = decodeURIComponent(new URL(url).pathname.slice(1));
    return `database ${name} does not exist (run the migrate command or ./mailstack start to create it)`;
  }
  return databaseFailure(error, url);
}

if (import.meta.url === `file://${process.argv[1]}`) {
  // A reader that stops early (`mailctl queue list | head -1`) closes the pipe: the rest of the
  // output is dropped quietly, the command still finishes, and the exit status is 141 (128 +
  // SIGPIPE), what a shell reports for git, psql or cat cut short the same way.
  let stdoutClosed = false;
  process.stdout.on("error", (error: NodeJS.ErrnoException) => {
    if (error.code !== "EPIPE") throw error;
    stdoutClosed = true;
    // The error may arrive after mailctl has returned (its last write, then the pool's end).
    if (!process.exitCode) process.exitCode = 141;
  });
  const code = await mailctl(process.argv.slice(2), {
    out: (line) => {
      if (!stdoutClosed) process.stdout.write(`${line}\n`);
    },
    err: (line) => process.stderr.write(`${line}\n`),
  });
  process.exitCode = stdoutClosed && code === 0 ? 141 : code;
}

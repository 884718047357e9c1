// A private Postfix instance for interoperability tests: its config, queue and data directories
// under a root of the test's own in /tmp, its own SMTP port, its log in a file. Nothing of the
// system's Postfix (/etc/postfix) is changed; its master.cf is read as the template of the
// instance's services. Mail goes in over SMTP or with `sendmail -C` (run as root, postdrop takes
// a configuration directory that /etc/postfix/main.cf does not list).
import { execFile } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { promisify } from "node:util";
import { freePort } from "./process.ts";

const run = promisify(execFile);

/** Postfix is installed and we may run it (it starts as root). */
export const postfixAvailable = existsSync("/usr/sbin/postfix") && process.getuid?.() === 0;

export interface PostfixOptions {
  /** The instance's directory (removed and made again): etc/, spool/, lib/, maillog. */
  root: string;
  myhostname: string;
  /** main.cf settings on top of (and replacing) the base ones below. */
  main?: Record<string, string>;
  /** Lines added to master.cf (more smtpd listeners, smtp clients with -o overrides). */
  master?: string[];
  /** The port of the smtpd listener on 127.0.0.1; a free one when absent. */
  port?: number;
}

export interface Postfix {
  root: string;
  dir: string;
  /** Postfix's smtpd port on 127.0.0.1. */
  port: number;
  /** Everything Postfix logged so far. */
  log(): string;
  /** Posts a message with `sendmail -C dir` and the given options (-f, -N, -V, ...), then the recipients. */
  sendmail(args: string[], message: string | Buffer): Promise<void>;
  stop(): Promise<void>;
}

/**
 * Writes the instance's main.cf and master.cf (every service unchrooted, the smtpd listener on
 * `port`), checks it and starts it. Retries and queue runs come every second, so that a test
 * sees Postfix send again within a few seconds.
 */
export async function startPostfix(options: PostfixOptions): Promise<Postfix> {
  const { root } = options;
  const dir = `${root}/etc`;
  const queue = `${root}/spool`;
  const data = `${root}/lib`;
  const log = `${root}/maillog`;
  const port = options.port ?? (await freePort());
  await run("postfix", ["-c", dir, "stop"]).catch(() => undefined);
  rmSync(root, { recursive: true, force: true });
  for (const path of [dir, queue, data]) mkdirSync(path, { recursive: true });
  await run("chown", ["postfix", data]);
  const master = readFileSync("/etc/postfix/master.cf", "utf8").replace(/^smtp(\s+)inet/m, `${port}$1inet`);
  writeFileSync(`${dir}/master.cf`, `${master}\n${(options.master ?? []).join("\n")}\n`);
  const main: Record<string, string> = {
    compatibility_level: "3.6",
    queue_directory: queue,
    data_directory: data,
    myhostname: options.myhostname,
    mydestination: "",
    inet_interfaces: "127.0.0.1",
    inet_protocols: "ipv4",
    mynetworks: "127.0.0.0/8",
    queue_run_delay: "1s",
    minimal_backoff_time: "1s",
    maximal_backoff_time: "2s",
    maillog_file_prefixes: root,
    maillog_file: log,
    alias_maps: "",
    alias_database: "",
    ...options.main,
  };
  writeFileSync(`${dir}/main.cf`, Object.entries(main).map(([name, value]) => `${name} = ${value}\n`).join(""));
  await run("postconf", ["-c", dir, "-F", "*/*/chroot = n"]);
  await run("postfix", ["-c", dir, "check"]);
  await run("postfix", ["-c", dir, "start"]);
  return {
    root,
    dir,
    port,
    log: () => (existsSync(log) ? readFileSync(log, "utf8") : ""),
    sendmail: (args, message) =>
      new Promise<void>((resolve, reject) => {
        const child = execFile("sendmail", ["-C", dir, ...args], (error) => (error ? reject(error) : resolve()));
        child.stdin!.end(message);
      }),
    async stop() {
      await run("postfix", ["-c", dir, "stop"]).catch(() => undefined);
    },
  };
}

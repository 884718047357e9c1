// The Dockerfile, checked without a Docker engine: its shape (multi-stage, node:22-slim,
// non-root, health check, tini), and its build stage replayed on this machine. For each
// service, the build stage's COPY instructions (with .dockerignore applied) and its
// `pnpm install` line run in a scratch folder, then the service's modules are imported from
// the resulting tree, which is what the image's `node src/main.ts` does. This catches a file
// the image forgets to copy, a dependency that is not installed, and workspace packages that
// end up under node_modules (Node refuses to strip types there).
import { after, test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync, spawnSync } from "node:child_process";
import { cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, relative } from "node:path";
import { readYaml, render, root, serviceNames, sharedConfig } from "./lib.ts";

interface Instruction {
  keyword: string;
  args: string;
}

function parseDockerfile(text: string): Instruction[][] {
  const logical = text
    .split("\n")
    .filter((line) => !/^\s*#/.test(line))
    .join("\n")
    .replace(/\\\n/g, " ");
  const stages: Instruction[][] = [];
  for (const line of logical.split("\n")) {
    const match = /^\s*([A-Za-z]+)\s+(.*)$/.exec(line);
    if (!match) continue;
    const instruction = { keyword: match[1]!.toUpperCase(), args: match[2]!.trim() };
    if (instruction.keyword === "FROM") stages.push([]);
    (stages.at(-1) ?? stages[stages.push([]) - 1]!).push(instruction);
  }
  return stages;
}

const dockerfile = readFileSync(join(root, "Dockerfile"), "utf8");
const stages = parseDockerfile(dockerfile);
const globalArgs = new Map(
  [...dockerfile.matchAll(/^ARG\s+([A-Z_]+)=(\S+)/gm)].map((match) => [match[1]!, match[2]!] as [string, string]),
);
const buildStage = stages.find((stage) => /\sAS\s+build$/i.test(stage[0]!.args))!;
const finalStage = stages.at(-1)!;
const all = (stage: Instruction[], keyword: string) => stage.filter((i) => i.keyword === keyword);

test("the Dockerfile is multi-stage, node:22-slim, non-root, health-checked, with tini as PID 1", () => {
  assert.ok(stages.length >= 2, "multi-stage");
  assert.ok(buildStage, "a stage named build");
  const base = all(finalStage, "FROM")[0]!.args.split(/\s+/)[0]!.replace(/\$\{(\w+)\}/g, (_m, name) => globalArgs.get(name) ?? "");
  assert.match(base, /^node:22(\.\d+)*-slim$/, "runtime image");
  const user = all(finalStage, "USER").at(-1)?.args;
  assert.ok(user && !/^(root|0)(:|$)/.test(user), `runs as ${user}`);
  assert.match(all(finalStage, "HEALTHCHECK")[0]?.args ?? "", /CMD .*healthcheck\.mjs/);
  assert.match(all(finalStage, "ENTRYPOINT")[0]?.args ?? "", /tini/);
  assert.deepEqual(JSON.parse(all(finalStage, "CMD")[0]!.args), ["node", "src/main.ts"]);
  assert.equal(all(finalStage, "WORKDIR").at(-1)?.args, "/app/services/${SERVICE}");
  const runs = buildStage.filter((i) => i.keyword === "RUN").map((i) => i.args).join("\n");
  assert.doesNotMatch(runs, /pnpm\s+deploy/, "pnpm deploy puts workspace .ts under node_modules");
  assert.match(runs, /pnpm install .*--frozen-lockfile/);
  assert.match(runs, /pnpm install .*--prod/);
});

test("the health check script is copied where HEALTHCHECK and compose run it", () => {
  const copy = all(finalStage, "COPY").find((i) => i.args.includes("healthcheck.mjs"));
  assert.ok(copy, "COPY of deploy/docker/healthcheck.mjs");
  const [source, destination] = copy.args.split(/\s+/);
  assert.equal(source, "deploy/docker/healthcheck.mjs");
  assert.match(all(finalStage, "HEALTHCHECK")[0]!.args, new RegExp(`"${destination}"`));
  const compose = readYaml("docker-compose.yml");
  for (const name of serviceNames()) {
    assert.ok(compose.services[name].healthcheck.test.includes(destination), `compose ${name} healthcheck runs ${destination}`);
  }
});

test("the image sets the same memory settings as the stack (scripts/stack.ts)", () => {
  const stack = readFileSync(join(root, "scripts/stack.ts"), "utf8");
  const env = all(finalStage, "ENV").map((i) => i.args).join(" ");
  for (const name of ["NODE_OPTIONS", "MALLOC_ARENA_MAX"]) {
    const expected = new RegExp(`${name}: process\\.env\\.${name} \\?\\? "([^"]+)"`).exec(stack)?.[1];
    assert.ok(expected, `scripts/stack.ts default for ${name}`);
    const actual = new RegExp(`${name}=(\\S+)`).exec(env)?.[1];
    assert.equal(actual, expected, `Dockerfile ENV ${name}`);
  }
});

test("the image's TLS_DIR exists, belongs to the service user, and is what compose and Kubernetes mount", () => {
  const env = all(finalStage, "ENV").map((i) => i.args).join(" ");
  const tlsDir = /TLS_DIR=(\S+)/.exec(env)?.[1];
  assert.ok(tlsDir, "ENV TLS_DIR");
  const runs = all(finalStage, "RUN").map((i) => i.args).join(" ");
  assert.ok(runs.includes(`mkdir -p ${tlsDir}`), "TLS_DIR created");
  assert.match(runs, new RegExp(`chown -R node:node ${dirname(tlsDir)}`), "TLS_DIR owned by node");
  const compose = readYaml("docker-compose.yml");
  assert.equal(compose["x-service-env"].TLS_DIR, tlsDir);
  const config = sharedConfig(render("deploy/base"));
  assert.equal(config.data.TLS_DIR, tlsDir);
});

// ---- the build stage, replayed ----

const ignorePatterns = readFileSync(join(root, ".dockerignore"), "utf8")
  .split("\n")
  .map((line) => line.trim())
  .filter((line) => line && !line.startsWith("#"));

function globToRegExp(pattern: string): RegExp {
  let source = "";
  for (let i = 0; i < pattern.length; i++) {
    const char = pattern[i]!;
    if (pattern.startsWith("**/", i)) {
      source += "(?:.*/)?";
      i += 2;
    } else if (pattern.startsWith("**", i)) {
      source += ".*";
      i += 1;
    } else if (char === "*") source += "[^/]*";
    else if (char === "?") source += "[^/]";
    else source += char.replace(/[.+^${}()|[\]\\]/g, "\\$&");
  }
  return new RegExp(`^${source.replace(/\/$/, "")}$`);
}
const ignored = ignorePatterns.map(globToRegExp);

/** True when the path or one of its parent folders matches a .dockerignore pattern. */
function isIgnored(path: string): boolean {
  const parts = path.split("/");
  for (let end = 1; end <= parts.length; end++) {
    const prefix = parts.slice(0, end).join("/");
    if (ignored.some((pattern) => pattern.test(prefix))) return true;
  }
  return false;
}

test(".dockerignore keeps node_modules, .git and tests out of the build context", () => {
  assert.ok(!ignorePatterns.some((p) => p.startsWith("!")), "no negations (the replay below does not implement them)");
  for (const path of ["node_modules", "packages/db/node_modules/pg", ".git", "services/msa/test/x.test.ts", "packages/bus/test"]) {
    assert.ok(isIgnored(path), `${path} should be ignored`);
  }
  for (const path of ["packages/db/src/migrate.ts", "services/msa/src/main.ts", "pnpm-lock.yaml", "patches", "deploy/docker/healthcheck.mjs"]) {
    assert.ok(!isIgnored(path), `${path} must reach the build`);
  }
});

const scratch = mkdtempSync(join(tmpdir(), "mailstack-image-"));
after(() => rmSync(scratch, { recursive: true, force: true }));
const frozenFailures: string[] = [];

function replayBuildStage(service: string): string {
  const app = join(scratch, service);
  const expand = (text: string) => text.replace(/\$\{?SERVICE\}?/g, service);
  let workdir = app;
  for (const instruction of buildStage) {
    if (instruction.keyword === "WORKDIR") workdir = join(app, relative("/app", expand(instruction.args)));
    if (instruction.keyword === "COPY" && !instruction.args.startsWith("--from")) {
      const parts = expand(instruction.args).split(/\s+/).filter((part) => !part.startsWith("--"));
      const destination = parts.pop()!;
      for (const source of parts) {
        const from = join(root, source);
        assert.ok(existsSync(from), `COPY ${source}: missing from the build context`);
        const to = destination.endsWith("/") && !statSync(from).isDirectory() ? join(workdir, destination, source.split("/").at(-1)!) : join(workdir, destination);
        cpSync(from, to, {
          recursive: true,
          filter: (path) => !isIgnored(relative(root, path)),
        });
      }
    }
  }
  const install = buildStage.find((i) => i.keyword === "RUN" && /pnpm install/.test(i.args))!;
  const command = expand(install.args.slice(install.args.indexOf("pnpm install")));
  const run = (line: string) => spawnSync("sh", ["-c", `${line} --offline`], { cwd: workdir, encoding: "utf8", timeout: 120_000 });
  // Once the lockfile has failed --frozen-lockfile, later services skip straight to the fallback.
  let result: { status: number | null; stderr: string; stdout: string } = frozenFailures.length ? { status: 1, stderr: "", stdout: "" } : run(command);
  if (result.status !== 0 && command.includes("--frozen-lockfile") && !frozenFailures.length) {
    frozenFailures.push(`${service}: ${(result.stderr || result.stdout).trim().split("\n").slice(-3).join(" ")}`);
    // Keep checking the layout even when the lockfile is out of step (reported separately).
  }
  if (result.status !== 0 || frozenFailures.length) {
    // Without a usable lockfile pnpm resolves every workspace link, devDependencies included,
    // so it needs the other services' manifests (a frozen install does not).
    for (const other of serviceNames()) {
      const target = join(workdir, "services", other, "package.json");
      if (existsSync(target)) continue;
      mkdirSync(dirname(target), { recursive: true });
      cpSync(join(root, "services", other, "package.json"), target);
    }
    result = run(command.replace("--frozen-lockfile", "--no-frozen-lockfile"));
  }
  assert.equal(result.status, 0, `${service}: ${command} failed: ${result.stderr || result.stdout}`);
  return app;
}

test("each service's image tree resolves all of its imports from the build stage's files", { timeout: 240_000 }, () => {
  for (const service of serviceNames()) {
    const app = replayBuildStage(service);
    const imports = [`./src/service.ts`, "@mailstack/telemetry/sdk"];
    // Migrations are read from packages/db/migrations at run time, by every service.
    assert.ok(existsSync(join(app, "packages/db/migrations/001_initial.sql")), `${service}: migrations in the image`);
    if (service === "admin-api") {
      // The migrations Job runs packages/db/src/migrate-cli.ts from this image.
      imports.push("../../packages/db/src/migrate.ts", "../../packages/db/src/ensure-database.ts", "../../packages/db/src/pool.ts");
    }
    const script = imports.map((specifier) => `await import(${JSON.stringify(specifier)});`).join("\n");
    const output = spawnSync(process.execPath, ["--input-type=module", "-e", script], {
      cwd: join(app, "services", service),
      encoding: "utf8",
      env: { PATH: process.env.PATH, NODE_ENV: "production", LOG_LEVEL: "silent" },
      timeout: 30_000,
    });
    assert.equal(output.status, 0, `services/${service} in the image layout: ${output.stderr}`);
    // Workspace packages must resolve outside node_modules, where Node strips types.
    const realConfig = execFileSync(process.execPath, ["--input-type=module", "-e", "console.log(import.meta.resolve('@mailstack/config'))"], {
      cwd: join(app, "services", service),
      encoding: "utf8",
    });
    assert.ok(!realConfig.includes("/node_modules/"), `@mailstack/config resolves under node_modules: ${realConfig}`);
    assert.ok(realConfig.trim().endsWith("/packages/config/src/index.ts"), realConfig);
    rmSync(app, { recursive: true, force: true });
  }
});

test("pnpm-lock.yaml satisfies --frozen-lockfile, as the image build (and CI's install) require", () => {
  assert.deepEqual(frozenFailures, [], "pnpm install --frozen-lockfile failed; fix package.json/pnpm-lock.yaml");
});

// Shared helpers for the offline deployment checks: rendering kustomize overlays, and reading
// from the sources which environment variables and ports each service really uses.
import { execFileSync } from "node:child_process";
import { existsSync, readdirSync, readFileSync, statSync } from "node:fs";
import { join, relative } from "node:path";
import { parseAllDocuments } from "yaml";
import { parseDuration } from "../../packages/config/src/index.ts";

export const root = join(import.meta.dirname, "..", "..");

export type K8sObject = {
  apiVersion: string;
  kind: string;
  metadata: { name: string; namespace?: string; labels?: Record<string, string>; annotations?: Record<string, string> };
  [key: string]: any;
};

/** Folders under services/ that are services (have a package.json). */
export function serviceNames(): string[] {
  const dir = join(root, "services");
  return readdirSync(dir)
    .filter((name) => existsSync(join(dir, name, "package.json")))
    .sort();
}

/** deploy/base plus every folder under deploy/overlays. */
export function kustomizations(): string[] {
  const overlays = join(root, "deploy", "overlays");
  return [
    "deploy/base",
    ...readdirSync(overlays)
      .filter((name) => existsSync(join(overlays, name, "kustomization.yaml")))
      .map((name) => `deploy/overlays/${name}`),
  ];
}

/** Overlays an operator applies as a whole (base alone lacks the autoscaler and settings). */
export function overlays(): string[] {
  return kustomizations().filter((dir) => dir !== "deploy/base");
}

const rendered = new Map<string, K8sObject[]>();

/** `kubectl kustomize <dir>` parsed into objects (cached per process). */
export function render(dir: string): K8sObject[] {
  const cached = rendered.get(dir);
  if (cached) return cached;
  let output: string;
  try {
    output = execFileSync("kubectl", ["kustomize", join(root, dir)], { encoding: "utf8", maxBuffer: 32 * 1024 * 1024, stdio: ["ignore", "pipe", "pipe"] });
  } catch (error) {
    const { code, stderr } = error as { code?: string; stderr?: string };
    if (code === "ENOENT") throw new Error("kubectl is not installed (it renders kustomizations offline; apt-get install -y kubectl)");
    throw new Error(`kubectl kustomize ${dir} failed: ${stderr ?? error}`);
  }
  const objects = parseYamlDocuments(output, dir) as K8sObject[];
  rendered.set(dir, objects);
  return objects;
}

export function parseYamlDocuments(text: string, where: string): unknown[] {
  const documents = parseAllDocuments(text, { merge: true });
  if (!Array.isArray(documents)) return [];
  return documents
    .map((document) => {
      if (document.errors.length) throw new Error(`${where}: ${document.errors.map((e) => e.message).join("; ")}`);
      return document.toJS({ maxAliasCount: 1000 });
    })
    .filter((value) => value !== null && value !== undefined);
}

export function readYaml(path: string): any {
  const [value] = parseYamlDocuments(readFileSync(join(root, path), "utf8"), path);
  return value;
}

export function find(objects: K8sObject[], kind: string, name: string): K8sObject | undefined {
  return objects.find((object) => object.kind === kind && object.metadata.name === name);
}

/** The shared settings ConfigMap (generated, so its name carries a content hash). */
export function sharedConfig(objects: K8sObject[]): K8sObject {
  const matches = objects.filter((o) => o.kind === "ConfigMap" && /^mailstack-config(-[a-z0-9]{10})?$/.test(o.metadata.name));
  if (matches.length !== 1) throw new Error(`expected one mailstack-config ConfigMap, found ${matches.length}`);
  return matches[0]!;
}

export function ofKind(objects: K8sObject[], kind: string): K8sObject[] {
  return objects.filter((object) => object.kind === kind);
}

// ---- what the code reads ----

function tsFiles(dir: string): string[] {
  if (!existsSync(dir)) return [];
  const files: string[] = [];
  for (const entry of readdirSync(dir)) {
    const path = join(dir, entry);
    if (statSync(path).isDirectory()) files.push(...tsFiles(path));
    else if (entry.endsWith(".ts")) files.push(path);
  }
  return files;
}

/** The @mailstack/* packages a service depends on, transitively (folders under packages/). */
export function workspaceDependencies(serviceDir: string): string[] {
  const seen = new Set<string>();
  const visit = (packageJsonPath: string) => {
    const manifest = JSON.parse(readFileSync(packageJsonPath, "utf8"));
    for (const name of Object.keys(manifest.dependencies ?? {})) {
      if (!name.startsWith("@mailstack/")) continue;
      const folder = name.slice("@mailstack/".length);
      if (seen.has(folder)) continue;
      const path = join(root, "packages", folder, "package.json");
      if (!existsSync(path)) continue;
      seen.add(folder);
      visit(path);
    }
  };
  visit(join(root, serviceDir, "package.json"));
  return [...seen].sort();
}

// Keys of zod shapes (`SMTP_PORT: port(25)`, `RELAY_SMARTHOST_TLS: tlsMode("opportunistic")`,
// `TLS_DIR: z.string()`, `X: commonShape.X`) and direct reads (`process.env.X`, `env.X`,
// `env["X"]`) and the ops port variable of runService.
const SHAPE_KEY = /(?:^|[{,])\s*([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*)\s*:\s*(?:[a-z][A-Za-z0-9]*\s*\(|z\s*\.|[A-Za-z]+Shape\.)/gm;
const ENV_READ = /\benv(?:\.([A-Z][A-Z0-9_]*)|\[\s*["'`]([A-Z][A-Z0-9_]*)["'`]\s*\])/g;
const OPS_VARIABLE = /opsPortVariable:\s*["']([A-Z][A-Z0-9_]*)["']/g;
const PORT_DEFAULT = /([A-Z][A-Z0-9_]*_PORT)\s*:\s*port\(\s*(\d+)\s*\)/g;
const OPS_DEFAULT = /opsPortDefault:\s*(\d+)/;
const HOST_DEFAULT = /([A-Z][A-Z0-9_]*_(?:HOST|LISTEN|BIND|ADDRESS))\s*:\s*z\.string\(\)\.default\(\s*["'`]([^"'`]*)["'`]/g;
/** Port variables naming a remote port the service connects to, not one it listens on. */
const OUTBOUND_PORT = /DEST|REMOTE|SMARTHOST|UPSTREAM|RELAYHOST/;

export interface ServiceFacts {
  name: string;
  /** Every environment variable name the service or its workspace packages read. */
  env: Set<string>;
  /** Listening port variables and their defaults (including the ops port). */
  ports: Map<string, number>;
  /** Bind-address variables and their defaults. */
  hosts: Map<string, string>;
  opsVariable: string;
  opsDefault: number;
  files: string[];
}

export function serviceFacts(name: string): ServiceFacts {
  const serviceDir = `services/${name}`;
  const files = [
    ...tsFiles(join(root, serviceDir, "src")),
    ...workspaceDependencies(serviceDir).flatMap((folder) => tsFiles(join(root, "packages", folder, "src"))),
  ];
  const env = new Set<string>();
  const ports = new Map<string, number>();
  const hosts = new Map<string, string>();
  let opsVariable = "";
  let opsDefault = 0;
  for (const file of files) {
    const text = readFileSync(file, "utf8");
    for (const match of text.matchAll(SHAPE_KEY)) env.add(match[1]!);
    for (const match of text.matchAll(ENV_READ)) env.add((match[1] ?? match[2])!);
    for (const match of text.matchAll(PORT_DEFAULT)) {
      if (!OUTBOUND_PORT.test(match[1]!)) ports.set(match[1]!, Number(match[2]));
    }
    for (const match of text.matchAll(HOST_DEFAULT)) hosts.set(match[1]!, match[2]!);
    if (file.startsWith(join(root, serviceDir))) {
      for (const match of text.matchAll(OPS_VARIABLE)) {
        opsVariable = match[1]!;
        env.add(opsVariable);
      }
      const ops = OPS_DEFAULT.exec(text);
      if (ops) opsDefault = Number(ops[1]);
    }
  }
  if (opsVariable) ports.set(opsVariable, opsDefault);
  return { name, env, ports, hosts, opsVariable, opsDefault, files: files.map((file) => relative(root, file)) };
}

/** Variables read by libraries rather than our code: the OpenTelemetry SDK and Node itself. */
export function isLibraryVariable(name: string): boolean {
  return name.startsWith("OTEL_") || ["NODE_ENV", "NODE_OPTIONS", "NODE_EXTRA_CA_CERTS", "MALLOC_ARENA_MAX", "TZ", "SERVICE"].includes(name);
}

/** SHUTDOWN_TIMEOUT-style durations in seconds, parsed as the services parse them. */
export function durationSeconds(text: string): number {
  const ms = parseDuration(text);
  if (ms === null) throw new Error(`not a duration: ${text}`);
  return ms / 1000;
}

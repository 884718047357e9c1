// The manifests and the code must agree: every variable the manifests set is one the service
// (or a workspace package it uses) reads, every listening port the service opens is set to an
// unprivileged port that the container, the Service and the compose mapping expose, and the
// ops port the probes hit is the one the service serves /healthz and /readyz on.
// What the code reads is found by scanning services/<name>/src and its @mailstack/* packages
// (lib.ts: zod shape keys, env reads, runService's opsPortVariable).
import { test } from "node:test";
import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import {
  find,
  isLibraryVariable,
  kustomizations,
  ofKind,
  readYaml,
  render,
  root,
  serviceFacts,
  serviceNames,
  type K8sObject,
  type ServiceFacts,
} from "./lib.ts";
import { parseDuration, parseSize } from "../../packages/config/src/index.ts";

interface Placement {
  where: string;
  service: string;
  /** Variables set for the service's process, with values (secret values may be unknown). */
  env: Map<string, string | undefined>;
  /** Variables set specifically for this service (not from the shared ConfigMap/anchor). */
  own: Set<string>;
  /** Ports the container exposes (k8s containerPorts, compose published targets). */
  exposed: Set<number>;
}

const facts = new Map<string, ServiceFacts>(serviceNames().map((name) => [name, serviceFacts(name)]));
const everyVariable = new Set([...facts.values()].flatMap((f) => [...f.env]));

function kubernetesPlacements(dir: string): Placement[] {
  const objects = render(dir);
  const placements: Placement[] = [];
  for (const name of serviceNames()) {
    const deployment = find(objects, "Deployment", name);
    assert.ok(deployment, `${dir}: Deployment ${name}`);
    const container = deployment.spec.template.spec.containers.find((c: any) => c.name === name);
    const env = new Map<string, string | undefined>();
    for (const source of container.envFrom ?? []) {
      if (source.configMapRef) {
        const config = find(objects, "ConfigMap", source.configMapRef.name)!;
        for (const [key, value] of Object.entries(config.data ?? {})) env.set(key, String(value));
      }
      if (source.secretRef) {
        const secret = find(objects, "Secret", source.secretRef.name) ?? readYaml("deploy/base/secret.template.yaml");
        for (const key of Object.keys({ ...secret.data, ...secret.stringData })) env.set(key, undefined);
      }
    }
    const own = new Set<string>();
    for (const variable of container.env ?? []) {
      env.set(variable.name, variable.value);
      own.add(variable.name);
    }
    const exposed = new Set<number>((container.ports ?? []).map((p: any) => p.containerPort));
    placements.push({ where: `${dir} Deployment/${name}`, service: name, env, own, exposed });
  }
  return placements;
}

function composePlacements(): Placement[] {
  const compose = readYaml("docker-compose.yml");
  const placements: Placement[] = [];
  for (const name of serviceNames()) {
    const service = compose.services[name];
    assert.ok(service, `docker-compose.yml: service ${name}`);
    const env = new Map<string, string | undefined>(Object.entries(service.environment ?? {}).map(([k, v]) => [k, String(v)]));
    const shared = new Set(Object.keys(compose["x-service-env"] ?? {}));
    const own = new Set([...env.keys()].filter((key) => !shared.has(key)));
    const exposed = new Set<number>();
    for (const mapping of service.ports ?? []) {
      const target = typeof mapping === "object" ? mapping.target : Number(String(mapping).split(":").at(-1));
      exposed.add(Number(target));
    }
    // Unpublished listeners (LMTP, ops) are reachable on the compose network.
    for (const [key, value] of env) if (facts.get(name)!.ports.has(key) && value) exposed.add(Number(value));
    placements.push({ where: `docker-compose.yml ${name}`, service: name, env, own, exposed });
  }
  return placements;
}

/** Runs checks that report every problem at once rather than stopping at the first. */
function expectNoProblems(body: (problem: (ok: boolean, message: string) => void) => void): void {
  const problems: string[] = [];
  body((ok, message) => {
    if (!ok) problems.push(message);
  });
  assert.deepEqual(problems, []);
}

function allPlacements(): Placement[] {
  return [...kustomizations().flatMap(kubernetesPlacements), ...composePlacements()];
}

test("the code scan finds what the services read (the scanner itself works)", () => {
  for (const [name, fact] of facts) {
    for (const variable of ["DATABASE_URL", "NATS_URL", "SHUTDOWN_TIMEOUT", "LOG_LEVEL"]) {
      assert.ok(fact.env.has(variable), `${name}: scan missed ${variable} (files: ${fact.files.length})`);
    }
    assert.ok(fact.opsVariable, `${name}: no opsPortVariable found in services/${name}/src`);
    assert.ok(fact.opsDefault > 0, `${name}: no opsPortDefault found`);
  }
});

test("every variable a service's manifest sets for it is one that service reads", () => {
  expectNoProblems((problem) => {
    for (const placement of allPlacements()) {
      const read = facts.get(placement.service)!.env;
      for (const name of placement.own) {
        problem(read.has(name) || isLibraryVariable(name), `${placement.where}: sets ${name}, which services/${placement.service} never reads`);
      }
    }
  });
});

test("every shared setting (ConfigMap, Secret, compose anchor) is read by at least one service", () => {
  expectNoProblems((problem) => {
    const shared = new Map<string, string>();
    for (const dir of kustomizations()) {
      const objects = render(dir);
      for (const config of ofKind(objects, "ConfigMap").filter((c) => c.metadata.name.startsWith("mailstack-config"))) {
        for (const key of Object.keys(config.data ?? {})) shared.set(key, `${dir} ConfigMap`);
      }
      for (const secret of ofKind(objects, "Secret").filter((s) => s.metadata.name.startsWith("mailstack-secrets"))) {
        for (const key of Object.keys({ ...secret.data, ...secret.stringData })) shared.set(key, `${dir} Secret`);
      }
    }
    const template = readYaml("deploy/base/secret.template.yaml");
    for (const key of Object.keys(template.stringData)) shared.set(key, "deploy/base/secret.template.yaml");
    const compose = readYaml("docker-compose.yml");
    for (const key of Object.keys(compose["x-service-env"])) shared.set(key, "docker-compose.yml x-service-env");
    problem(shared.size > 5, `only ${shared.size} shared settings found`);
    for (const [name, where] of shared) {
      problem(everyVariable.has(name) || isLibraryVariable(name), `${where}: sets ${name}, which no service reads`);
    }
  });
});

test("DATABASE_URL and NATS_URL reach every service", () => {
  for (const placement of allPlacements()) {
    assert.ok(placement.env.has("DATABASE_URL"), `${placement.where}: DATABASE_URL`);
    assert.ok(placement.env.get("NATS_URL"), `${placement.where}: NATS_URL`);
  }
});

test("every listening port is unprivileged, set explicitly and exposed by the container", () => {
  expectNoProblems((problem) => {
    for (const placement of allPlacements()) {
      const fact = facts.get(placement.service)!;
      for (const [variable, fallback] of fact.ports) {
        const value = placement.env.get(variable);
        const effective = value === undefined || value === "" ? fallback : Number(value);
        problem(
          effective >= 1024,
          `${placement.where}: ${variable} would be ${effective} (default ${fallback}); the container runs as non-root, set it to a port >= 1024`,
        );
        if (value !== undefined) {
          problem(placement.exposed.has(effective), `${placement.where}: ${variable}=${effective} but the container exposes ${[...placement.exposed]}`);
        }
      }
    }
  });
});

test("every exposed container port is one the service listens on", () => {
  expectNoProblems((problem) => {
    for (const placement of allPlacements()) {
      const fact = facts.get(placement.service)!;
      const listening = new Set(
        [...fact.ports].map(([variable, fallback]) => {
          const value = placement.env.get(variable);
          return value === undefined || value === "" ? fallback : Number(value);
        }),
      );
      for (const port of placement.exposed) {
        problem(listening.has(port), `${placement.where}: exposes ${port}, but services/${placement.service} listens on ${[...listening]}`);
      }
    }
  });
});

test("listeners bind to all interfaces inside containers", () => {
  expectNoProblems((problem) => {
    for (const placement of allPlacements()) {
      for (const [variable, fallback] of facts.get(placement.service)!.hosts) {
        const value = placement.env.get(variable) || fallback;
        problem(!/^(127\.|localhost$|::1$)/.test(value), `${placement.where}: ${variable}=${value} is loopback-only`);
      }
    }
  });
});

test("probes and the metrics annotation use the port the service serves /healthz /readyz /metrics on", () => {
  for (const dir of kustomizations()) {
    const objects = render(dir);
    for (const name of serviceNames()) {
      const fact = facts.get(name)!;
      const deployment = find(objects, "Deployment", name) as K8sObject;
      const container = deployment.spec.template.spec.containers[0];
      const ops = container.ports.find((p: any) => p.name === "ops");
      const value = container.env?.find((e: any) => e.name === fact.opsVariable)?.value;
      const served = value ? Number(value) : fact.opsDefault;
      assert.equal(ops?.containerPort, served, `${dir}: ${name} ops containerPort vs ${fact.opsVariable}`);
      assert.equal(deployment.spec.template.metadata.annotations?.["prometheus.io/port"], String(served), `${dir}: ${name} prometheus.io/port`);
    }
  }
});

test("the image's health check knows each service's default ops port", () => {
  const script = readFileSync(join(root, "deploy/docker/healthcheck.mjs"), "utf8");
  for (const [name, fact] of facts) {
    const match = new RegExp(`"${name}":\\s*(\\d+)`).exec(script);
    assert.ok(match, `deploy/docker/healthcheck.mjs has no default for ${name}`);
    assert.equal(Number(match[1]), fact.opsDefault, `healthcheck default for ${name}`);
  }
});

// ---- the documentation against the code ----

const DOCS = ["README.md", ...readdirSync(join(root, "docs")).filter((file) => file.endsWith(".md")).map((file) => `docs/${file}`)];
const VARIABLE = /`(_[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*|[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)`/g;

/**
 * Backticked variable names in a text, with the doc's shorthand expanded: in
 * "`AUTH_MAX_FAILURES_PER_IP` / `_PER_ACCOUNT`" the second is the first with another ending,
 * a variable of the code that ends so and shares the rest with the one before.
 */
function variablesIn(text: string, known: Set<string>): Set<string> {
  const names = new Set<string>();
  let previous = "";
  for (const match of text.matchAll(VARIABLE)) {
    const name = match[1]!;
    if (!name.startsWith("_")) {
      names.add(name);
      previous = name;
      continue;
    }
    for (const candidate of known) {
      if (candidate.endsWith(name) && previous.startsWith(candidate.slice(0, -name.length))) names.add(candidate);
    }
  }
  return names;
}

/** The rows of every table whose header names a variable column (the settings tables). */
function settingsTables(text: string): string {
  const rows: string[] = [];
  let inSettings = false;
  let previous = "";
  for (const line of text.split("\n")) {
    if (line.startsWith("|")) {
      if (!previous.startsWith("|")) inSettings = /\bvariable\b/i.test(line);
      else if (inSettings) rows.push(line);
    }
    previous = line;
  }
  return rows.join("\n");
}

test("every variable a settings table documents (README, docs/*.md) is one a service reads", () => {
  expectNoProblems((problem) => {
    for (const doc of DOCS) {
      const documented = variablesIn(settingsTables(readFileSync(join(root, doc), "utf8")), everyVariable);
      for (const name of documented) {
        problem(everyVariable.has(name) || isLibraryVariable(name), `${doc}: documents ${name}, which no service reads`);
      }
    }
  });
});

test("every variable a service reads is documented in README.md or docs/*.md", () => {
  const documented = new Set(DOCS.flatMap((doc) => [...variablesIn(readFileSync(join(root, doc), "utf8"), everyVariable)]));
  expectNoProblems((problem) => {
    for (const [service, fact] of facts) {
      for (const name of fact.env) {
        problem(documented.has(name) || isLibraryVariable(name), `services/${service} reads ${name}, which no document mentions`);
      }
    }
  });
});

/** Defaults as the code writes them: `X: port(25)`, `X: duration("25s")`, `X: z.enum([...]).default("info")`. */
function codeDefaults(): Map<string, Set<string>> {
  const defaults = new Map<string, Set<string>>();
  const files = new Set([...facts.values()].flatMap((fact) => fact.files));
  const helper = /^\s*([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)\s*:\s*(?:port|integer|bool|size|duration|list|tlsMode)\(\s*("[^"]*"|[0-9_]+|true|false)/gm;
  const chained = /^\s*([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)\s*:\s*z\s*\.[^\n]*?\.default\(\s*("[^"]*"|[0-9_]+|true|false)\s*\)/gm;
  for (const file of files) {
    const text = readFileSync(join(root, file), "utf8");
    for (const match of [...text.matchAll(helper), ...text.matchAll(chained)]) {
      const value = match[2]!.replace(/^"|"$/g, "").replace(/_/g, "");
      defaults.set(match[1]!, (defaults.get(match[1]!) ?? new Set()).add(value));
    }
  }
  return defaults;
}

function sameDefault(documented: string, coded: string): boolean {
  if (documented === coded) return true;
  const asDuration = [parseDuration(documented), parseDuration(coded)];
  if (asDuration[0] !== null && asDuration[0] === asDuration[1]) return true;
  const asSize = [parseSize(documented), parseSize(coded)];
  return asSize[0] !== null && asSize[0] === asSize[1];
}

test("every default a settings table gives for one variable is the code's default", () => {
  const coded = codeDefaults();
  assert.ok(coded.size > 50, `found only ${coded.size} defaults in the code`);
  let compared = 0;
  expectNoProblems((problem) => {
    for (const doc of DOCS) {
      for (const row of settingsTables(readFileSync(join(root, doc), "utf8")).split("\n")) {
        const [name, fallback] = row.split("|").slice(1, 3).map((cell) => cell.trim());
        // One variable with one plain value (not "—", "empty", a list or a sentence).
        if (!name || !/^`[A-Z][A-Z0-9_]+`$/.test(name) || !fallback || !/^`?[A-Za-z0-9.]+`?$/.test(fallback)) continue;
        const variable = name.slice(1, -1);
        const value = fallback.replace(/`/g, "");
        const defaults = coded.get(variable);
        if (!defaults || ["empty", "unset", "system"].includes(value)) continue;
        compared++;
        problem([...defaults].some((d) => sameDefault(value, d)), `${doc}: ${variable} defaults to ${value}, the code to ${[...defaults].join(" or ")}`);
      }
    }
  });
  assert.ok(compared > 50, `compared only ${compared} documented defaults`);
});

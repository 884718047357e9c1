// docker-compose.yml against the Compose Specification schema (vendored under deploy/schemas),
// and what `docker compose up` needs to give a working, traced mail system.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { Ajv } from "ajv";
import addFormatsModule from "ajv-formats";
import { durationSeconds, readYaml, root, serviceNames } from "./lib.ts";

const addFormats = addFormatsModule as unknown as (ajv: Ajv) => Ajv;
// The schema names draft-07 by its https URL, which ajv does not know under that spelling;
// draft-07 is ajv's default dialect, so the declaration is dropped rather than changed.
const { $schema: _dialect, ...schema } = JSON.parse(readFileSync(join(root, "deploy/schemas/compose-spec.json"), "utf8"));
const ajv = new Ajv({ strict: false, allErrors: true });
addFormats(ajv);
const validateCompose = ajv.compile(schema);

const compose = readYaml("docker-compose.yml");

/** Compose's `${NAME:-default}` interpolation, taking the defaults (no .env file). */
function interpolate(value: unknown): string {
  return String(value).replace(/\$\{([A-Z0-9_]+)(?::?-([^}]*))?\}/g, (_all, _name, fallback) => fallback ?? "");
}

function envOf(name: string): Record<string, string> {
  return Object.fromEntries(Object.entries(compose.services[name].environment ?? {}).map(([k, v]) => [k, interpolate(v)]));
}

test("docker-compose.yml validates against the Compose Specification schema", () => {
  const valid = validateCompose(compose);
  assert.ok(valid, `schema errors: ${JSON.stringify(validateCompose.errors, null, 2)}`);
});

test("the schema rejects a broken compose file (the validator is not a no-op)", () => {
  const broken = structuredClone(compose);
  broken.services["mta-inbound"].healthcheck = { ...broken.services["mta-inbound"].healthcheck, retires: 3 };
  broken.services["mta-inbound"].depends_on.migrate.condition = "service_finished";
  assert.equal(validateCompose(broken), false);
  const messages = JSON.stringify(validateCompose.errors);
  assert.match(messages, /retires/);
  assert.match(messages, /condition/);
});

test("every service is built from the Dockerfile with its SERVICE arg, health-checked and ordered after its dependencies", () => {
  for (const name of serviceNames()) {
    const service = compose.services[name];
    assert.ok(service, `no compose service ${name}`);
    assert.equal(service.build?.context, ".", `${name}: build context`);
    assert.equal(service.build?.args?.SERVICE, name, `${name}: build arg SERVICE`);
    assert.match(interpolate(service.image), new RegExp(`^mailstack/${name}:`), `${name}: image`);
    assert.ok(service.healthcheck?.test, `${name}: healthcheck`);
    assert.match(service.healthcheck.test.join(" "), /healthcheck\.mjs \/readyz/, `${name}: healthcheck hits /readyz`);
    assert.equal(service.depends_on?.migrate?.condition, "service_completed_successfully", `${name}: waits for migrations`);
    assert.equal(service.depends_on?.postgres?.condition, "service_healthy", `${name}: waits for PostgreSQL`);
    assert.equal(service.depends_on?.nats?.condition, "service_healthy", `${name}: waits for NATS`);
    const shutdown = durationSeconds(envOf(name).SHUTDOWN_TIMEOUT ?? "25s");
    assert.ok(durationSeconds(service.stop_grace_period ?? "10s") > shutdown, `${name}: stop_grace_period must exceed SHUTDOWN_TIMEOUT`);
    assert.ok(service.volumes?.some((v: string) => v.endsWith(`:${envOf(name).TLS_DIR}`)), `${name}: TLS volume at TLS_DIR`);
  }
});

test("infrastructure: PostgreSQL 15, NATS with JetStream on a volume, Jaeger with OTLP and its UI", () => {
  const { postgres, nats, jaeger } = compose.services;
  assert.match(postgres.image, /^postgres:15\b/);
  assert.ok(postgres.healthcheck?.test, "postgres healthcheck");
  assert.ok(postgres.volumes?.some((v: string) => v.endsWith(":/var/lib/postgresql/data")), "postgres data volume");
  assert.ok(nats.command.includes("-js"), "JetStream enabled");
  const storeDir = nats.command[nats.command.indexOf("-sd") + 1];
  assert.ok(nats.volumes?.some((v: string) => (v.split(":")[0] ?? "") in (compose.volumes ?? {}) && v.endsWith(`:${storeDir}`)), "JetStream store on a named volume");
  assert.ok(nats.healthcheck?.test, "nats healthcheck");
  assert.match(jaeger.image, /^jaegertracing\/all-in-one:/);
  const published = jaeger.ports.map((p: string) => p.split(":").at(-1));
  for (const port of ["16686", "4317", "4318"]) assert.ok(published.includes(port), `jaeger publishes ${port}`);
});

test("services export traces to Jaeger over OTLP", () => {
  for (const name of serviceNames()) {
    const env = envOf(name);
    const endpoint = new URL(env.OTEL_EXPORTER_OTLP_ENDPOINT!);
    assert.equal(endpoint.hostname, "jaeger", `${name}: OTLP endpoint host`);
    const expectedPort = env.OTEL_EXPORTER_OTLP_PROTOCOL === "grpc" ? "4317" : "4318";
    assert.equal(endpoint.port, expectedPort, `${name}: OTLP port for protocol ${env.OTEL_EXPORTER_OTLP_PROTOCOL}`);
  }
});

test("the admin API and the Jaeger UI are published on loopback only (bearer tokens over HTTP; no login)", () => {
  for (const [name, port] of [["admin-api", "8080"], ["jaeger", "16686"]] as const) {
    const published = (compose.services[name].ports ?? []).map(String).filter((p: string) => p.split(":").at(-2) === port);
    assert.deepEqual(published, [`127.0.0.1:${port}:${port}`], `${name} ${port}`);
  }
});

test("the migrate one-shot runs the migrate CLI before anything else", () => {
  const migrate = compose.services.migrate;
  assert.ok(migrate.command.join(" ").includes("packages/db/src/migrate-cli.ts"));
  assert.equal(migrate.restart, "no");
  assert.equal(migrate.depends_on.postgres.condition, "service_healthy");
  assert.equal(interpolate(migrate.environment.DATABASE_URL), envOf("admin-api").DATABASE_URL, "same database as the services");
});

test("the standard mail ports and the admin API are published on the host", () => {
  const expected: Record<string, string> = { "25": "mta-inbound", "587": "msa", "465": "msa", "110": "pop3", "995": "pop3", "8080": "admin-api" };
  for (const [port, name] of Object.entries(expected)) {
    const published = (compose.services[name].ports ?? []).map((p: string) => String(p).split(":").at(-2));
    assert.ok(published.includes(port), `${name} publishes ${port}`);
  }
});

// Offline checks of the Kubernetes manifests: every kustomization renders, every object
// validates against the Kubernetes 1.34 OpenAPI schemas (kubernetes-models) and the KEDA CRD
// schemas, and the deployment has what operating it needs.
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import ts from "typescript";
import { ConfigMap, Namespace, PersistentVolumeClaim, Secret, Service, ServiceAccount } from "kubernetes-models/v1";
import { Deployment, StatefulSet } from "kubernetes-models/apps/v1";
import { Job } from "kubernetes-models/batch/v1";
import { PodDisruptionBudget } from "kubernetes-models/policy/v1";
import { HorizontalPodAutoscaler } from "kubernetes-models/autoscaling/v2";
import { NetworkPolicy } from "kubernetes-models/networking.k8s.io/v1";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1";
import { Consumers, Streams } from "../../packages/bus/src/bus.ts";
import {
  durationSeconds,
  find,
  kustomizations,
  ofKind,
  overlays,
  readYaml,
  render,
  root,
  serviceNames,
  sharedConfig,
  type K8sObject,
} from "./lib.ts";

const models: Record<string, new (data: any) => { validate(): void }> = {
  "v1/ConfigMap": ConfigMap,
  "v1/Namespace": Namespace,
  "v1/PersistentVolumeClaim": PersistentVolumeClaim,
  "v1/Secret": Secret,
  "v1/Service": Service,
  "v1/ServiceAccount": ServiceAccount,
  "apps/v1/Deployment": Deployment,
  "apps/v1/StatefulSet": StatefulSet,
  "batch/v1/Job": Job,
  "policy/v1/PodDisruptionBudget": PodDisruptionBudget,
  "autoscaling/v2/HorizontalPodAutoscaler": HorizontalPodAutoscaler,
  "networking.k8s.io/v1/NetworkPolicy": NetworkPolicy,
  "keda.sh/v1alpha1/ScaledObject": ScaledObject,
};

/** Secrets the operator creates out of band in production (docs/deploy.md). */
const EXTERNAL_SECRETS = new Set(["mailstack-secrets", "mailstack-tls"]);

function validate(object: K8sObject, where: string): void {
  const Model = models[`${object.apiVersion}/${object.kind}`];
  assert.ok(Model, `${where}: no schema model for ${object.apiVersion} ${object.kind}; add it to the test`);
  // kustomize wraps long base64 values in Secret data at 70 columns; the API server's base64
  // decoder skips the newlines, the schema's "byte" format does not.
  if (object.kind === "Secret" && object.data) {
    object = { ...object, data: Object.fromEntries(Object.entries(object.data).map(([k, v]) => [k, String(v).replace(/\s+/g, "")])) };
  }
  try {
    new Model(object).validate();
  } catch (error) {
    assert.fail(`${where}: ${object.kind}/${object.metadata.name} is invalid: ${(error as Error).message}`);
  }
}

function podSpec(object: K8sObject): any {
  return object.spec?.template?.spec;
}

function labelsMatch(selector: Record<string, string>, labels: Record<string, string> = {}): boolean {
  return Object.entries(selector).every(([key, value]) => labels[key] === value);
}

test("every kustomization renders with kubectl kustomize and every object validates against its schema", () => {
  const dirs = kustomizations();
  assert.ok(dirs.length >= 4, `expected base and at least three overlays, found ${dirs.join(", ")}`);
  for (const dir of dirs) {
    const objects = render(dir);
    assert.ok(objects.length > 10, `${dir}: rendered only ${objects.length} objects`);
    for (const object of objects) validate(object, dir);
  }
});

// The JSON schemas above allow unknown properties, so a misspelled field (`readinesProbe`,
// `containerport`) would pass them and be dropped by the API server. TypeScript's excess
// property check on object literals typed with the same models' interfaces catches it.
function typeErrors(objects: Array<{ where: string; object: K8sObject }>): string[] {
  const dir = mkdtempSync(join(tmpdir(), "mailstack-manifests-"));
  try {
    const lines: string[] = [];
    objects.forEach(({ object }, index) => {
      const [group, version] = object.apiVersion.includes("/") ? object.apiVersion.split("/") : ["", object.apiVersion];
      const modulePath = group === "keda.sh"
        ? `${root}/node_modules/@kubernetes-models/keda/keda.sh/${version}/${object.kind}.js`
        : `${root}/node_modules/kubernetes-models/${group ? `${group}/` : ""}${version}/${object.kind}.js`;
      lines.push(`import type { I${object.kind} as T${index} } from ${JSON.stringify(modulePath)};`);
      lines.push(`export const o${index}: T${index} = ${JSON.stringify(object)};`);
    });
    const file = join(dir, "manifests.ts");
    writeFileSync(file, lines.join("\n"));
    const program = ts.createProgram([file], {
      strict: true,
      noEmit: true,
      skipLibCheck: true,
      target: ts.ScriptTarget.ES2022,
      module: ts.ModuleKind.NodeNext,
      moduleResolution: ts.ModuleResolutionKind.NodeNext,
      types: [],
    });
    return ts.getPreEmitDiagnostics(program).map((diagnostic) => {
      const message = ts.flattenDiagnosticMessageText(diagnostic.messageText, " ");
      if (!diagnostic.file || diagnostic.start === undefined) return message;
      const text = diagnostic.file.text;
      const line = text.slice(0, diagnostic.start).split("\n").length - 1;
      const index = Math.floor(line / 2);
      return `${objects[index]?.where ?? "?"} ${objects[index]?.object.kind}/${objects[index]?.object.metadata.name}: ${message}`;
    });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

test("no manifest has an unknown or misspelled field (checked against the models' TypeScript types)", () => {
  const objects = kustomizations().flatMap((dir) => render(dir).map((object) => ({ where: dir, object })));
  objects.push({ where: "deploy/base/secret.template.yaml", object: readYaml("deploy/base/secret.template.yaml") });
  assert.deepEqual(typeErrors(objects), []);
});

test("the field check catches a misspelled field (it is not a no-op)", () => {
  const deployment = structuredClone(find(render("deploy/base"), "Deployment", "msa")!);
  const container = deployment.spec.template.spec.containers[0];
  container.readinesProbe = container.readinessProbe;
  delete container.readinessProbe;
  const scaled = structuredClone(find(render("deploy/overlays/production"), "ScaledObject", "mta-outbound")!);
  scaled.spec.minReplicas = scaled.spec.minReplicaCount; // the HPA's spelling, not KEDA's
  const errors = typeErrors([
    { where: "mutated", object: deployment },
    { where: "mutated", object: scaled },
  ]);
  assert.equal(errors.length, 2, errors.join("\n"));
  assert.match(errors[0]!, /Deployment\/msa: .*readinesProbe/);
  assert.match(errors[1]!, /ScaledObject\/mta-outbound: .*minReplicas/);
});

test("the secret template and the vendored manifests outside kustomizations validate too", () => {
  validate(readYaml("deploy/base/secret.template.yaml"), "deploy/base/secret.template.yaml");
});

test("a schema violation is caught (the validator is not a no-op)", () => {
  const objects = render("deploy/base");
  const deployment = structuredClone(find(objects, "Deployment", "msa")!);
  podSpec(deployment).containers[0].ports[0].containerPort = "not-a-number";
  assert.throws(() => new Deployment(deployment as any).validate(), /containerPort/);
});

test("every service in services/ has a Deployment with image, probes, resources and a non-root security context", () => {
  const services = serviceNames();
  assert.ok(services.length >= 6, `found services ${services.join(", ")}`);
  for (const dir of kustomizations()) {
    const objects = render(dir);
    for (const name of services) {
      const deployment = find(objects, "Deployment", name);
      assert.ok(deployment, `${dir}: no Deployment for services/${name}`);
      const spec = podSpec(deployment);
      const container = spec.containers.find((c: any) => c.name === name);
      assert.ok(container, `${dir}: Deployment ${name} has no container named ${name}`);
      assert.match(container.image, new RegExp(`(^|/)mailstack/${name}:[\\w.-]+$`), `${dir}: ${name} image`);
      assert.equal(container.readinessProbe?.httpGet?.path, "/readyz", `${dir}: ${name} readiness probe`);
      assert.equal(container.livenessProbe?.httpGet?.path, "/healthz", `${dir}: ${name} liveness probe`);
      for (const probe of [container.readinessProbe, container.livenessProbe, container.startupProbe]) {
        if (!probe) continue;
        const port = container.ports.find((p: any) => p.name === probe.httpGet.port || p.containerPort === probe.httpGet.port);
        assert.ok(port, `${dir}: ${name} probe port ${probe.httpGet.port} is not a container port`);
        assert.equal(port.name, "ops", `${dir}: ${name} probes must hit the ops port`);
      }
      for (const kind of ["requests", "limits"]) {
        assert.ok(container.resources?.[kind]?.cpu, `${dir}: ${name} resources.${kind}.cpu`);
        assert.ok(container.resources?.[kind]?.memory, `${dir}: ${name} resources.${kind}.memory`);
      }
      assert.equal(spec.securityContext?.runAsNonRoot, true, `${dir}: ${name} runAsNonRoot`);
      assert.ok(spec.securityContext?.runAsUser > 0, `${dir}: ${name} runAsUser`);
      assert.equal(container.securityContext?.allowPrivilegeEscalation, false, `${dir}: ${name} allowPrivilegeEscalation`);
      assert.deepEqual(container.securityContext?.capabilities?.drop, ["ALL"], `${dir}: ${name} capabilities`);
      assert.equal(container.securityContext?.readOnlyRootFilesystem, true, `${dir}: ${name} readOnlyRootFilesystem`);
    }
  }
});

// The namespace enforces the "restricted" Pod Security Standard, so the API server would refuse
// any pod breaking it; these are that profile's rules (kubernetes.io/docs/concepts/security/pod-security-standards).
const RESTRICTED_VOLUME_TYPES = new Set(["configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"]);

function restrictedViolations(where: string, spec: any): string[] {
  const problems: string[] = [];
  const pod = spec.securityContext ?? {};
  if (spec.hostNetwork || spec.hostPID || spec.hostIPC) problems.push(`${where}: host namespaces`);
  for (const volume of spec.volumes ?? []) {
    const type = Object.keys(volume).find((key) => key !== "name");
    if (!type || !RESTRICTED_VOLUME_TYPES.has(type)) problems.push(`${where}: volume ${volume.name} of type ${type}`);
  }
  if (pod.runAsUser === 0) problems.push(`${where}: pod runAsUser 0`);
  for (const container of [...(spec.initContainers ?? []), ...spec.containers]) {
    const c = container.securityContext ?? {};
    const at = `${where} container ${container.name}`;
    if (c.privileged) problems.push(`${at}: privileged`);
    if (c.allowPrivilegeEscalation !== false) problems.push(`${at}: allowPrivilegeEscalation must be false`);
    if ((c.runAsNonRoot ?? pod.runAsNonRoot) !== true) problems.push(`${at}: runAsNonRoot must be true`);
    if (c.runAsUser === 0) problems.push(`${at}: runAsUser 0`);
    const seccomp = (c.seccompProfile ?? pod.seccompProfile)?.type;
    if (seccomp !== "RuntimeDefault" && seccomp !== "Localhost") problems.push(`${at}: seccompProfile ${seccomp}`);
    if (!c.capabilities?.drop?.includes("ALL")) problems.push(`${at}: capabilities.drop must include ALL`);
    for (const added of c.capabilities?.add ?? []) if (added !== "NET_BIND_SERVICE") problems.push(`${at}: adds ${added}`);
    for (const port of container.ports ?? []) if (port.hostPort) problems.push(`${at}: hostPort`);
  }
  return problems;
}

test("every pod (services, migrations Job, the dev overlay's PostgreSQL/NATS/Jaeger) meets the restricted Pod Security Standard", () => {
  const problems: string[] = [];
  for (const dir of kustomizations()) {
    const objects = render(dir);
    const namespace = find(objects, "Namespace", "mailstack")!;
    assert.equal(namespace.metadata.labels?.["pod-security.kubernetes.io/enforce"], "restricted", `${dir}: namespace enforces restricted`);
    for (const object of objects.filter((o) => podSpec(o))) {
      problems.push(...restrictedViolations(`${dir} ${object.kind}/${object.metadata.name}`, podSpec(object)));
    }
  }
  assert.deepEqual(problems, []);
  // The check itself: a root, privileged container is reported.
  const bad = { containers: [{ name: "x", securityContext: { privileged: true, runAsUser: 0 } }], volumes: [{ name: "h", hostPath: { path: "/" } }] };
  assert.ok(restrictedViolations("bad", bad).length >= 5);
});

test("terminationGracePeriodSeconds leaves room for preStop plus SHUTDOWN_TIMEOUT", () => {
  for (const dir of kustomizations()) {
    const objects = render(dir);
    const config = sharedConfig(objects);
    for (const name of serviceNames()) {
      const deployment = find(objects, "Deployment", name)!;
      const spec = podSpec(deployment);
      const container = spec.containers[0];
      const override = container.env?.find((e: any) => e.name === "SHUTDOWN_TIMEOUT")?.value;
      const shutdown = durationSeconds(override ?? config.data.SHUTDOWN_TIMEOUT ?? "25s");
      const preStop = container.lifecycle?.preStop?.exec?.command;
      const sleep = preStop?.[0] === "sleep" ? Number(preStop[1]) : 0;
      const grace = spec.terminationGracePeriodSeconds ?? 30;
      assert.ok(
        grace >= sleep + shutdown + 5,
        `${dir}: ${name} grace ${grace}s < preStop ${sleep}s + SHUTDOWN_TIMEOUT ${shutdown}s + 5s margin`,
      );
    }
  }
});

test("every Deployment has a PodDisruptionBudget selecting exactly its pods", () => {
  for (const dir of kustomizations()) {
    const objects = render(dir);
    const budgets = ofKind(objects, "PodDisruptionBudget");
    for (const name of serviceNames()) {
      const deployment = find(objects, "Deployment", name)!;
      const labels = deployment.spec.template.metadata.labels;
      const matching = budgets.filter((pdb) => labelsMatch(pdb.spec.selector.matchLabels, labels));
      assert.equal(matching.length, 1, `${dir}: ${name} is selected by ${matching.length} PodDisruptionBudgets`);
      const pdb = matching[0]!;
      const others = ofKind(objects, "Deployment").filter(
        (other) => other !== deployment && labelsMatch(pdb.spec.selector.matchLabels, other.spec.template.metadata.labels),
      );
      assert.equal(others.length, 0, `${dir}: PDB ${pdb.metadata.name} also selects ${others.map((o) => o.metadata.name)}`);
      assert.ok(pdb.spec.maxUnavailable !== undefined || pdb.spec.minAvailable !== undefined, `${dir}: PDB ${pdb.metadata.name} budget`);
    }
  }
});

test("the mail ports are LoadBalancer Services onto the right roles, the admin API is ClusterIP", () => {
  const expected: Array<[number, string, string]> = [
    [25, "mta-inbound", "LoadBalancer"],
    [587, "msa", "LoadBalancer"],
    [465, "msa", "LoadBalancer"],
    [110, "pop3", "LoadBalancer"],
    [995, "pop3", "LoadBalancer"],
    [8080, "admin-api", "ClusterIP"],
  ];
  for (const dir of kustomizations()) {
    const objects = render(dir);
    const services = ofKind(objects, "Service");
    for (const [port, role, type] of expected) {
      const service = services.find((s) => s.spec.ports.some((p: any) => p.port === port) && labelsMatch(s.spec.selector, find(objects, "Deployment", role)?.spec.template.metadata.labels));
      assert.ok(service, `${dir}: no Service exposes ${port} on ${role}`);
      assert.equal(service.spec.type ?? "ClusterIP", type, `${dir}: Service ${service.metadata.name} type`);
    }
  }
});

test("every Service selects exactly one workload and its targetPorts are that workload's container ports", () => {
  for (const dir of kustomizations()) {
    const objects = render(dir);
    const workloads = objects.filter((o) => o.kind === "Deployment" || o.kind === "StatefulSet");
    for (const service of ofKind(objects, "Service")) {
      const selected = workloads.filter((w) => labelsMatch(service.spec.selector, w.spec.template.metadata.labels));
      assert.equal(selected.length, 1, `${dir}: Service ${service.metadata.name} selects ${selected.length} workloads`);
      const ports = podSpec(selected[0]!).containers.flatMap((c: any) => c.ports ?? []);
      for (const servicePort of service.spec.ports) {
        const target = servicePort.targetPort ?? servicePort.port;
        const match = ports.find((p: any) => p.name === target || p.containerPort === target);
        assert.ok(match, `${dir}: Service ${service.metadata.name} port ${servicePort.port} targets ${target}, not a container port`);
      }
    }
  }
});

test("every referenced ConfigMap and Secret exists in the render, except the operator's own secrets", () => {
  for (const dir of kustomizations()) {
    const objects = render(dir);
    const names = (kind: string) => new Set(ofKind(objects, kind).map((o) => o.metadata.name));
    const configMaps = names("ConfigMap");
    const secrets = names("Secret");
    for (const workload of objects.filter((o) => podSpec(o))) {
      const spec = podSpec(workload);
      const where = `${dir}: ${workload.kind}/${workload.metadata.name}`;
      for (const container of spec.containers) {
        for (const source of container.envFrom ?? []) {
          if (source.configMapRef) assert.ok(configMaps.has(source.configMapRef.name), `${where}: ConfigMap ${source.configMapRef.name}`);
          if (source.secretRef) {
            const name = source.secretRef.name;
            assert.ok(secrets.has(name) || EXTERNAL_SECRETS.has(name), `${where}: Secret ${name}`);
          }
        }
      }
      for (const volume of spec.volumes ?? []) {
        if (volume.secret) assert.ok(secrets.has(volume.secret.secretName) || EXTERNAL_SECRETS.has(volume.secret.secretName), `${where}: Secret ${volume.secret.secretName}`);
        if (volume.configMap) assert.ok(configMaps.has(volume.configMap.name), `${where}: ConfigMap ${volume.configMap.name}`);
      }
    }
  }
});

test("a settings change rolls the pods: the ConfigMap name carries a content hash that every workload uses", () => {
  for (const dir of kustomizations()) {
    const objects = render(dir);
    const config = sharedConfig(objects);
    assert.match(config.metadata.name, /^mailstack-config-[a-z0-9]{10}$/, `${dir}: generated name`);
    for (const name of serviceNames()) {
      const container = podSpec(find(objects, "Deployment", name)!).containers[0];
      assert.ok(container.envFrom.some((s: any) => s.configMapRef?.name === config.metadata.name), `${dir}: ${name} uses ${config.metadata.name}`);
    }
  }
});

test("production overlays pin image tags (no :latest)", () => {
  for (const dir of overlays().filter((d) => d.includes("production"))) {
    for (const object of render(dir).filter((o) => podSpec(o))) {
      for (const container of podSpec(object).containers) {
        assert.doesNotMatch(container.image, /:latest$|^[^:]+$/, `${dir}: ${object.kind}/${object.metadata.name} uses ${container.image}`);
      }
    }
  }
});

test("everything lands in the mailstack namespace", () => {
  for (const dir of kustomizations()) {
    for (const object of render(dir)) {
      if (object.kind === "Namespace") assert.equal(object.metadata.name, "mailstack");
      else assert.equal(object.metadata.namespace, "mailstack", `${dir}: ${object.kind}/${object.metadata.name}`);
    }
  }
});

test("migrations run as a Job with the migrate CLI and the database secret", () => {
  for (const dir of kustomizations()) {
    const objects = render(dir);
    const jobs = ofKind(objects, "Job");
    assert.equal(jobs.length, 1, `${dir}: migration Job`);
    const container = podSpec(jobs[0]!).containers[0];
    const command = [...(container.command ?? []), ...(container.args ?? [])].join(" ");
    assert.match(command, /packages\/db\/src\/migrate-cli\.ts/, `${dir}: the Job runs migrate-cli.ts`);
    assert.equal(container.workingDir, "/app");
    assert.ok(container.envFrom?.some((s: any) => s.secretRef?.name?.startsWith("mailstack-secrets")), `${dir}: Job reads DATABASE_URL`);
    assert.match(container.image, /(^|\/)mailstack\/admin-api:/, `${dir}: the Job uses an image that ships packages/db`);
  }
});

test("the relay workers have exactly one autoscaler per overlay, and the KEDA trigger watches the real stream and consumer", () => {
  let sawKeda = false;
  let sawHpa = false;
  for (const dir of overlays()) {
    const objects = render(dir);
    const scaled = ofKind(objects, "ScaledObject");
    const hpas = ofKind(objects, "HorizontalPodAutoscaler");
    const targets = [...scaled, ...hpas].map((o) => o.spec.scaleTargetRef.name);
    assert.equal(new Set(targets).size, targets.length, `${dir}: two autoscalers target the same workload: ${targets}`);
    const deployment = find(objects, "Deployment", "mta-outbound")!;
    if (targets.includes("mta-outbound")) {
      assert.equal(deployment.spec.replicas, undefined, `${dir}: an autoscaled Deployment must not pin replicas`);
    }
    const config = sharedConfig(objects);
    const prefix: string = config.data.BUS_PREFIX ?? "";
    for (const object of scaled) {
      sawKeda = true;
      assert.equal(object.spec.scaleTargetRef.name, "mta-outbound");
      assert.ok(object.spec.minReplicaCount >= 1, `${dir}: relay workers never scale to zero (they run the deferred-mail scheduler)`);
      const trigger = object.spec.triggers.find((t: any) => t.type === "nats-jetstream");
      assert.ok(trigger, `${dir}: ScaledObject has a nats-jetstream trigger`);
      assert.equal(trigger.metadata.stream, prefix ? `${prefix}_${Streams.relay}` : Streams.relay, `${dir}: stream`);
      assert.equal(trigger.metadata.consumer, Consumers.relay, `${dir}: consumer`);
      assert.ok(Number(trigger.metadata.lagThreshold) > 0, `${dir}: lagThreshold`);
      // The monitoring endpoint must be the NATS server the services use.
      const natsHost = new URL(config.data.NATS_URL).hostname.split(".");
      const monitorHost = String(trigger.metadata.natsServerMonitoringEndpoint).split(":")[0]!.split(".");
      assert.equal(monitorHost[0], natsHost[0], `${dir}: NATS service name`);
      assert.equal(monitorHost[1], natsHost[1] ?? object.metadata.namespace, `${dir}: NATS namespace`);
      assert.ok(object.spec.triggers.some((t: any) => t.type === "cpu"), `${dir}: CPU trigger alongside the lag trigger`);
    }
    for (const object of scaled) {
      assert.ok(object.spec.minReplicaCount <= object.spec.maxReplicaCount, `${dir}: ScaledObject min <= max`);
    }
    for (const hpa of hpas) {
      sawHpa = true;
      assert.ok(hpa.spec.minReplicas <= hpa.spec.maxReplicas, `${dir}: HPA min <= max`);
      assert.equal(hpa.spec.scaleTargetRef.name, "mta-outbound");
      assert.ok(hpa.spec.metrics.some((m: any) => m.resource?.name === "cpu"), `${dir}: HPA on CPU`);
      assert.ok(hpa.spec.minReplicas >= 1);
    }
    if (scaled.length || hpas.length) {
      const container = podSpec(deployment).containers[0];
      assert.ok(container.resources.requests.cpu, `${dir}: CPU scaling needs a CPU request`);
    }
  }
  assert.ok(sawKeda, "some overlay uses the KEDA ScaledObject");
  assert.ok(sawHpa, "some overlay uses the CPU HorizontalPodAutoscaler fallback");
});

// Offline checks of what running the manifests needs beyond schema validity: memory limits the
// V8 heap fits in, startup probes that outlast a slow PostgreSQL and long migrations, and
// NetworkPolicies that keep LMTP and the admin API inside the namespace, a preStop long enough
// for a load balancer to stop sending, PostgreSQL connections for every pool, and memory
// requests that match the services' resident size, spreading over nodes and zones.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { find, kustomizations, ofKind, render, root, serviceNames, type K8sObject } from "./lib.ts";

function podSpec(object: K8sObject): any {
  return object.spec?.template?.spec;
}

function mebibytes(quantity: string): number {
  const match = /^(\d+)(Mi|Gi)$/.exec(quantity);
  assert.ok(match, `memory quantity ${quantity} (expected Mi or Gi)`);
  return Number(match[1]) * (match[2] === "Gi" ? 1024 : 1);
}

/** The mailstack containers of a render: the services and the migrations Job. */
function nodeContainers(objects: K8sObject[]): Array<{ where: string; container: any }> {
  return objects
    .filter((o) => podSpec(o))
    .flatMap((o) => [...(podSpec(o).initContainers ?? []), ...podSpec(o).containers].map((container: any) => ({ where: `${o.kind}/${o.metadata.name}`, container })))
    .filter(({ container }) => /(^|\/)mailstack\//.test(container.image));
}

const dockerfileNodeOptions = /NODE_OPTIONS=(\S+)/.exec(readFileSync(join(root, "Dockerfile"), "utf8"))?.[1];

test("every node container caps the V8 heap below its memory limit, so V8 collects before the OOM killer strikes", () => {
  // Without --max-old-space-size V8 sizes its heap from the node's memory (GBs), far above a
  // 512Mi limit: the container is OOM-killed mid-transaction instead of collecting garbage.
  assert.ok(dockerfileNodeOptions, "Dockerfile sets NODE_OPTIONS");
  for (const dir of kustomizations()) {
    const found = nodeContainers(render(dir));
    assert.ok(found.length >= serviceNames().length + 1, `${dir}: services and migrations Job`);
    for (const { where, container } of found) {
      const options: string = container.env?.find((e: any) => e.name === "NODE_OPTIONS")?.value ?? dockerfileNodeOptions;
      const heap = /--max-old-space-size=(\d+)/.exec(options)?.[1];
      assert.ok(heap, `${dir}: ${where} NODE_OPTIONS "${options}" sets no --max-old-space-size`);
      const limit = mebibytes(container.resources.limits.memory);
      // Young generation, code, buffers and native memory live outside the old space.
      assert.ok(Number(heap) <= limit * 0.8, `${dir}: ${where} heap ${heap}MiB leaves too little of the ${limit}Mi limit`);
      assert.ok(Number(heap) >= 64, `${dir}: ${where} heap ${heap}MiB is too small to work`);
      // Setting NODE_OPTIONS replaces the image's value: keep its flags.
      for (const flag of dockerfileNodeOptions.split(/\s+/)) {
        assert.ok(options.split(/\s+/).includes(flag), `${dir}: ${where} NODE_OPTIONS drops the image's ${flag}`);
      }
      assert.ok(mebibytes(container.resources.requests.memory) <= limit, `${dir}: ${where} request <= limit`);
    }
  }
});

test("the startup probe allows a start as long as the migrations Job may take", () => {
  // The ops port opens only after the PostgreSQL retries and the migrations (packages/runtime):
  // a startup probe shorter than a migration kills the pod mid-migration, again and again.
  for (const dir of kustomizations()) {
    const objects = render(dir);
    const job = ofKind(objects, "Job").find((j) => j.metadata.name === "mailstack-migrate")!;
    const deadline: number = job.spec.activeDeadlineSeconds;
    assert.ok(deadline > 0, `${dir}: the migrations Job has a deadline`);
    // The services' own PostgreSQL retry: 30 attempts, 5 s connect timeout each, ~85 s backoff.
    const retryBudget = 30 * 5 + 85;
    for (const name of serviceNames()) {
      const container = podSpec(find(objects, "Deployment", name)!).containers[0];
      const probe = container.startupProbe;
      assert.ok(probe, `${dir}: ${name} startup probe`);
      const budget = (probe.initialDelaySeconds ?? 0) + (probe.periodSeconds ?? 10) * (probe.failureThreshold ?? 3);
      assert.ok(budget >= deadline, `${dir}: ${name} startup budget ${budget}s < migrations deadline ${deadline}s`);
      assert.ok(budget >= retryBudget, `${dir}: ${name} startup budget ${budget}s < PostgreSQL retry ${retryBudget}s`);
    }
  }
});

function selects(policy: K8sObject, labels: Record<string, string>): boolean {
  return Object.entries(policy.spec.podSelector.matchLabels ?? {}).every(([k, v]) => labels[k] === v);
}

/** Whether a peer outside the namespace may reach `port` (name or number) of the pods. */
function reachableFromOutside(objects: K8sObject[], deployment: K8sObject, port: { name: string; containerPort: number }): boolean {
  const labels = deployment.spec.template.metadata.labels;
  const policies = ofKind(objects, "NetworkPolicy").filter(
    (p) => selects(p, labels) && (p.spec.policyTypes ?? ["Ingress"]).includes("Ingress"),
  );
  if (policies.length === 0) return true; // not isolated
  return policies.some((policy) =>
    (policy.spec.ingress ?? []).some((rule: any) => {
      const portMatches = !rule.ports || rule.ports.some((p: any) => p.port === undefined || p.port === port.name || p.port === port.containerPort);
      // A rule without `from`, or with a namespaceSelector / ipBlock peer, admits other namespaces.
      const outsiders = !rule.from || rule.from.some((peer: any) => peer.namespaceSelector || peer.ipBlock);
      return portMatches && outsiders;
    }),
  );
}

test("LMTP and the admin API are not reachable from outside the namespace; the ops port stays scrapeable", () => {
  for (const dir of kustomizations()) {
    const objects = render(dir);
    for (const [name, portName] of [["mda", "lmtp"], ["admin-api", "http"]] as const) {
      const deployment = find(objects, "Deployment", name)!;
      const ports = podSpec(deployment).containers[0].ports;
      const port = ports.find((p: any) => p.name === portName);
      assert.ok(port, `${dir}: ${name} port ${portName}`);
      assert.equal(reachableFromOutside(objects, deployment, port), false, `${dir}: ${name} ${portName} is reachable from other namespaces`);
      const ops = ports.find((p: any) => p.name === "ops");
      assert.equal(reachableFromOutside(objects, deployment, ops), true, `${dir}: ${name} ops port must stay open to Prometheus`);
    }
    // The public roles keep taking connections from anywhere.
    for (const name of ["mta-inbound", "msa", "pop3"]) {
      const deployment = find(objects, "Deployment", name)!;
      for (const port of podSpec(deployment).containers[0].ports) {
        assert.equal(reachableFromOutside(objects, deployment, port), true, `${dir}: ${name} ${port.name} must stay public`);
      }
    }
  }
});

// A cloud load balancer in front of an externalTrafficPolicy: Local Service learns that a node
// has no pod left from the node's health check port, typically after 2 or 3 failed checks 5 to
// 10 s apart. Until then it sends new connections there; the pod must still be listening.
const LOAD_BALANCER_DETECTION_SECONDS = 20;

test("pods behind a Local LoadBalancer keep serving (preStop) until the load balancer has stopped sending", () => {
  for (const dir of kustomizations()) {
    const objects = render(dir);
    const local = ofKind(objects, "Service").filter((s) => s.spec.type === "LoadBalancer" && s.spec.externalTrafficPolicy === "Local");
    assert.ok(local.length >= 3, `${dir}: the SMTP and POP3 Services`);
    for (const service of local) {
      const deployment = ofKind(objects, "Deployment").find((d) => selectsLabels(service.spec.selector, d.spec.template.metadata.labels))!;
      assert.ok(deployment, `${dir}: Service ${service.metadata.name} selects a Deployment`);
      const command = podSpec(deployment).containers[0].lifecycle?.preStop?.exec?.command ?? [];
      const sleep = command[0] === "sleep" ? Number(command[1]) : 0;
      assert.ok(
        sleep >= LOAD_BALANCER_DETECTION_SECONDS,
        `${dir}: ${deployment.metadata.name} preStop sleeps ${sleep}s, under the load balancer's ${LOAD_BALANCER_DETECTION_SECONDS}s to notice`,
      );
    }
  }
});

function selectsLabels(selector: Record<string, string>, labels: Record<string, string> = {}): boolean {
  return Object.entries(selector).every(([key, value]) => labels[key] === value);
}

/** Roles holding one PostgreSQL connection beyond their pool, for LISTEN (README.md, DATABASE_POOL_SIZE). */
const LISTENING_ROLES = new Set(["mta-inbound", "msa"]);

/** PostgreSQL connections a render can open at once: every pool full, at the autoscaler's maximum, during a rollout. */
function peakConnections(objects: K8sObject[]): number {
  const config = objects.find((o) => o.kind === "ConfigMap" && o.metadata.name.startsWith("mailstack-config-"))!;
  const autoscaled = new Map<string, number>();
  for (const o of ofKind(objects, "ScaledObject")) autoscaled.set(o.spec.scaleTargetRef.name, o.spec.maxReplicaCount);
  for (const o of ofKind(objects, "HorizontalPodAutoscaler")) autoscaled.set(o.spec.scaleTargetRef.name, o.spec.maxReplicas);
  let total = 1; // the migrations Job
  for (const name of serviceNames()) {
    const deployment = find(objects, "Deployment", name)!;
    const container = podSpec(deployment).containers[0];
    const pool = Number(container.env?.find((e: any) => e.name === "DATABASE_POOL_SIZE")?.value ?? config.data.DATABASE_POOL_SIZE ?? 10);
    const replicas = autoscaled.get(name) ?? deployment.spec.replicas ?? 1;
    const surge = Number(deployment.spec.strategy?.rollingUpdate?.maxSurge ?? 1);
    total += (replicas + surge) * (pool + (LISTENING_ROLES.has(name) ? 1 : 0));
  }
  return total;
}

test("PostgreSQL's max_connections covers every pool: the dev overlay's server, and the figure docs/deploy.md and README.md give", () => {
  const dev = render("deploy/overlays/dev");
  const postgres = find(dev, "StatefulSet", "postgres")!;
  const args: string[] = podSpec(postgres).containers[0].args ?? [];
  const setting = args.map((a) => /^max_connections=(\d+)$/.exec(a)?.[1]).find(Boolean);
  const maxConnections = Number(setting ?? 100); // PostgreSQL's default
  assert.ok(maxConnections >= peakConnections(dev), `dev PostgreSQL max_connections ${maxConnections} < ${peakConnections(dev)} connections the pools may open`);

  for (const doc of ["docs/deploy.md", "README.md"]) {
    const text = readFileSync(join(root, doc), "utf8").replace(/\s+/g, " ");
    const stated = /`max_connections` of at least (\d+)/.exec(text)?.[1];
    for (const dir of ["deploy/overlays/production", "deploy/overlays/production-hpa"]) {
      const peak = peakConnections(render(dir));
      assert.equal(Number(stated), peak, `${dir}: ${doc} states max_connections ${stated}, the manifests can open ${peak}`);
    }
  }
});

test("memory requests cover what a service keeps resident under load, so the scheduler does not overpack nodes", () => {
  // A pod above its request is the kubelet's first eviction candidate under node memory pressure.
  const readme = readFileSync(join(root, "README.md"), "utf8");
  const range = /around (\d+)-(\d+) MB resident under load/.exec(readme);
  assert.ok(range, "README.md states the services' resident memory under load");
  const residentMiB = (Number(range[2]) * 1e6) / 2 ** 20;
  for (const dir of kustomizations()) {
    const objects = render(dir);
    for (const name of serviceNames()) {
      const container = podSpec(find(objects, "Deployment", name)!).containers[0];
      const request = mebibytes(container.resources.requests.memory);
      assert.ok(request >= residentMiB, `${dir}: ${name} requests ${request}Mi, under the ${Math.ceil(residentMiB)}Mi it keeps resident under load`);
    }
  }
});

test("every role spreads its pods over nodes and zones, so one node or zone outage leaves it running", () => {
  for (const dir of kustomizations()) {
    const objects = render(dir);
    for (const name of serviceNames()) {
      const deployment = find(objects, "Deployment", name)!;
      const labels = deployment.spec.template.metadata.labels;
      const constraints: any[] = podSpec(deployment).topologySpreadConstraints ?? [];
      for (const key of ["kubernetes.io/hostname", "topology.kubernetes.io/zone"]) {
        const constraint = constraints.find((c) => c.topologyKey === key);
        assert.ok(constraint, `${dir}: ${name} spreads over ${key}`);
        assert.ok(selectsLabels(constraint.labelSelector.matchLabels, labels), `${dir}: ${name} ${key} constraint selects its own pods`);
        // DoNotSchedule would leave pods Pending in a single-zone cluster or on a full node.
        assert.equal(constraint.whenUnsatisfiable, "ScheduleAnyway", `${dir}: ${name} ${key}`);
      }
    }
  }
});

// The monitoring component (deploy/components/monitoring): its objects validate against the
// Prometheus Operator's schemas, its rules pass promtool's check and unit tests, and every
// metric they name is one the services export.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { copyFileSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, relative } from "node:path";
import { stringify } from "yaml";
import { PodMonitor, PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";
import { find, parseYamlDocuments, root, type K8sObject } from "./lib.ts";

const component = join(root, "deploy", "components", "monitoring");

/** The production overlay with the monitoring component added (as an operator adds it to theirs), rendered offline. */
function renderWithMonitoring(): K8sObject[] {
  // Outside deploy/overlays, so the other deploy tests never see it as an overlay of ours.
  const dir = mkdtempSync(join(tmpdir(), "mailstack-monitoring-"));
  try {
    writeFileSync(
      join(dir, "kustomization.yaml"),
      stringify({
        apiVersion: "kustomize.config.k8s.io/v1beta1",
        kind: "Kustomization",
        namespace: "mailstack",
        // kustomize takes relative paths only (they may leave the kustomization's folder).
        resources: [relative(dir, join(root, "deploy", "overlays", "production"))],
        components: [relative(dir, component)],
      }),
    );
    const output = execFileSync("kubectl", ["kustomize", dir], { encoding: "utf8", maxBuffer: 32 * 1024 * 1024 });
    return parseYamlDocuments(output, "production + monitoring") as K8sObject[];
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

function promtool(args: string[], cwd: string): string {
  try {
    return execFileSync("promtool", args, { cwd, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
  } catch (error) {
    const { code, stdout, stderr } = error as { code?: string; stdout?: string; stderr?: string };
    if (code === "ENOENT") throw new Error("promtool is not installed (apt-get install -y prometheus; scripts/ensure-test-peers.sh does it)");
    throw new Error(`promtool ${args.join(" ")} failed:\n${stdout ?? ""}${stderr ?? ""}`);
  }
}

test("the PodMonitor and PrometheusRule validate and select mailstack's pods by their ops port", () => {
  const objects = renderWithMonitoring();
  const monitor = find(objects, "PodMonitor", "mailstack");
  const rule = find(objects, "PrometheusRule", "mailstack");
  assert.ok(monitor && rule, "both objects rendered");
  new PodMonitor(monitor as never).validate();
  new PrometheusRule(rule as never).validate();
  assert.equal(monitor.metadata.namespace, "mailstack");

  const selector: Record<string, string> = monitor.spec.selector.matchLabels;
  const port = monitor.spec.podMetricsEndpoints[0].port;
  const deployments = objects.filter((o) => o.kind === "Deployment");
  assert.ok(deployments.length >= 6);
  for (const deployment of deployments) {
    const labels = deployment.spec.template.metadata.labels as Record<string, string>;
    for (const [key, value] of Object.entries(selector)) assert.equal(labels[key], value, `${deployment.metadata.name} is selected`);
    const ports = deployment.spec.template.spec.containers.flatMap((c: { ports?: { name: string }[] }) => c.ports ?? []);
    assert.ok(ports.some((p: { name: string }) => p.name === port), `${deployment.metadata.name} names its metrics port "${port}"`);
  }
});

test("the alerting rules pass promtool check and their unit tests", () => {
  const rule = readFileSync(join(component, "prometheusrule.yaml"), "utf8");
  const { spec } = renderWithMonitoring().find((o) => o.kind === "PrometheusRule")!;
  assert.ok(rule.includes("kind: PrometheusRule"));
  const dir = mkdtempSync(join(tmpdir(), "mailstack-rules-"));
  try {
    writeFileSync(join(dir, "rules.yaml"), stringify({ groups: spec.groups }));
    copyFileSync(join(component, "rules.test.yaml"), join(dir, "rules.test.yaml"));
    assert.match(promtool(["check", "rules", "rules.yaml"], dir), /SUCCESS: \d+ rules found/);
    assert.match(promtool(["test", "rules", "rules.test.yaml"], dir), /SUCCESS/);
    // Every alert has a unit test.
    const tested = new Set([...readFileSync(join(component, "rules.test.yaml"), "utf8").matchAll(/alertname: (\w+)/g)].map((m) => m[1]));
    for (const group of spec.groups) for (const r of group.rules) assert.ok(tested.has(r.alert), `${r.alert} has a promtool unit test`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

/** Metric names registered in the sources (prom-client's `name: "..."` next to `help:`). */
function exportedMetrics(): Set<string> {
  const names = new Set<string>();
  const walk = (dir: string) => {
    for (const entry of readdirSync(dir, { withFileTypes: true })) {
      if (entry.name === "node_modules" || entry.name === "test") continue;
      const path = join(dir, entry.name);
      if (entry.isDirectory()) walk(path);
      else if (entry.name.endsWith(".ts")) {
        for (const m of readFileSync(path, "utf8").matchAll(/name: "([a-z_:][a-z0-9_:]*)",\s*\n?\s*help:/g)) names.add(m[1]!);
      }
    }
  };
  walk(join(root, "packages"));
  walk(join(root, "services"));
  return names;
}

test("every metric an alert uses is exported by a service", () => {
  const { spec } = renderWithMonitoring().find((o) => o.kind === "PrometheusRule")!;
  const exported = exportedMetrics();
  assert.ok(exported.has("mail_queue_depth") && exported.has("tls_certificate_expiry_timestamp_seconds"), "the scan finds metric definitions");
  const functions = new Set(["sum", "max", "min", "rate", "absent", "by", "and", "time", "up"]);
  for (const group of spec.groups) {
    for (const r of group.rules) {
      const withoutStrings = String(r.expr).replace(/"[^"]*"/g, '""').replace(/\{[^}]*\}/g, "").replace(/\[[^\]]*\]/g, "");
      const identifiers = withoutStrings.match(/[a-z_][a-z0-9_]*/g) ?? [];
      const metrics = identifiers.filter((id) => !functions.has(id) && id.includes("_"));
      assert.ok(metrics.length > 0 || /\bup\b/.test(r.expr), `${r.alert} names a metric`);
      for (const metric of metrics) assert.ok(exported.has(metric), `${r.alert}: ${metric} is exported by a service`);
    }
  }
});

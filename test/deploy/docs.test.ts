// docs/deploy.md stays in step with the files it sends operators to.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync, lstatSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { loadTlsCredentials } from "@mailstack/runtime";
import { overlays, readYaml, root } from "./lib.ts";

const doc = readFileSync(join(root, "docs/deploy.md"), "utf8");

test("every repository path docs/deploy.md names exists", () => {
  const paths = new Set(
    [...doc.matchAll(/`((?:deploy|test\/deploy|packages|services|docs)\/[A-Za-z0-9_./*-]+|Dockerfile|docker-compose\.yml|\.dockerignore)`/g)]
      .map((match) => match[1]!.replace(/\/$/, ""))
      .filter((path) => !path.includes("*")),
  );
  assert.ok(paths.size > 10, `found only ${paths.size} paths`);
  const missing = [...paths].filter((path) => !existsSync(join(root, path)));
  assert.deepEqual(missing, []);
});

test("docs/deploy.md describes every overlay", () => {
  for (const overlay of overlays()) {
    assert.ok(doc.includes(overlay.replace("deploy/", "")), `${overlay} is not mentioned`);
  }
});

test("the migrate CLI the Job and compose run exists", () => {
  assert.ok(existsSync(join(root, "packages/db/src/migrate-cli.ts")));
});

test("the image names README.md tells operators to build are the ones the production overlays deploy", () => {
  const readme = readFileSync(join(root, "README.md"), "utf8");
  const tags = [...readme.matchAll(/docker build --build-arg SERVICE=<name> -t (\S+) \./g)].map((match) => match[1]!);
  assert.ok(tags.length > 0, "README.md shows the docker build command");
  for (const overlay of overlays().filter((dir) => dir.includes("production"))) {
    const images = readYaml(`${overlay}/kustomization.yaml`).images as Array<{ name: string; newName: string; newTag: string }>;
    for (const image of images) {
      const name = image.name.replace(/^mailstack\//, "");
      const registry = image.newName.slice(0, image.newName.indexOf("/"));
      for (const tag of tags) {
        const built = tag.replace("<registry>", registry).replaceAll("<name>", name).replace(/:<tag>$/, "");
        assert.equal(built, image.newName, `${overlay}: README builds ${built}, the overlay deploys ${image.newName}`);
      }
    }
  }
});

test("the certbot deploy hook of the compose TLS example copies a live/ pair (symbolic links into archive/) the services load", async () => {
  const hook = /```sh\n(  #!\/bin\/sh\n[\s\S]*?)  ```/.exec(doc.slice(doc.indexOf("renewal-hooks/deploy/mailstack")))?.[1];
  assert.ok(hook, "docs/deploy.md shows the deploy hook");
  const dir = mkdtempSync(join(tmpdir(), "certbot-"));
  try {
    // certbot's layout: live/NAME/*.pem are relative links to archive/NAME/*N.pem.
    const pair = await loadTlsCredentials({ dir: join(dir, "generated"), hostname: "mail.example.com" });
    mkdirSync(join(dir, "archive/mail.example.com"), { recursive: true });
    mkdirSync(join(dir, "live/mail.example.com"), { recursive: true });
    writeFileSync(join(dir, "archive/mail.example.com/fullchain1.pem"), pair.cert);
    writeFileSync(join(dir, "archive/mail.example.com/privkey1.pem"), pair.key, { mode: 0o600 });
    symlinkSync("../../archive/mail.example.com/fullchain1.pem", join(dir, "live/mail.example.com/fullchain.pem"));
    symlinkSync("../../archive/mail.example.com/privkey1.pem", join(dir, "live/mail.example.com/privkey.pem"));
    const target = join(dir, "mailstack-tls");
    let script = hook.replace(/^  /gm, "").replaceAll("/etc/mailstack/tls", target);
    if (process.getuid?.() !== 0) script = script.replaceAll("-o 1000 ", "");
    const result = spawnSync("sh", ["-c", script], { encoding: "utf8", env: { ...process.env, RENEWED_LINEAGE: join(dir, "live/mail.example.com") } });
    assert.equal(result.status, 0, result.stderr);
    const loaded = await loadTlsCredentials({ certFile: join(target, "fullchain.pem"), keyFile: join(target, "privkey.pem") });
    assert.equal(loaded.cert, pair.cert);
    assert.equal(lstatSync(join(target, "privkey.pem")).mode & 0o777, 0o600, "the key stays private");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("the Kubernetes guide tells how relayed mail passes SPF: the relay's egress address is not a Service's", () => {
  // The proposed SPF record (packages/admin-ops) authorizes only the MX; pods leave through the
  // node's or a NAT gateway's address, so the guide must say to fix and authorize that address.
  const spf = /value: "(v=spf1[^"]*)"/.exec(readFileSync(join(root, "packages/admin-ops/src/dns.ts"), "utf8"))?.[1];
  assert.ok(spf, "packages/admin-ops/src/dns.ts proposes an SPF record");
  const guide = readFileSync(join(root, "docs/deploy.md"), "utf8");
  if (/^v=spf1 (mx )?-all$/.test(spf)) {
    assert.ok(guide.includes(`\`${spf}\``), "docs/deploy.md quotes the SPF record the admin API proposes");
    assert.match(guide, /egress/, "docs/deploy.md explains the relay workers' egress address");
    assert.match(guide, /`ip4:<egress address>`/, "docs/deploy.md says to authorize the egress address in SPF");
  }
});

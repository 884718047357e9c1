// docs/deploy.md stays in step with the files it sends operators to.
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
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

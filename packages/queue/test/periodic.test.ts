import { test } from "node:test";
import assert from "node:assert/strict";
import { runEvery } from "../src/periodic.ts";

test("runEvery never overlaps runs, and stop() waits for the run in progress", async () => {
  let active = 0;
  let maxActive = 0;
  let runs = 0;
  let finished = 0;
  const loop = runEvery(10, async () => {
    runs++;
    active++;
    maxActive = Math.max(maxActive, active);
    await new Promise((resolve) => setTimeout(resolve, 60));
    active--;
    finished++;
  });
  await new Promise((resolve) => setTimeout(resolve, 250));
  await loop.stop();
  assert.equal(maxActive, 1, "a tick during a run is skipped");
  assert.ok(runs >= 2 && runs <= 5, `runs: ${runs}`);
  assert.equal(finished, runs, "stop() returned only after the last run finished");
  const after = runs;
  await new Promise((resolve) => setTimeout(resolve, 50));
  assert.equal(runs, after, "nothing runs after stop()");
});

test("a task that rejects does not stop the loop", async () => {
  let runs = 0;
  const loop = runEvery(10, async () => {
    runs++;
    throw new Error("boom");
  });
  await new Promise((resolve) => setTimeout(resolve, 80));
  await loop.stop();
  assert.ok(runs >= 2, `runs: ${runs}`);
});

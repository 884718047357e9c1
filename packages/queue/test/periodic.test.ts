import { test } from "node:test";
import assert from "node:assert/strict";
import { runEvery } from "../src/periodic.ts";

test("runEvery never overlaps runs, and stop() waits for the run in progress", async () => {
  let active = 0;
  let maxActive = 0;
  let runs = 0;
  let finished = 0;
  const started = performance.now();
  const loop = runEvery(10, async () => {
    runs++;
    active++;
    maxActive = Math.max(maxActive, active);
    await new Promise((resolve) => setTimeout(resolve, 60));
    active--;
    finished++;
  });
  // Until a few runs happened, however slowly this machine's event loop goes (no fixed sleep).
  while (runs < 3 && performance.now() - started < 10_000) await new Promise((resolve) => setTimeout(resolve, 5));
  await loop.stop();
  const elapsed = performance.now() - started;
  assert.ok(runs >= 3, `runs: ${runs}`);
  assert.equal(maxActive, 1, "a tick during a run is skipped");
  // Skipped, not queued: each run takes at least 60 ms, so there were no more than that allows.
  assert.ok(runs <= Math.ceil(elapsed / 60), `runs: ${runs} in ${elapsed.toFixed(0)} ms`);
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
  const started = performance.now();
  while (runs < 2 && performance.now() - started < 10_000) await new Promise((resolve) => setTimeout(resolve, 5));
  await loop.stop();
  assert.ok(runs >= 2, `runs: ${runs}`);
});

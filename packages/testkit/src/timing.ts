import assert from "node:assert/strict";

/**
 * Checks that a failed login does not tell whether the account exists: each kind of failure is
 * timed three times, interleaved, and the medians for an unknown and for a disabled account must
 * be more than a third of a wrong password's. The password hash dominates a failure (tens of
 * milliseconds); a server that skips it for a missing account answers in about one.
 */
export async function assertNoLoginTimingOracle(fail: { known: () => Promise<number>; unknown: (i: number) => Promise<number>; disabled: () => Promise<number> }): Promise<void> {
  const median = (values: number[]) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]!;
  const samples = { known: [] as number[], unknown: [] as number[], disabled: [] as number[] };
  for (let i = 0; i < 3; i++) {
    samples.known.push(await fail.known());
    samples.unknown.push(await fail.unknown(i));
    samples.disabled.push(await fail.disabled());
  }
  const knownMs = median(samples.known);
  for (const kind of ["unknown", "disabled"] as const) {
    assert.ok(median(samples[kind]) > knownMs / 3, `${kind}: ${median(samples[kind]).toFixed(1)} ms vs ${knownMs.toFixed(1)} ms for a wrong password`);
  }
}

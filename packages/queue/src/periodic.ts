/**
 * Runs a background task every intervalMs until stopped. A tick that comes while the previous
 * run is still going is skipped, so runs never overlap; stop() waits for the one in progress.
 * The task reports its own errors (a rejection is ignored here).
 */
export function runEvery(intervalMs: number, task: () => Promise<unknown>): { stop(): Promise<void> } {
  let running: Promise<unknown> | null = null;
  const timer = setInterval(() => {
    if (running) return;
    running = task()
      .catch(() => undefined)
      .finally(() => {
        running = null;
      });
  }, intervalMs);
  timer.unref();
  return {
    async stop() {
      clearInterval(timer);
      await running;
    },
  };
}

// Container health check: GET /readyz on the service's ops port. Exit 0 when ready.
// OPS_PORT wins; otherwise the service's default (kept equal to opsPortDefault in
// services/<name>/src/service.ts, checked by test/deploy).
const defaults = {
  "msa": 9587,
  "mta-inbound": 9025,
  "mta-outbound": 9026,
  "mda": 9024,
  "pop3": 9110,
  "admin-api": 9080,
};
const port = Number(process.env.OPS_PORT || defaults[process.env.SERVICE ?? ""]);
const path = process.argv[2] || "/readyz";
if (!port) {
  console.error("healthcheck: set OPS_PORT or SERVICE");
  process.exit(2);
}
try {
  const response = await fetch(`http://127.0.0.1:${port}${path}`, { signal: AbortSignal.timeout(4000) });
  process.exit(response.ok ? 0 : 1);
} catch (error) {
  console.error(`healthcheck: ${error.message}`);
  process.exit(1);
}

import { loadTlsCredentials, runService } from "@mailstack/runtime";
import { msaShape, settingsFromConfig } from "./config.ts";
import { startMsa } from "./server.ts";

export async function main(): Promise<void> {
  await runService({
    name: "msa",
    opsPortVariable: "OPS_PORT",
    opsPortDefault: 9587,
    shape: msaShape,
    async start({ config, pool, bus, logger }) {
      const tls = await loadTlsCredentials({
        certFile: config.TLS_CERT_FILE,
        keyFile: config.TLS_KEY_FILE,
        dir: config.TLS_DIR,
        hostname: config.MAIL_HOSTNAME,
      });
      if (tls.selfSigned) logger.warn({ source: tls.source }, "using a self-signed TLS certificate; set TLS_CERT_FILE and TLS_KEY_FILE");
      const msa = await startMsa({ pool, bus, logger, settings: settingsFromConfig(config), tls: { key: tls.key, cert: tls.cert } });
      return { stop: () => msa.stop() };
    },
  });
}

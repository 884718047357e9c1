import { runService, startTlsSource, tlsSourceOptions } from "@mailstack/runtime";
import { msaShape, settingsFromConfig } from "./config.ts";
import { startMsa } from "./server.ts";

export async function main(): Promise<void> {
  await runService({
    name: "msa",
    opsPortVariable: "OPS_PORT",
    opsPortDefault: 9587,
    shape: msaShape,
    async start({ config, pool, bus, logger }) {
      const tlsSource = await startTlsSource(tlsSourceOptions(config, logger));
      const tls = tlsSource.current();
      if (tls.selfSigned) logger.warn({ source: tls.source }, "using a self-signed TLS certificate; set TLS_CERT_FILE and TLS_KEY_FILE");
      const msa = await startMsa({ pool, bus, logger, settings: settingsFromConfig(config), tls: { key: tls.key, cert: tls.cert } });
      tlsSource.onChange((next) => msa.updateTls({ key: next.key, cert: next.cert }));
      return {
        async stop() {
          tlsSource.stop();
          await msa.stop();
        },
      };
    },
  });
}

import { Gauge, registry, type Logger } from "@mailstack/telemetry";
import { loadTlsCredentials, readTlsFiles, tlsCredentialsFrom, validityProblem, type TlsCredentials, type TlsOptions } from "./tls.ts";

// Registered by the first server that serves TLS, so processes without TLS export no misleading 0.
let certificateExpiry: Gauge | undefined;

/** The certificate a server presents now; replaced in place when the operator's files change. */
export interface TlsSource {
  current(): TlsCredentials;
  /** Called with each new pair after it was read and checked; servers swap their contexts in it. */
  onChange(listener: (credentials: TlsCredentials) => void): void;
  /** Reads the files again now (also done on SIGHUP and every interval); resolves true when the pair changed. */
  reload(): Promise<boolean>;
  stop(): void;
}

export interface TlsSourceOptions extends TlsOptions {
  /** How often TLS_CERT_FILE and TLS_KEY_FILE are read again; 0 turns polling off (SIGHUP still works). */
  reloadIntervalMs?: number;
  logger?: Logger;
}

/** The settings of tlsShape (and MAIL_HOSTNAME, the generated certificate's name) as startTlsSource's options. */
export function tlsSourceOptions(
  config: { TLS_CERT_FILE?: string | undefined; TLS_KEY_FILE?: string | undefined; TLS_DIR: string; TLS_RELOAD_INTERVAL: number; MAIL_HOSTNAME: string },
  logger: Logger,
): TlsSourceOptions {
  return {
    certFile: config.TLS_CERT_FILE,
    keyFile: config.TLS_KEY_FILE,
    dir: config.TLS_DIR,
    hostname: config.MAIL_HOSTNAME,
    reloadIntervalMs: config.TLS_RELOAD_INTERVAL,
    logger,
  };
}

/**
 * Loads the credentials like loadTlsCredentials and keeps them current: a renewed certificate
 * (cert-manager rewriting a mounted Secret, certbot's deploy hook sending SIGHUP) is served to
 * every new connection without a restart. A pair that does not load yet (the key written
 * before its certificate, say) is skipped and the files are read again at the next check;
 * the certificate in use stays until a good pair replaces it.
 */
export async function startTlsSource(options: TlsSourceOptions): Promise<TlsSource> {
  let credentials = await loadTlsCredentials(options);
  certificateExpiry ??= new Gauge({
    name: "tls_certificate_expiry_timestamp_seconds",
    help: "When the certificate this process serves expires (Unix time); alert well before it",
    registers: [registry],
  });
  certificateExpiry.set(credentials.validTo.getTime() / 1000);
  const { certFile, keyFile, logger } = options;
  // Served all the same (senders' opportunistic STARTTLS mostly does not verify, and refusing to
  // start would stop mail), but said loudly: clients that verify will refuse it.
  const warnIfInvalid = (loaded: TlsCredentials) => {
    const problem = validityProblem(loaded);
    if (problem) logger?.warn({ source: loaded.source, validFrom: loaded.validFrom, validTo: loaded.validTo }, `TLS certificate ${problem}; clients that check certificates will refuse it`);
  };
  warnIfInvalid(credentials);
  const listeners: Array<(credentials: TlsCredentials) => void> = [];
  let lastFailure = "";
  let checking: Promise<boolean> | null = null;

  const check = async (): Promise<boolean> => {
    if (!certFile || !keyFile) return false;
    let next: TlsCredentials;
    try {
      const { cert, key } = await readTlsFiles(certFile, keyFile);
      if (cert === credentials.cert && key === credentials.key) return false;
      next = tlsCredentialsFrom(key, cert, certFile, keyFile);
    } catch (error) {
      const message = (error as Error).message;
      if (message !== lastFailure) logger?.warn({ err: message, certFile, keyFile }, "TLS files changed but do not load; still serving the previous certificate");
      lastFailure = message;
      return false;
    }
    lastFailure = "";
    credentials = next;
    certificateExpiry?.set(next.validTo.getTime() / 1000);
    logger?.info({ source: certFile, validTo: next.validTo }, "TLS certificate reloaded");
    warnIfInvalid(next);
    for (const listener of listeners) listener(next);
    return true;
  };
  const reload = (): Promise<boolean> => {
    checking ??= check().finally(() => (checking = null));
    return checking;
  };

  const onSighup = () => void reload();
  const interval = options.reloadIntervalMs ?? 0;
  const timer = certFile && interval > 0 ? setInterval(onSighup, interval) : null;
  timer?.unref();
  if (certFile) process.on("SIGHUP", onSighup);

  return {
    current: () => credentials,
    onChange: (listener) => void listeners.push(listener),
    reload,
    stop() {
      if (timer) clearInterval(timer);
      process.off("SIGHUP", onSighup);
    },
  };
}

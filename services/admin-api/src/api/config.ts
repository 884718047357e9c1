import { bool, duration, port, size, z } from "@mailstack/config";

/** The admin API's settings (on top of commonShape). */
export const apiShape = {
  API_PORT: port(8080),
  API_HOST: z.string().default("0.0.0.0"),
  /** Largest JSON request body. Imports stream and are bounded per message instead. */
  API_BODY_LIMIT: size("1M"),
  /** Largest single message accepted by a mailbox import. */
  API_IMPORT_MAX_MESSAGE_SIZE: size("50M"),
  /** A connection on which no byte moves either way for this long is closed (a stalled or slowloris client). */
  API_IDLE_TIMEOUT: duration("2m"),
  /** Serve the OpenAPI document and Swagger UI at /docs without a token (they describe routes, not data). */
  API_DOCS_PUBLIC: bool(true),
  /** Base URL of Jaeger's UI; journeys link to `${JAEGER_UI_URL}/trace/<trace id>`. */
  JAEGER_UI_URL: z.string().url().default("http://localhost:16686"),
  /** The DMARC policy suggested in a domain's DNS records. */
  DMARC_POLICY: z.enum(["none", "quarantine", "reject"]).default("quarantine"),
  /** Finished messages in no mailbox are deleted, with their journey, this long after they arrived. */
  MESSAGE_RETENTION: duration("30d"),
  /** How often the purge of finished messages runs. */
  RETENTION_INTERVAL: duration("1h"),
};

export interface ApiConfig {
  API_PORT: number;
  API_HOST: string;
  API_BODY_LIMIT: number;
  API_IMPORT_MAX_MESSAGE_SIZE: number;
  API_IDLE_TIMEOUT: number;
  API_DOCS_PUBLIC: boolean;
  JAEGER_UI_URL: string;
  DMARC_POLICY: "none" | "quarantine" | "reject";
  MAIL_HOSTNAME: string;
}

/** Defaults for every setting, for tests and embedders that pass only what they change. */
export function apiConfig(overrides: Partial<ApiConfig> = {}): ApiConfig {
  return {
    API_PORT: 0,
    API_HOST: "127.0.0.1",
    API_BODY_LIMIT: 1024 * 1024,
    API_IMPORT_MAX_MESSAGE_SIZE: 50 * 1024 * 1024,
    API_IDLE_TIMEOUT: 120_000,
    API_DOCS_PUBLIC: true,
    JAEGER_UI_URL: "http://localhost:16686",
    DMARC_POLICY: "quarantine",
    MAIL_HOSTNAME: "localhost",
    ...overrides,
  };
}

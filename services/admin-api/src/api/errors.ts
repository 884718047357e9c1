import type { FastifyError, FastifyInstance, FastifyReply } from "fastify";
import { DirectoryError } from "@mailstack/db";
import { MailboxIoError } from "@mailstack/mailbox-io";
import { QueueError } from "@mailstack/queue";

/** An HTTP refusal with a status code and, for 400s, the request field at fault. */
export class ApiError extends Error {
  readonly statusCode: number;
  readonly field: string | undefined;
  constructor(statusCode: number, message: string, field?: string) {
    super(message);
    this.name = "ApiError";
    this.statusCode = statusCode;
    this.field = field;
  }
}

export const notFound = (what: string) => new ApiError(404, `no such ${what}`);

const STATUS_TEXT: Record<number, string> = {
  400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 409: "Conflict",
  413: "Payload Too Large", 414: "URI Too Long", 415: "Unsupported Media Type", 500: "Internal Server Error", 503: "Service Unavailable",
};

const DIRECTORY_STATUS: Record<DirectoryError["code"], number> = { invalid: 400, "not-found": 404, duplicate: 409, "in-use": 409 };
const QUEUE_STATUS: Record<QueueError["kind"], number> = { invalid: 400, "not-found": 404, conflict: 409 };
const MAILBOX_STATUS: Record<MailboxIoError["code"], number> = { invalid: 400, "not-found": 404, quota: 413, "too-large": 413 };

/**
 * Runs a shared operation and names `field` when it refuses the input as invalid, so that a
 * refusal from the directory code is as precise as a schema validation error.
 */
export async function forField<T>(field: string, fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (error) {
    if (error instanceof DirectoryError && error.code === "invalid") throw new ApiError(400, error.message, field);
    throw error;
  }
}

function validationField(error: FastifyError): string | undefined {
  const first = error.validation?.[0];
  if (!first) return undefined;
  const params = first.params as { missingProperty?: string; additionalProperty?: string };
  const path = first.instancePath.replace(/^\//, "").replaceAll("/", ".");
  const leaf = params.missingProperty ?? params.additionalProperty;
  return leaf ? (path ? `${path}.${leaf}` : leaf) : path || undefined;
}

/** The path of the first string holding a NUL character inside a parsed JSON value, or null. */
function nulPath(value: unknown, path: string): string | null {
  if (typeof value === "string") return value.includes("\u0000") ? path : null;
  if (Array.isArray(value)) {
    for (const [i, item] of value.entries()) {
      const found = nulPath(item, path ? `${path}.${i}` : String(i));
      if (found !== null) return found;
    }
    return null;
  }
  // Objects of data (JSON, the query, the params), not an import's body stream.
  if (value !== null && typeof value === "object" && !Buffer.isBuffer(value) && typeof (value as { pipe?: unknown }).pipe !== "function") {
    for (const [key, item] of Object.entries(value as Record<string, unknown>)) {
      const found = nulPath(item, path ? `${path}.${key}` : key);
      if (found !== null) return found;
    }
  }
  return null;
}

/**
 * No text PostgreSQL stores may hold NUL (it refuses the whole statement): a NUL anywhere in the
 * parameters, the query or a JSON body is a 400 naming the field, before any route runs.
 */
export function installNulGuard(app: FastifyInstance): void {
  app.addHook("preValidation", async (request) => {
    const parts = { params: request.params, querystring: request.query, body: request.body } as const;
    for (const [where, value] of Object.entries(parts)) {
      const field = nulPath(value, "");
      if (field !== null) throw new ApiError(400, `${where}: ${field || "value"} may not contain NUL characters`, field || undefined);
    }
  });
}

/**
 * Refusals by the router, before any hook or route (a path that is not valid percent-encoding, a
 * path segment over maxParamLength), in the same shape as every other refusal.
 */
export function frameworkError(error: FastifyError, reply: FastifyReply): void {
  const status = error.statusCode ?? 400;
  void reply.status(status).send({ statusCode: status, error: STATUS_TEXT[status] ?? "Error", message: error.message });
}

/** One error shape for every refusal: { statusCode, error, message, field? }; 5xx details stay in the log. */
export function installErrorHandler(app: FastifyInstance): void {
  app.setErrorHandler((error: FastifyError, request, reply) => {
    let status = 500;
    let message = "internal error";
    let field: string | undefined;
    if (error.validation) {
      status = 400;
      field = validationField(error);
      const first = error.validation[0];
      const params = first?.params as { additionalProperty?: string; missingProperty?: string } | undefined;
      const detail = params?.additionalProperty ? "is not a known field"
        : params?.missingProperty ? "is required"
        : (first?.message ?? error.message);
      message = `${error.validationContext ?? "request"}: ${field ?? "value"} ${detail}`;
    } else if (error instanceof ApiError) {
      status = error.statusCode;
      message = error.message;
      field = error.field;
    } else if (error instanceof DirectoryError) {
      status = DIRECTORY_STATUS[error.code];
      message = error.message;
    } else if (error instanceof QueueError) {
      status = QUEUE_STATUS[error.kind];
      message = error.message;
    } else if (error instanceof MailboxIoError) {
      status = MAILBOX_STATUS[error.code];
      message = error.message;
    } else if (typeof error.statusCode === "number" && error.statusCode >= 400 && error.statusCode < 500) {
      status = error.statusCode;
      message = error.message;
    }
    if (status >= 500) request.log.error({ err: error }, "request failed");
    // A route may have set another type (an export's application/x-tar) before its stream failed.
    void reply.status(status).type("application/json; charset=utf-8").send({ statusCode: status, error: STATUS_TEXT[status] ?? "Error", message, ...(field ? { field } : {}) });
  });
  app.setNotFoundHandler((request, reply) => {
    void reply.status(404).send({ statusCode: 404, error: "Not Found", message: `no route ${request.method} ${request.url.split("?")[0]}` });
  });
}

import type { FastifyInstance, FastifyRequest } from "fastify";
import { authenticateApiToken, type ApiPrincipal } from "@mailstack/admin-ops";
import type { Pool } from "@mailstack/db";
import { normalizeDomain } from "@mailstack/mail";
import { ApiError } from "./errors.ts";

declare module "fastify" {
  interface FastifyRequest {
    principal: ApiPrincipal;
  }
}

/**
 * Every request needs `Authorization: Bearer <token>` (401 otherwise), checked before the body is
 * read. `publicPrefixes` lists paths served without a token (the OpenAPI document).
 */
export function installAuth(app: FastifyInstance, pool: Pool, publicPrefixes: string[]): void {
  app.decorateRequest("principal", null as unknown as ApiPrincipal);
  app.addHook("onRequest", async (request, reply) => {
    const path = request.url.split("?")[0]!;
    if (publicPrefixes.some((prefix) => path === prefix || path.startsWith(`${prefix}/`))) return;
    const header = request.headers.authorization ?? "";
    const match = /^Bearer[ ]+(\S+)\s*$/i.exec(header);
    const principal = match ? await authenticateApiToken(pool, match[1]!) : null;
    if (!principal) {
      void reply.header("www-authenticate", 'Bearer realm="mailstack"');
      // Without a token nothing more is read: the connection closes after this answer, rather
      // than staying open to take in a body the client may trickle for as long as it likes.
      void reply.header("connection", "close");
      throw new ApiError(401, match ? "invalid or revoked token" : "a bearer token is required");
    }
    request.principal = principal;
  });
}

/** Operator-only actions (creating or deleting domains) refuse tenant tokens. */
export function requireOperator(request: FastifyRequest): void {
  if (request.principal.domain !== null) throw new ApiError(403, "this action needs an operator token");
}

/**
 * A tenant token sees only its own domain; anything else answers exactly as a missing object
 * would, so nothing about another tenant is revealed.
 */
export function inScope(request: FastifyRequest, domain: string): boolean {
  const own = request.principal.domain;
  return own === null || normalizeDomain(domain) === own;
}

export function domainOfAddress(address: string): string {
  return address.slice(address.lastIndexOf("@") + 1);
}

import type { FastifyInstance, FastifyRequest } from "fastify";
import {
  DirectoryError, addAccount, addAlias, addDomain, getAccount, getDomain, pageAccounts, pageAliases, pageDomains, removeAccount,
  removeAlias, removeDomain, setAccountApopSecret, setAccountDisabled, setAccountPassword, setAccountQuota, transaction, type AccountRow,
  type AliasRow, type DomainRow, type Pool,
} from "@mailstack/db";
import { activateDomainDkimKey, createDomainDkimKey, type DkimAlgorithm } from "@mailstack/dkim";
import { domainDnsRecords } from "@mailstack/admin-ops";
import { domainOfAddress, inScope, requireOperator } from "../auth.ts";
import type { ApiConfig } from "../config.ts";
import { ApiError, forField, notFound } from "../errors.ts";
import { keyPage, nextKey, pageQuery, type PageRequest } from "../pagination.ts";
import { addressString, byteCount, dateTime, domainString, errorResponses, noContent, nullableInteger, nullableString } from "../schemas.ts";

const domainView = {
  type: "object",
  properties: {
    name: { type: "string" },
    dkimSelector: nullableString,
    dkimAlgorithm: nullableString,
    dkimPendingSelector: nullableString,
    dkimPendingAlgorithm: nullableString,
    dmarcRejectAction: { type: "string" },
    createdAt: dateTime,
  },
} as const;

const dnsRecordsView = {
  type: "array",
  items: {
    type: "object",
    properties: {
      purpose: { type: "string", enum: ["mx", "spf", "dkim", "dmarc"] },
      type: { type: "string" },
      name: { type: "string" },
      value: { type: "string" },
      priority: { type: "integer" },
    },
  },
} as const;

const accountView = {
  type: "object",
  properties: {
    address: { type: "string" },
    domain: { type: "string" },
    quotaBytes: nullableInteger,
    usedBytes: { type: "integer" },
    disabled: { type: "boolean" },
    createdAt: dateTime,
  },
} as const;

const aliasView = {
  type: "object",
  properties: {
    address: { type: "string" },
    targets: { type: "array", items: { type: "string" } },
    createdAt: dateTime,
  },
} as const;

const dkimBody = {
  type: "object",
  additionalProperties: false,
  properties: {
    selector: { type: "string", minLength: 1, maxLength: 200 },
    algorithm: { type: "string", enum: ["rsa-sha256", "ed25519-sha256"] },
    // Replace the current key at once instead of adding a pending one (a compromised key).
    activateNow: { type: "boolean" },
  },
} as const;

function showDomain(d: DomainRow) {
  return {
    name: d.name, dkimSelector: d.dkim_selector, dkimAlgorithm: d.dkim_algorithm,
    dkimPendingSelector: d.dkim_pending_selector, dkimPendingAlgorithm: d.dkim_pending_algorithm,
    dmarcRejectAction: d.dmarc_reject_action, createdAt: d.created_at.toISOString(),
  };
}

function showAccount(a: AccountRow) {
  return {
    address: a.address, domain: domainOfAddress(a.address), quotaBytes: a.quota_bytes, usedBytes: a.used_bytes,
    disabled: a.disabled, createdAt: a.created_at.toISOString(),
  };
}

function showAlias(a: AliasRow) {
  return { address: a.address, targets: a.targets, createdAt: a.created_at.toISOString() };
}

/** A domain the token may see, or 404 (the same answer whether it is missing or another tenant's). */
async function visibleDomain(pool: Pool, request: FastifyRequest, name: string): Promise<DomainRow> {
  const domain = inScope(request, name) ? await getDomain(pool, name) : null;
  if (!domain) throw notFound(`domain: ${name}`);
  return domain;
}

export async function visibleAccount(pool: Pool, request: FastifyRequest, address: string): Promise<AccountRow> {
  const account = inScope(request, domainOfAddress(address)) ? await getAccount(pool, address) : null;
  if (!account) throw notFound(`account: ${address}`);
  return account;
}

type Params<K extends string> = { Params: Record<K, string> };

/** @fastify/swagger marks every request body required; a new DKIM key's may be left out. */
export function documentOptionalBodies<T extends object>(document: T): T {
  const paths = (document as { paths?: Record<string, Record<string, { requestBody?: { required?: boolean } }>> }).paths;
  const body = paths?.["/domains/{name}/dkim"]?.post?.requestBody;
  if (body) body.required = false;
  return document;
}

/**
 * A refusal of addAlias with the field at fault: an invalid target is a 400 naming `targets.N`
 * (it was reported as `address`), and a target in a served domain that has no such account or
 * alias stays a 404 but names `targets.N` too, so a client knows which of its targets it was.
 */
function aliasRefusal(error: unknown, address: string, targets: string[]): unknown {
  if (!(error instanceof DirectoryError)) return error;
  const mentions = (text: string) => error.message.includes(text) || error.message.includes(text.toLowerCase());
  const target = targets.findIndex((t) => mentions(t));
  if (/^target /.test(error.message) || (target >= 0 && !mentions(address))) {
    return new ApiError(error.code === "not-found" ? 404 : 400, error.message, target >= 0 ? `targets.${target}` : "targets");
  }
  if (error.code === "invalid") return new ApiError(400, error.message, "address");
  return error;
}

export function directoryRoutes(app: FastifyInstance, pool: Pool, config: ApiConfig): void {
  const records = (name: string) => domainDnsRecords(pool, name, { mxHost: config.MAIL_HOSTNAME, dmarcPolicy: config.DMARC_POLICY });

  // ---- domains
  app.get<{ Querystring: PageRequest }>("/domains", {
    schema: {
      tags: ["domains"], summary: "List served domains, by name, a page at a time",
      querystring: { type: "object", additionalProperties: false, properties: pageQuery },
      response: { 200: { type: "object", properties: { domains: { type: "array", items: domainView }, next: nextKey } }, ...errorResponses },
    },
  }, async (request) => {
    const domains = await pageDomains(pool, keyPage(request.query), request.principal.domain ?? undefined);
    return { domains: domains.rows.map(showDomain), next: domains.next };
  });

  app.post<{ Body: { name: string; dkim?: { selector?: string; algorithm?: DkimAlgorithm } | boolean } }>("/domains", {
    schema: {
      tags: ["domains"], summary: "Add a domain, optionally with a new DKIM key; answers with the DNS records to publish",
      body: {
        type: "object", additionalProperties: false, required: ["name"],
        properties: { name: domainString, dkim: { anyOf: [{ type: "boolean" }, dkimBody] } },
      },
      response: { 201: { type: "object", properties: { domain: domainView, dnsRecords: dnsRecordsView } }, ...errorResponses },
    },
  }, async (request, reply) => {
    requireOperator(request);
    const { name, dkim } = request.body;
    const domain = await transaction(pool, async (client) => {
      const created = await forField("name", () => addDomain(client, name));
      if (dkim) {
        const options = typeof dkim === "object" ? dkim : {};
        await forField("dkim", () => createDomainDkimKey(client, created.name, options));
      }
      return (await getDomain(client, created.name))!;
    });
    reply.status(201);
    return { domain: showDomain(domain), dnsRecords: await records(domain.name) };
  });

  app.get<Params<"name">>("/domains/:name", {
    schema: {
      tags: ["domains"], summary: "A domain and the DNS records to publish for it (MX, SPF, DKIM, DMARC)",
      params: { type: "object", properties: { name: domainString }, required: ["name"] },
      response: { 200: { type: "object", properties: { domain: domainView, dnsRecords: dnsRecordsView } }, ...errorResponses },
    },
  }, async (request) => {
    const domain = await visibleDomain(pool, request, request.params.name);
    return { domain: showDomain(domain), dnsRecords: await records(domain.name) };
  });

  app.post<Params<"name"> & { Body: { selector?: string; algorithm?: DkimAlgorithm; activateNow?: boolean } }>("/domains/:name/dkim", {
    schema: {
      tags: ["domains"],
      summary: "Generate a new DKIM key: the domain's first key signs at once, a later one is pending until activated (or at once with activateNow)",
      params: { type: "object", properties: { name: domainString }, required: ["name"] },
      body: dkimBody,
      response: { 201: { type: "object", properties: { domain: domainView, dnsRecords: dnsRecordsView } }, ...errorResponses },
    },
    // Every field is optional, so a POST with no body at all (`curl -X POST`) is the defaults.
    preValidation: async (request) => {
      request.body ??= {};
    },
  }, async (request, reply) => {
    const domain = await visibleDomain(pool, request, request.params.name);
    await forField("selector", () => createDomainDkimKey(pool, domain.name, request.body));
    reply.status(201);
    return { domain: showDomain((await getDomain(pool, domain.name))!), dnsRecords: await records(domain.name) };
  });

  app.post<Params<"name">>("/domains/:name/dkim/activate", {
    schema: {
      tags: ["domains"],
      summary: "Sign with the pending DKIM key from now on (publish its record first); keep the old key's record published for a few days",
      params: { type: "object", properties: { name: domainString }, required: ["name"] },
      response: { 200: { type: "object", properties: { domain: domainView, dnsRecords: dnsRecordsView } }, ...errorResponses },
    },
  }, async (request) => {
    const domain = await visibleDomain(pool, request, request.params.name);
    await activateDomainDkimKey(pool, domain.name);
    return { domain: showDomain((await getDomain(pool, domain.name))!), dnsRecords: await records(domain.name) };
  });

  app.delete<Params<"name">>("/domains/:name", {
    schema: {
      tags: ["domains"], summary: "Remove a domain that has no accounts or aliases left",
      params: { type: "object", properties: { name: domainString }, required: ["name"] },
      response: { ...noContent, ...errorResponses },
    },
  }, async (request, reply) => {
    requireOperator(request);
    await removeDomain(pool, request.params.name);
    reply.status(204);
  });

  // ---- accounts
  app.get<{ Querystring: { domain?: string } & PageRequest }>("/accounts", {
    schema: {
      tags: ["accounts"], summary: "List accounts, optionally of one domain, by address, a page at a time",
      querystring: { type: "object", additionalProperties: false, properties: { domain: domainString, ...pageQuery } },
      response: { 200: { type: "object", properties: { accounts: { type: "array", items: accountView }, next: nextKey } }, ...errorResponses },
    },
  }, async (request) => {
    const domain = request.query.domain ?? request.principal.domain ?? undefined;
    if (domain !== undefined) await visibleDomain(pool, request, domain);
    const accounts = await pageAccounts(pool, keyPage(request.query), domain);
    return { accounts: accounts.rows.map(showAccount), next: accounts.next };
  });

  app.post<{ Body: { address: string; password: string; quotaBytes?: number | null } }>("/accounts", {
    schema: {
      tags: ["accounts"], summary: "Create an account",
      body: {
        type: "object", additionalProperties: false, required: ["address", "password"],
        properties: {
          address: addressString,
          password: { type: "string", minLength: 1, maxLength: 1024 },
          quotaBytes: { ...byteCount, type: ["integer", "null"] },
        },
      },
      response: { 201: accountView, ...errorResponses },
    },
  }, async (request, reply) => {
    const { address, password, quotaBytes } = request.body;
    if (!inScope(request, domainOfAddress(address))) throw notFound(`domain: ${domainOfAddress(address)}`);
    const account = await forField("address", () => addAccount(pool, { address, password, quotaBytes: quotaBytes ?? null }));
    reply.status(201);
    return showAccount(account);
  });

  app.get<Params<"address">>("/accounts/:address", {
    schema: {
      tags: ["accounts"], summary: "One account",
      params: { type: "object", properties: { address: addressString }, required: ["address"] },
      response: { 200: accountView, ...errorResponses },
    },
  }, async (request) => showAccount(await visibleAccount(pool, request, request.params.address)));

  app.patch<Params<"address"> & { Body: { password?: string; quotaBytes?: number | null; disabled?: boolean; apopSecret?: string | null } }>("/accounts/:address", {
    schema: {
      tags: ["accounts"], summary: "Change an account's password, quota (null: unlimited), disabled state or APOP secret (null: APOP off)",
      params: { type: "object", properties: { address: addressString }, required: ["address"] },
      body: {
        type: "object", additionalProperties: false, minProperties: 1,
        properties: {
          password: { type: "string", minLength: 1, maxLength: 1024 },
          quotaBytes: { ...byteCount, type: ["integer", "null"] },
          disabled: { type: "boolean" },
          apopSecret: { type: ["string", "null"], minLength: 1, maxLength: 1024 },
        },
      },
      response: { 200: accountView, ...errorResponses },
    },
  }, async (request) => {
    const account = await visibleAccount(pool, request, request.params.address);
    const body = request.body;
    await transaction(pool, async (client) => {
      if (body.password !== undefined) await forField("password", () => setAccountPassword(client, account.address, body.password!));
      if (body.quotaBytes !== undefined) await forField("quotaBytes", () => setAccountQuota(client, account.address, body.quotaBytes!));
      if (body.disabled !== undefined) await setAccountDisabled(client, account.address, body.disabled);
      if (body.apopSecret !== undefined) await forField("apopSecret", () => setAccountApopSecret(client, account.address, body.apopSecret!));
    });
    return showAccount((await getAccount(pool, account.address))!);
  });

  app.delete<Params<"address">>("/accounts/:address", {
    schema: {
      tags: ["accounts"], summary: "Delete an account and its mailbox",
      params: { type: "object", properties: { address: addressString }, required: ["address"] },
      response: { ...noContent, ...errorResponses },
    },
  }, async (request, reply) => {
    const account = await visibleAccount(pool, request, request.params.address);
    await removeAccount(pool, account.address);
    reply.status(204);
  });

  // ---- aliases
  app.get<{ Querystring: { domain?: string } & PageRequest }>("/aliases", {
    schema: {
      tags: ["aliases"], summary: "List aliases, optionally of one domain, by address, a page at a time",
      querystring: { type: "object", additionalProperties: false, properties: { domain: domainString, ...pageQuery } },
      response: { 200: { type: "object", properties: { aliases: { type: "array", items: aliasView }, next: nextKey } }, ...errorResponses },
    },
  }, async (request) => {
    const domain = request.query.domain ?? request.principal.domain ?? undefined;
    if (domain !== undefined) await visibleDomain(pool, request, domain);
    const aliases = await pageAliases(pool, keyPage(request.query), domain);
    return { aliases: aliases.rows.map(showAlias), next: aliases.next };
  });

  app.post<{ Body: { address: string; targets: string[] } }>("/aliases", {
    schema: {
      tags: ["aliases"], summary: "Create an alias (*@domain is the catch-all)",
      body: {
        type: "object", additionalProperties: false, required: ["address", "targets"],
        properties: {
          address: addressString,
          targets: { type: "array", minItems: 1, maxItems: 1000, items: addressString },
        },
      },
      response: { 201: aliasView, ...errorResponses },
    },
  }, async (request, reply) => {
    const { address, targets } = request.body;
    if (!inScope(request, domainOfAddress(address))) throw notFound(`domain: ${domainOfAddress(address)}`);
    // A tenant may point aliases at its own domain or at remote addresses, never into another
    // tenant's domain (whose addresses it could otherwise probe through the existence check).
    for (const [i, target] of targets.entries()) {
      if (!inScope(request, domainOfAddress(target)) && (await getDomain(pool, domainOfAddress(target)))) {
        throw new ApiError(403, `a tenant alias may target only its own domain or remote addresses: ${target}`, `targets.${i}`);
      }
    }
    const alias = await addAlias(pool, address, targets).catch((error: unknown) => {
      throw aliasRefusal(error, address, targets);
    });
    reply.status(201);
    return showAlias(alias);
  });

  app.delete<Params<"address">>("/aliases/:address", {
    schema: {
      tags: ["aliases"], summary: "Delete an alias",
      params: { type: "object", properties: { address: addressString }, required: ["address"] },
      response: { ...noContent, ...errorResponses },
    },
  }, async (request, reply) => {
    if (!inScope(request, domainOfAddress(request.params.address))) throw notFound(`alias: ${request.params.address}`);
    await forField("address", () => removeAlias(pool, request.params.address));
    reply.status(204);
  });
}

import type { FastifyInstance } from "fastify";
import {
  addFilterRule, DirectoryError, listFilterRules, removeFilterRule, type FilterAction, type FilterCondition,
  type FilterRuleRow, type Pool,
} from "@mailstack/db";
import { ApiError } from "../errors.ts";
import { addressString, byteCount, dateTime, errorResponses, noContent, nullableInteger, nullableString, rowId } from "../schemas.ts";
import { visibleAccount } from "./directory.ts";

const ruleView = {
  type: "object",
  properties: {
    id: { type: "integer" },
    position: { type: "integer" },
    condition: {
      type: "object",
      properties: { kind: { type: "string" }, header: nullableString, op: { type: "string" }, value: nullableString, bytes: nullableInteger },
    },
    action: {
      type: "object",
      properties: { kind: { type: "string" }, folder: nullableString, to: nullableString, keepCopy: { type: "boolean" } },
    },
    createdAt: dateTime,
  },
} as const;

type RuleBody = {
  condition: { kind: "header" | "size"; header?: string; op: "contains" | "is" | "exists" | "over" | "under"; value?: string; bytes?: number };
  action: { kind: "fileinto" | "discard" | "forward"; folder?: string; to?: string; keepCopy?: boolean };
};

function showRule(r: FilterRuleRow) {
  return {
    id: r.id,
    position: r.position,
    condition: { kind: r.condition, header: r.header_name, op: r.op, value: r.value, bytes: r.size_bytes },
    action: { kind: r.action, folder: r.folder, to: r.forward_to, keepCopy: r.keep_copy },
    createdAt: r.created_at.toISOString(),
  };
}

/** The flat request shape to the filter package's rule types; a missing part is a 400 naming it. */
function toRule(body: RuleBody): { condition: FilterCondition; action: FilterAction } {
  const c = body.condition;
  let condition: FilterCondition;
  if (c.kind === "header") {
    if (!c.header) throw new ApiError(400, "body: condition.header is required for a header condition", "condition.header");
    if (c.op === "exists") condition = { kind: "header", header: c.header, op: "exists" };
    else if (c.op === "contains" || c.op === "is") {
      if (c.value === undefined) throw new ApiError(400, `body: condition.value is required for ${c.op}`, "condition.value");
      condition = { kind: "header", header: c.header, op: c.op, value: c.value };
    } else throw new ApiError(400, "body: condition.op of a header condition is contains, is or exists", "condition.op");
  } else {
    if (c.op !== "over" && c.op !== "under") throw new ApiError(400, "body: condition.op of a size condition is over or under", "condition.op");
    if (c.bytes === undefined) throw new ApiError(400, "body: condition.bytes is required for a size condition", "condition.bytes");
    condition = { kind: "size", op: c.op, bytes: c.bytes };
  }
  const a = body.action;
  let action: FilterAction;
  if (a.kind === "fileinto") {
    if (!a.folder) throw new ApiError(400, "body: action.folder is required for fileinto", "action.folder");
    action = { kind: "fileinto", folder: a.folder };
  } else if (a.kind === "forward") {
    if (!a.to) throw new ApiError(400, "body: action.to is required for forward", "action.to");
    action = { kind: "forward", to: a.to, keepCopy: a.keepCopy ?? false };
  } else {
    action = { kind: "discard" };
  }
  return { condition, action };
}

const FIELD_OF_REFUSAL: [RegExp, string][] = [
  [/header name/, "condition.header"], [/header value/, "condition.value"], [/size/, "condition.bytes"],
  [/folder/, "action.folder"], [/forward/, "action.to"],
];

const params = { type: "object", properties: { address: addressString }, required: ["address"] } as const;

export function filterRoutes(app: FastifyInstance, pool: Pool): void {
  app.get<{ Params: { address: string } }>("/accounts/:address/filters", {
    schema: {
      tags: ["filters"], summary: "An account's filter rules, in the order the MDA applies them",
      params,
      response: { 200: { type: "object", properties: { rules: { type: "array", items: ruleView } } }, ...errorResponses },
    },
  }, async (request) => {
    const account = await visibleAccount(pool, request, request.params.address);
    return { rules: (await listFilterRules(pool, account.address)).map(showRule) };
  });

  app.post<{ Params: { address: string }; Body: RuleBody }>("/accounts/:address/filters", {
    schema: {
      tags: ["filters"], summary: "Append a filter rule: if header/size condition then fileinto, discard or forward",
      params,
      body: {
        type: "object", additionalProperties: false, required: ["condition", "action"],
        properties: {
          condition: {
            type: "object", additionalProperties: false, required: ["kind", "op"],
            properties: {
              kind: { type: "string", enum: ["header", "size"] },
              header: { type: "string", minLength: 1, maxLength: 76 },
              op: { type: "string", enum: ["contains", "is", "exists", "over", "under"] },
              value: { type: "string", minLength: 1, maxLength: 1000 },
              bytes: byteCount,
            },
          },
          action: {
            type: "object", additionalProperties: false, required: ["kind"],
            properties: {
              kind: { type: "string", enum: ["fileinto", "discard", "forward"] },
              folder: { type: "string", minLength: 1, maxLength: 200 },
              to: addressString,
              keepCopy: { type: "boolean" },
            },
          },
        },
      },
      response: { 201: ruleView, ...errorResponses },
    },
  }, async (request, reply) => {
    const account = await visibleAccount(pool, request, request.params.address);
    const rule = toRule(request.body);
    try {
      const row = await addFilterRule(pool, account.address, rule);
      reply.status(201);
      return showRule(row);
    } catch (error) {
      if (error instanceof DirectoryError && error.code === "invalid") {
        throw new ApiError(400, error.message, FIELD_OF_REFUSAL.find(([pattern]) => pattern.test(error.message))?.[1]);
      }
      throw error;
    }
  });

  app.delete<{ Params: { address: string; id: number } }>("/accounts/:address/filters/:id", {
    schema: {
      tags: ["filters"], summary: "Remove one filter rule",
      params: { type: "object", properties: { address: addressString, id: rowId }, required: ["address", "id"] },
      response: { ...noContent, ...errorResponses },
    },
  }, async (request, reply) => {
    const account = await visibleAccount(pool, request, request.params.address);
    await removeFilterRule(pool, account.address, request.params.id);
    reply.status(204);
  });
}

// JSON schemas shared by the routes. Request bodies reject unknown fields so that a typo is a 400
// naming the field rather than a silently ignored setting.

export const errorSchema = {
  type: "object",
  properties: {
    statusCode: { type: "integer" },
    error: { type: "string" },
    message: { type: "string" },
    field: { type: "string" },
  },
  required: ["statusCode", "error", "message"],
} as const;

/** The refusals every authenticated route can answer with. */
export const errorResponses = {
  400: { description: "Invalid request; `field` names the offending field", ...errorSchema },
  401: { description: "Missing, unknown or revoked token", ...errorSchema },
  403: { description: "The token may not do this", ...errorSchema },
  404: { description: "No such object (or not visible to this token)", ...errorSchema },
  409: { description: "Conflicts with existing data", ...errorSchema },
} as const;

export const addressString = { type: "string", minLength: 3, maxLength: 320, pattern: "^[^@\\s]+@[^@\\s]+$" } as const;
export const domainString = { type: "string", minLength: 1, maxLength: 253, pattern: "^[^@\\s/]+\\.[^@\\s/]+$" } as const;
export const folderString = { type: "string", minLength: 1, maxLength: 255 } as const;

/** Byte counts and row ids: JSON numbers past 2^53 are not exact, and PostgreSQL's bigint ends soon after. */
export const byteCount = { type: "integer", minimum: 0, maximum: Number.MAX_SAFE_INTEGER } as const;
export const rowId = { type: "integer", minimum: 1, maximum: Number.MAX_SAFE_INTEGER } as const;

export const nullableString = { type: ["string", "null"] } as const;
export const nullableInteger = { type: ["integer", "null"] } as const;
export const dateTime = { type: "string", format: "date-time" } as const;

export const noContent = { 204: { description: "Done", type: "null" } } as const;

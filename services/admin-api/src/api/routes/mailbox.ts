import { Readable } from "node:stream";
import type { FastifyInstance } from "fastify";
import { isFolderPath, type Pool } from "@mailstack/db";
import {
  emlFiles, emlMessages, existingFolder, importMboxStream, importMessages, listFolders, MailboxIoError, mboxStream, readTar, tarHeader, tarStream,
  validateFolderName,
} from "@mailstack/mailbox-io";
import type { ApiConfig } from "../config.ts";
import { ApiError } from "../errors.ts";
import { addressString, errorResponses, errorSchema, folderString } from "../schemas.ts";
import { visibleAccount } from "./directory.ts";

const MBOX = "application/mbox";
const TAR = "application/x-tar";
const EML = "message/rfc822";

const params = { type: "object", properties: { address: addressString }, required: ["address"] } as const;
const formatQuery = {
  type: "object", additionalProperties: false, required: ["format"],
  properties: { format: { type: "string", enum: ["mbox", "eml"] }, folder: folderString },
} as const;

type Route = { Params: { address: string }; Querystring: { format: "mbox" | "eml"; folder?: string } };

type OpenApiDocument = { paths?: Record<string, Record<string, Record<string, unknown>>> };

const binary = { schema: { type: "string", format: "binary" } };

/**
 * The bodies Fastify does not validate as JSON, written into the OpenAPI document: the export
 * answers mbox or tar bytes (not JSON), and the import takes one of the formats as its request
 * body (a route body schema would make Fastify validate the upload stream against it).
 */
export function documentMailboxBodies<T extends object>(document: T): T {
  const doc = document as OpenApiDocument;
  const exportOp = doc.paths?.["/accounts/{address}/export"]?.get as { responses?: Record<string, Record<string, unknown>> } | undefined;
  const ok = exportOp?.responses?.["200"];
  if (ok) ok.content = { [MBOX]: binary, [TAR]: binary };
  const importOp = doc.paths?.["/accounts/{address}/import"]?.post as { requestBody?: unknown; responses?: Record<string, unknown> } | undefined;
  if (importOp) {
    importOp.requestBody = {
      required: true,
      description: "format=mbox: an mboxrd file; format=eml: a tar of .eml files, or one message as message/rfc822",
      content: { [MBOX]: binary, [TAR]: binary, [EML]: binary, "application/octet-stream": binary },
    };
    importOp.responses ??= {};
    importOp.responses["415"] = { description: "No request body", content: { "application/json": { schema: errorSchema } } };
  }
  return document;
}

/**
 * Export streams rows from a cursor into the response (mbox for one folder; a tar of .eml files
 * for a folder or the whole mailbox). Import reads the request body as a stream, one message at a
 * time, each filed in its own transaction.
 */
export function mailboxRoutes(app: FastifyInstance, pool: Pool, config: ApiConfig): void {
  // Import bodies are streams handed to the importer, which bounds each message itself.
  app.addContentTypeParser([MBOX, TAR, EML, "application/octet-stream"], (_request, payload, done) => done(null, payload));

  app.get<Route>("/accounts/:address/export", {
    schema: {
      tags: ["mailbox"],
      summary: "Export a folder as mboxrd (format=mbox, folder defaults to INBOX), or a folder or the whole mailbox as a tar of .eml files (format=eml)",
      params, querystring: formatQuery,
      response: { 200: { description: "application/mbox or application/x-tar stream", type: "string", format: "binary" }, ...errorResponses },
    },
  }, async (request, reply) => {
    const account = await visibleAccount(pool, request, request.params.address);
    const { format } = request.query;
    checkFolder(request.query.folder);
    // A missing folder is a 404 in both formats, not an empty export.
    const folder = request.query.folder === undefined ? undefined : await existingFolder(pool, account.id, request.query.folder);
    if (format === "mbox") {
      const name = folder ?? await existingFolder(pool, account.id, "INBOX");
      reply.type(MBOX).header("content-disposition", `attachment; filename="${safeFileName(`${account.address}-${name}`)}.mbox"`);
      return reply.send(Readable.from(mboxStream(pool, account.id, name)));
    }
    if (folder === undefined) {
      // Checked before the first byte, so the refusal is a status rather than a cut-off archive.
      const unsafe = (await listFolders(pool, account.id)).find((name) => !isFolderPath(name) || !fitsTar(name));
      if (unsafe !== undefined) throw new ApiError(409, `folder ${JSON.stringify(unsafe)} has a name that cannot be a path in an archive`);
    }
    reply.type(TAR).header("content-disposition", `attachment; filename="${safeFileName(`${account.address}-${folder ?? "mailbox"}`)}.tar"`);
    return reply.send(Readable.from(tarStream(emlFiles(pool, account.id, folder))));
  });

  app.post<Route>("/accounts/:address/import", {
    schema: {
      tags: ["mailbox"],
      summary: "Import an mboxrd body (application/mbox) into a folder, a tar of .eml files (application/x-tar), or one .eml (message/rfc822, format=eml); messages are stored byte for byte",
      params, querystring: formatQuery,
      response: {
        200: {
          type: "object",
          properties: { imported: { type: "integer" }, bytes: { type: "integer" }, folders: { type: "array", items: { type: "string" } } },
        },
        ...errorResponses,
        413: { description: "A message is too large or the account's quota would be exceeded", type: "object", properties: { statusCode: { type: "integer" }, error: { type: "string" }, message: { type: "string" } } },
      },
    },
  }, async (request) => {
    const account = await visibleAccount(pool, request, request.params.address);
    const { format, folder } = request.query;
    checkFolder(folder);
    const body = request.body as Readable | undefined;
    if (!body || typeof (body as Readable).pipe !== "function") {
      throw new ApiError(415, `send the ${format === "mbox" ? MBOX : TAR} bytes as the request body`);
    }
    const limit = config.API_IMPORT_MAX_MESSAGE_SIZE;
    try {
      if (format === "mbox") return await importMboxStream(pool, account.id, folder ?? "INBOX", body, limit);
      if (request.headers["content-type"]?.split(";")[0]!.trim().toLowerCase() === EML) {
        const raw = await readBounded(body, limit);
        // `curl --data-binary @file` sends nothing when the file cannot be read: that is no message.
        if (raw.length === 0) throw new ApiError(400, "the request body is empty: no message to import");
        return await importMessages(pool, account.id, emlMessages(single({ path: "message.eml", bytes: raw, mtime: new Date() }), folder));
      }
      return await importMessages(pool, account.id, emlMessages(readTar(body, limit), folder));
    } finally {
      // Whatever happened, do not leave the rest of the upload unread on the socket.
      body.resume();
    }
  });
}

async function* single<T>(item: T): AsyncGenerator<T> {
  yield item;
}

/** Reads a whole body of at most `limit` bytes (one message). */
async function readBounded(body: Readable, limit: number): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of body) {
    size += (chunk as Buffer).length;
    if (size > limit) throw new MailboxIoError("too-large", `the message is larger than the limit of ${limit} bytes`);
    chunks.push(chunk as Buffer);
  }
  return Buffer.concat(chunks, size);
}

function checkFolder(folder: string | undefined): void {
  if (folder === undefined) return;
  try {
    validateFolderName(folder);
  } catch (error) {
    throw new ApiError(400, `querystring: folder ${(error as Error).message}`, "folder");
  }
}

/** Whether `<folder>/<uid>.eml` fits a ustar header (255 bytes, split at a '/'), for the largest UID. */
function fitsTar(folder: string): boolean {
  try {
    tarHeader(`${folder}/4294967295.eml`, 0, new Date(0));
    return true;
  } catch {
    return false;
  }
}

function safeFileName(name: string): string {
  return name.replace(/[^A-Za-z0-9@._-]+/g, "_");
}

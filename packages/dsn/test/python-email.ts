import { spawn } from "node:child_process";

/** What Python's email package makes of a message: its parts, defects, and the delivery-status blocks. */
export interface PythonView {
  /** Every part of the MIME tree in walk order: content type and Content-Transfer-Encoding. */
  parts: Array<{ type: string; cte: string | null }>;
  /** Defects the parser registered anywhere. */
  defects: string[];
  /** The message/delivery-status part as Python splits it: the per-message fields, then one block per recipient. */
  status: Array<Record<string, string>>;
  subject: string;
  autoSubmitted: string | null;
}

const script = `
import email, json, sys
from email import policy
m = email.message_from_bytes(sys.stdin.buffer.read(), policy=policy.default)
parts, defects, status = [], [str(d) for d in m.defects], []
for part in m.walk():
    parts.append({"type": part.get_content_type(), "cte": part.get("content-transfer-encoding")})
    defects += [str(d) for d in part.defects]
    if part.get_content_type() == "message/delivery-status":
        status = [dict((k, str(v)) for k, v in block.items()) for block in part.get_payload()]
print(json.dumps({"parts": parts, "defects": defects, "status": status, "subject": str(m["subject"]), "autoSubmitted": m["auto-submitted"] and str(m["auto-submitted"])}))
`;

/** Parses raw with python3's email package (policy.default), as a receiving program would. */
export function parseWithPython(raw: Buffer): Promise<PythonView> {
  return new Promise((resolve, reject) => {
    const child = spawn("python3", ["-c", script], { stdio: ["pipe", "pipe", "pipe"] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on("data", (chunk: Buffer) => out.push(chunk));
    child.stderr.on("data", (chunk: Buffer) => err.push(chunk));
    child.on("error", reject);
    child.on("close", (code) => {
      if (code !== 0) return reject(new Error(`python3 failed: ${Buffer.concat(err).toString()}`));
      resolve(JSON.parse(Buffer.concat(out).toString()) as PythonView);
    });
    child.stdin.end(raw);
  });
}

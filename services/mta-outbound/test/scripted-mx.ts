import net from "node:net";
import tls from "node:tls";
import type { AddressInfo } from "node:net";

/** One client connection to a scripted server, as the server saw it. */
export interface ScriptedConnection {
  /** Command lines received, in order, without CRLF. */
  commands: string[];
  /** Message data received between 354 and the final dot (still dot-stuffed). */
  messages: string[];
  secure: boolean;
  closed: boolean;
  /** Writes raw text to the client. */
  write(text: string): void;
  /** Closes the connection from the server side, after what is being written. */
  close(): void;
}

export interface Script {
  /** The greeting; null says nothing at all. Default "220 scripted ESMTP". */
  greeting?: string | null;
  /** EHLO extension keywords. Default PIPELINING, 8BITMIME, SMTPUTF8, DSN, SIZE. */
  extensions?: string[];
  /**
   * The reply to a command, CRLF added when missing; undefined: the default reply; null: no
   * reply at all (a silent server). "STARTTLS" is upgraded after its reply when `tls` is set.
   */
  reply?: (command: string, connection: ScriptedConnection) => string | null | undefined;
  /** The reply to the final dot; undefined: "250 2.0.0 queued"; null: no reply. */
  dataReply?: (data: string, connection: ScriptedConnection) => string | null | undefined;
  /** Every reply written one byte per TCP segment, a millisecond apart (replies split at awkward places). */
  trickle?: boolean;
  /** Key and certificate for STARTTLS; requestCert: refuse a client without a certificate (after a TLS 1.3 handshake). */
  tls?: { key: string; cert: string; requestCert?: boolean };
}

function defaultReply(command: string, script: Script): string {
  const verb = command.split(" ", 1)[0]!.toUpperCase();
  switch (verb) {
    case "EHLO": {
      const extensions = script.extensions ?? ["PIPELINING", "8BITMIME", "SMTPUTF8", "DSN", "SIZE 10000000", ...(script.tls ? ["STARTTLS"] : [])];
      return ["scripted", ...extensions].map((e, i, all) => `250${i === all.length - 1 ? " " : "-"}${e}`).join("\r\n");
    }
    case "HELO":
    case "RSET":
    case "NOOP":
      return "250 2.0.0 Ok";
    case "MAIL":
      return "250 2.1.0 Ok";
    case "RCPT":
      return "250 2.1.5 Ok";
    case "DATA":
      return "354 End data with <CR><LF>.<CR><LF>";
    case "STARTTLS":
      return "220 2.0.0 Ready to start TLS";
    case "QUIT":
      return "221 2.0.0 Bye";
    default:
      return "502 5.5.2 Error: command not recognized";
  }
}

/**
 * A line-level SMTP server on loopback whose every reply a test can choose: for the answers
 * smtp-server will not give (no text after the code, mixed codes, silence, injected lines).
 */
export async function startScriptedMx(host: string, port: number, script: Script = {}) {
  const connections: ScriptedConnection[] = [];
  const sockets = new Set<net.Socket>();
  const server = net.createServer((plain) => {
    sockets.add(plain);
    plain.setNoDelay(true);
    let stream: net.Socket = plain;
    let buffer = Buffer.alloc(0);
    let inData = false;
    let trickled = Promise.resolve();
    const connection: ScriptedConnection = {
      commands: [],
      messages: [],
      secure: false,
      closed: false,
      write: (text) => {
        if (!script.trickle) {
          if (!stream.destroyed) stream.write(text);
          return;
        }
        // Queued behind the bytes of earlier replies still trickling out.
        for (const byte of Buffer.from(text)) {
          trickled = trickled.then(async () => {
            if (!stream.destroyed) stream.write(Buffer.from([byte]));
            await new Promise((resolve) => setTimeout(resolve, 1));
          });
        }
      },
      // Ends the connection after the reply being written (if any); nothing more is read.
      close: () => {
        connection.closed = true;
        void trickled.then(() => {
          setImmediate(() => stream.end());
          setTimeout(() => stream.destroy(), 50).unref();
        });
      },
    };
    connections.push(connection);
    const send = (text: string | null | undefined) => {
      if (text === null || text === undefined) return;
      connection.write(text.endsWith("\r\n") ? text : `${text}\r\n`);
    };
    const onData = (chunk: Buffer) => {
      buffer = Buffer.concat([buffer, chunk]);
      for (;;) {
        if (connection.closed) return;
        if (inData) {
          const text = buffer.toString("latin1");
          const end = text.startsWith(".\r\n") ? 0 : text.indexOf("\r\n.\r\n");
          if (end < 0) return;
          const data = end === 0 ? "" : text.slice(0, end + 2);
          buffer = buffer.subarray(end === 0 ? 3 : end + 5);
          inData = false;
          connection.messages.push(data);
          const custom = script.dataReply?.(data, connection);
          send(custom === undefined ? "250 2.0.0 queued" : custom);
          continue;
        }
        const index = buffer.indexOf("\r\n");
        if (index < 0) return;
        const line = buffer.subarray(0, index).toString("utf8");
        buffer = buffer.subarray(index + 2);
        connection.commands.push(line);
        const custom = script.reply?.(line, connection);
        const reply = custom === undefined ? defaultReply(line, script) : custom;
        send(reply);
        const verb = line.split(" ", 1)[0]!.toUpperCase();
        if (reply?.startsWith("354")) inData = true;
        if (verb === "QUIT" && custom === undefined) connection.close();
        if (verb === "STARTTLS" && script.tls && reply?.startsWith("220")) {
          plain.removeListener("data", onData);
          buffer = Buffer.alloc(0);
          const { key, cert, requestCert = false } = script.tls;
          const secured = new tls.TLSSocket(plain, { isServer: true, key, cert, requestCert, rejectUnauthorized: requestCert });
          secured.on("error", () => undefined);
          secured.on("data", onData);
          stream = secured;
          connection.secure = true;
          return;
        }
      }
    };
    plain.on("data", onData);
    plain.on("error", () => undefined);
    plain.on("close", () => {
      connection.closed = true;
      sockets.delete(plain);
    });
    if (script.greeting !== null) send(script.greeting ?? "220 scripted ESMTP");
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, host, () => resolve());
  });
  return {
    host,
    port: (server.address() as AddressInfo).port,
    connections,
    /** The commands of every connection, in order. */
    commands: () => connections.flatMap((c) => c.commands),
    close: () =>
      new Promise<void>((resolve) => {
        for (const socket of sockets) socket.destroy();
        server.close(() => resolve());
      }),
  };
}

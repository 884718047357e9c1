import dgram from "node:dgram";
import dnsPacket from "dns-packet";

/** `drop`: queries for the name are never answered (a DNS server that times out). */
export type Zone = Record<string, { TXT?: string[]; A?: string[]; MX?: Array<{ preference: number; exchange: string }>; drop?: boolean }>;

/** A tiny authoritative DNS server on loopback (UDP) answering from a zone map; NXDOMAIN otherwise. */
export async function startDnsServer(zone: Zone): Promise<{ address: string; queries: string[]; close(): Promise<void> }> {
  const socket = dgram.createSocket("udp4");
  const queries: string[] = [];
  socket.on("message", (message, remote) => {
    let query: dnsPacket.Packet;
    try {
      query = dnsPacket.decode(message);
    } catch {
      return;
    }
    const question = query.questions?.[0];
    if (!question) return;
    const name = question.name.toLowerCase();
    queries.push(`${question.type} ${name}`);
    const records = zone[name];
    if (records?.drop) return;
    const answers: dnsPacket.Answer[] = [];
    if (records && question.type === "TXT") {
      for (const text of records.TXT ?? []) {
        // TXT character-strings hold at most 255 octets; long records (DKIM keys) are split.
        const chunks = text.match(/.{1,255}/g) ?? [""];
        answers.push({ type: "TXT", name: question.name, ttl: 60, class: "IN", data: chunks });
      }
    }
    if (records && question.type === "A") {
      for (const ip of records.A ?? []) answers.push({ type: "A", name: question.name, ttl: 60, class: "IN", data: ip });
    }
    if (records && question.type === "MX") {
      for (const mx of records.MX ?? []) answers.push({ type: "MX", name: question.name, ttl: 60, class: "IN", data: mx });
    }
    const response = dnsPacket.encode({
      type: "response",
      id: query.id,
      flags: dnsPacket.AUTHORITATIVE_ANSWER | (records ? 0 : 3), // rcode 3 = NXDOMAIN
      questions: query.questions,
      answers,
    });
    socket.send(response, remote.port, remote.address);
  });
  await new Promise<void>((resolve) => socket.bind(0, "127.0.0.1", resolve));
  return {
    address: `127.0.0.1:${socket.address().port}`,
    queries,
    close: () => new Promise((resolve) => socket.close(() => resolve())),
  };
}

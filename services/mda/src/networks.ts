import { BlockList, isIPv4, isIPv6 } from "node:net";

/** Builds the allow-list of client networks; throws on an entry that is not an address or CIDR. */
export function networkList(entries: string[]): BlockList {
  const list = new BlockList();
  for (const entry of entries) {
    const [address, bits] = entry.split("/") as [string, string | undefined];
    const family = isIPv4(address) ? "ipv4" : isIPv6(address) ? "ipv6" : null;
    const prefix = bits === undefined ? (family === "ipv4" ? 32 : 128) : Number(bits);
    if (!family || !Number.isInteger(prefix) || prefix < 0 || prefix > (family === "ipv4" ? 32 : 128)) {
      throw new Error(`not an address or network: ${entry}`);
    }
    list.addSubnet(address, prefix, family);
  }
  return list;
}

/** Whether a client address is inside the list (IPv4-mapped IPv6 counts as IPv4). */
export function allowedClient(list: BlockList, remoteAddress: string): boolean {
  const address = remoteAddress.replace(/^::ffff:(?=\d+\.\d+\.\d+\.\d+$)/i, "");
  if (isIPv4(address)) return list.check(address, "ipv4");
  if (isIPv6(address)) return list.check(address, "ipv6");
  return false;
}

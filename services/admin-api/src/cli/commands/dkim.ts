import { activateDomainDkimKey, createDomainDkimKey, getDomainDkimRecords, isDkimAlgorithm, type DkimDnsRecord } from "@mailstack/dkim";
import { parse } from "../args.ts";
import { register, UsageError } from "../registry.ts";

function printRecord(heading: string, record: DkimDnsRecord, out: (line: string) => void): void {
  out(`${heading}: DKIM ${record.algorithm} key for ${record.domain}, selector ${record.selector}. Its TXT record:`);
  out("");
  out(`  name:  ${record.name}`);
  out(`  value: ${record.value}`);
  out("");
  out("As a zone file line:");
  out(record.zoneLine);
}

register({
  name: "domain dkim",
  usage:
    "domain dkim DOMAIN [--selector S] [--algorithm rsa-sha256|ed25519-sha256] [--now] | domain dkim DOMAIN --activate | domain dkim DOMAIN --show",
  async run(args, { pool, out }) {
    const { values, positionals } = parse(
      args,
      { selector: { type: "string" }, algorithm: { type: "string" }, now: { type: "boolean" }, show: { type: "boolean" }, activate: { type: "boolean" } },
      { min: 1, max: 1 },
    );
    const domain = positionals[0]!;
    const creates = values.selector !== undefined || values.algorithm !== undefined || values.now;
    if (values.show && values.activate) throw new UsageError("--show and --activate go alone");
    if ((values.show || values.activate) && creates) throw new UsageError(`--${values.show ? "show" : "activate"} takes no other option`);
    if (values.show) {
      const { current, pending } = await getDomainDkimRecords(pool, domain);
      if (!current) {
        out(`${domain} has no DKIM key; create one with: mailctl domain dkim ${domain}`);
        return;
      }
      printRecord("Current (the msa signs with it)", current, out);
      if (pending) {
        out("");
        printRecord("Pending (publish it, then: mailctl domain dkim " + current.domain + " --activate)", pending, out);
      }
      return;
    }
    if (values.activate) {
      const { record, replaced } = await activateDomainDkimKey(pool, domain);
      out(`Activated selector ${record.selector}: the msa signs ${record.domain}'s mail with it within DKIM_KEY_CACHE (30 s by default).`);
      if (replaced) {
        out(`Keep the record of the replaced key (${replaced.name}) published for a few days, for mail signed with it that is still`);
        out("in transit or read later, then remove it from DNS.");
      }
      return;
    }
    const algorithm = values.algorithm ?? "rsa-sha256";
    if (!isDkimAlgorithm(algorithm)) throw new UsageError(`unknown algorithm: ${algorithm} (rsa-sha256 or ed25519-sha256)`);
    const created = await createDomainDkimKey(pool, domain, {
      algorithm,
      ...(values.selector !== undefined ? { selector: values.selector } : {}),
      ...(values.now ? { activateNow: true } : {}),
    });
    const { record } = created;
    if (created.state === "pending") {
      printRecord("New key, pending", record, out);
      out("");
      out(`The msa goes on signing with the current key. Publish this record next to the current one, check it`);
      out(`(dig +short TXT ${record.name}), then switch with: mailctl domain dkim ${record.domain} --activate`);
      return;
    }
    printRecord("New key, signing now", record, out);
    out("");
    out("The msa signs with it within DKIM_KEY_CACHE (30 s by default): publish the record now, since receivers");
    out("can verify the signatures only once it is in DNS.");
    if (created.replaced) out(`Keep the replaced key's record (${created.replaced.name}) published for a few days, then remove it.`);
  },
});

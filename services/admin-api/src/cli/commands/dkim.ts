import { createDomainDkimKey, getDomainDkimRecord, isDkimAlgorithm, type DkimDnsRecord } from "@mailstack/dkim";
import { parse } from "../args.ts";
import { register, UsageError } from "../registry.ts";

function printRecord(record: DkimDnsRecord, out: (line: string) => void): void {
  out(`DKIM ${record.algorithm} key for ${record.domain}, selector ${record.selector}. Publish this TXT record:`);
  out("");
  out(`  name:  ${record.name}`);
  out(`  value: ${record.value}`);
  out("");
  out("As a zone file line:");
  out(record.zoneLine);
}

register({
  name: "domain dkim",
  usage: "domain dkim DOMAIN [--selector S] [--algorithm rsa-sha256|ed25519-sha256] | domain dkim DOMAIN --show",
  async run(args, { pool, out }) {
    const { values, positionals } = parse(
      args,
      { selector: { type: "string" }, algorithm: { type: "string" }, show: { type: "boolean" } },
      { min: 1, max: 1 },
    );
    const domain = positionals[0]!;
    if (values.show) {
      if (values.selector !== undefined || values.algorithm !== undefined) throw new UsageError("--show takes no other option");
      const record = await getDomainDkimRecord(pool, domain);
      if (!record) {
        out(`${domain} has no DKIM key; create one with: mailctl domain dkim ${domain}`);
        return;
      }
      printRecord(record, out);
      return;
    }
    const algorithm = values.algorithm ?? "rsa-sha256";
    if (!isDkimAlgorithm(algorithm)) throw new UsageError(`unknown algorithm: ${algorithm} (rsa-sha256 or ed25519-sha256)`);
    const record = await createDomainDkimKey(pool, domain, { algorithm, ...(values.selector !== undefined ? { selector: values.selector } : {}) });
    printRecord(record, out);
    out("");
    out("The msa signs with the new key within DKIM_KEY_CACHE (30 s by default); publish the record first.");
  },
});

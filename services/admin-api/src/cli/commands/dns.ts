import { domainDnsRecords } from "@mailstack/admin-ops";
import { defaultMailHostname } from "@mailstack/config";
import { DirectoryError, getDomain } from "@mailstack/db";
import { parse } from "../args.ts";
import { register } from "../registry.ts";

register({
  name: "domain dns",
  usage: "domain dns DOMAIN [--mx HOST]   (the MX, SPF, DKIM and DMARC records to publish; HOST defaults to MAIL_HOSTNAME)",
  async run(args, { pool, out, env }) {
    const { values, positionals } = parse(args, { mx: { type: "string" } }, { min: 1, max: 1 });
    const domain = await getDomain(pool, positionals[0]!);
    if (!domain) throw new DirectoryError("not-found", `no such domain: ${positionals[0]}`);
    const policy = env.DMARC_POLICY === "none" || env.DMARC_POLICY === "reject" ? env.DMARC_POLICY : "quarantine";
    const records = await domainDnsRecords(pool, domain.name, { mxHost: values.mx ?? env.MAIL_HOSTNAME ?? defaultMailHostname(), dmarcPolicy: policy });
    for (const r of records) {
      // Zone files carry TXT data as strings of at most 255 characters (a DKIM key is longer).
      const strings = r.value.match(/.{1,255}/g) ?? [""];
      const value = r.type === "MX" ? `${r.priority} ${r.value}.` : strings.length > 1 ? `( ${strings.map((x) => `"${x}"`).join(" ")} )` : `"${r.value}"`;
      out(`${r.name}.\t3600\tIN\t${r.type}\t${value}`);
    }
  },
});

import { getDomainDkimRecords } from "@mailstack/dkim";
import type { Queryable } from "@mailstack/db";

export interface DnsRecord {
  purpose: "mx" | "spf" | "dkim" | "dmarc";
  type: "MX" | "TXT";
  /** Owner name, without the trailing dot. */
  name: string;
  value: string;
  /** MX preference; absent for TXT. */
  priority?: number;
}

export interface DnsRecordOptions {
  /** The host that receives mail for the domain (its MX target): MAIL_HOSTNAME. */
  mxHost: string;
  dmarcPolicy?: "none" | "quarantine" | "reject";
}

/**
 * The records an operator publishes for a served domain: MX, SPF, DKIM (when the domain has a
 * key, and its pending key's during a rotation; the records come from @mailstack/dkim, as
 * `mailctl domain dkim` prints them) and DMARC.
 */
export async function domainDnsRecords(db: Queryable, domain: string, options: DnsRecordOptions): Promise<DnsRecord[]> {
  const dkim = await getDomainDkimRecords(db, domain);
  const mxHost = options.mxHost.replace(/\.$/, "");
  const records: DnsRecord[] = [
    { purpose: "mx", type: "MX", name: domain, value: mxHost, priority: 10 },
    { purpose: "spf", type: "TXT", name: domain, value: "v=spf1 mx -all" },
  ];
  // During a key rotation both records are published: the pending key's before it signs.
  for (const record of [dkim.current, dkim.pending]) if (record) records.push({ purpose: "dkim", type: "TXT", name: record.name, value: record.value });
  records.push({
    purpose: "dmarc",
    type: "TXT",
    name: `_dmarc.${domain}`,
    value: `v=DMARC1; p=${options.dmarcPolicy ?? "quarantine"}; rua=mailto:postmaster@${domain}`,
  });
  return records;
}

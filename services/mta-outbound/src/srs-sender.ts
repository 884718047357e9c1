import { isLocalDomain, type Pool } from "@mailstack/db";
import { splitAddress, srsForward, type SrsSettings } from "@mailstack/mail";

/** What the relay knows of a job that decides its MAIL FROM. */
export interface SenderFacts {
  /** The message's envelope sender; '' for <>. */
  envelopeFrom: string;
  receivedAt: Date;
  /** The job's deliveries: the RCPT TO address each came from and where it goes. */
  deliveries: Array<{ recipient: string; final_recipient: string }>;
}

/**
 * The MAIL FROM a relay job uses (docs/srs.md). With SRS on, mail this system forwards (a
 * remote delivery whose recipient an alias or an SRS address turned into another address) from
 * a sender outside the domains we serve goes with the sender's SRS form, so the destination's
 * SPF check sees our domain; anything else goes with the envelope sender as it is. The SRS
 * address is stamped with the day the message was accepted, so every attempt of the job sends
 * the same address (a rotated first secret signs a different, equally valid one).
 */
export function createSenderRewriter(pool: Pool, srs: SrsSettings | null): (facts: SenderFacts) => Promise<string> {
  return async ({ envelopeFrom, receivedAt, deliveries }) => {
    if (!srs || envelopeFrom === "") return envelopeFrom;
    if (!deliveries.some((d) => d.recipient !== d.final_recipient)) return envelopeFrom;
    const { domain } = splitAddress(envelopeFrom);
    if (domain === srs.domain || (await isLocalDomain(pool, domain))) return envelopeFrom;
    // Null: the SRS form would be no valid address (over 64 octets); the sender goes as it is.
    return srsForward(srs, envelopeFrom, receivedAt) ?? envelopeFrom;
  };
}

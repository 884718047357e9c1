import type { SMTPServerSession } from "smtp-server";
import type { Bus } from "@mailstack/bus";
import { DirectoryCache, resolveRecipient, type Pool } from "@mailstack/db";
import { createSigningPool, loadDkimKeys, type DkimSigningKey } from "@mailstack/dkim";
import { Replies, addressKey, reply, splitAddress, type SmtpReply } from "@mailstack/mail";
import { startSweeper, type AcceptedMessage } from "@mailstack/queue";
import {
  createIntakeServer, SmtpError, withoutOurResults, type IncomingMessage, type IntakeLimits, type IntakeServer, type IntakeSession, type TransformResult,
} from "@mailstack/smtp-intake";
import { Counter, registry, type Logger } from "@mailstack/telemetry";
import { createAuthenticator, pruneCounters, type AuthLimits, type ConnectionAuthState, type SubmissionUser } from "./auth.ts";
import { fixMessage } from "./fixup.ts";
import { createSubmissionLimiter, type SubmissionLimits, type Usage } from "./limits.ts";
import { popBeforeSmtpAccounts } from "./pop-before-smtp.ts";
import { ownedAddresses } from "./rights.ts";
import { installStrictSasl, onSaslRefused } from "./sasl.ts";

export interface MsaSettings {
  /** Our host name: greeting, Received:, generated Message-IDs. */
  hostname: string;
  listen: string;
  submissionPort: number;
  submissionsPort: number;
  /** Offer AUTH on 587 before STARTTLS. */
  authBeforeTls: boolean;
  banner?: string;
  /** Where mail to postmaster goes (SMTP_POSTMASTER); postmaster@hostname when empty. */
  postmaster?: string;
  intake: Partial<IntakeLimits>;
  auth: AuthLimits;
  submission: SubmissionLimits;
  popBeforeSmtp: { enabled: boolean; windowMs: number };
  /** How long a domain's DKIM key (or its absence) is cached; a new key is used after at most this long. */
  dkimKeyCacheMs: number;
  /** Worker threads for DKIM signing (0: sign on the event loop). */
  dkimSignThreads?: number;
  /** The sweeper that republishes deliveries committed but never dispatched (a crash between commit and publish). */
  sweep: { intervalMs: number; undispatchedAfterMs: number };
}

export interface MsaOptions {
  pool: Pool;
  bus: Bus;
  logger: Logger;
  settings: MsaSettings;
  tls: { key: string | Buffer; cert: string | Buffer };
  /** Called after each commit (tests). */
  onAccepted?: (accepted: AcceptedMessage) => void;
}

export interface Msa {
  submissionPort: number;
  submissionsPort: number;
  /** Serves a renewed certificate on both ports from the next handshake on. */
  updateTls(tls: { key: string | Buffer; cert: string | Buffer }): void;
  stop(): Promise<void>;
}

export const MsaReplies = {
  nullSender: reply(553, "5.7.1", "The null sender <> cannot be used for submission"),
  messageRate: reply(451, "4.7.1", "Message rate limit exceeded for this account, try again later"),
  recipientRate: reply(451, "4.7.1", "Recipient rate limit exceeded for this account, try again later"),
  signingFailed: reply(451, "4.3.0", "Temporary local problem (DKIM signing), please try again later"),
};

const metrics = {
  auth: new Counter({ name: "msa_auth_total", help: "AUTH attempts by result", labelNames: ["result"] as const, registers: [registry] }),
  refused: new Counter({
    name: "msa_refused_total",
    help: "Submissions refused by the msa's own policy, by reason",
    labelNames: ["reason"] as const,
    registers: [registry],
  }),
  signed: new Counter({ name: "msa_dkim_signed_total", help: "Messages DKIM-signed", registers: [registry] }),
};

interface Identity {
  user: SubmissionUser;
  /** The lookup keys (addressKey) of the addresses the account may send as. */
  owned: Set<string>;
}

interface SessionState {
  auth: ConnectionAuthState;
  /** Set by AUTH. */
  identity: Identity | null;
  /** The identity, usage and counted recipients of the current transaction (set at MAIL). */
  transaction: { identity: Identity; usage: Usage; recipients: number } | null;
}

/**
 * The message submission agent: smtp-intake on 587 (STARTTLS) and 465 (implicit TLS) with
 * AUTH, submission rights, per-account limits, message fixing and DKIM signing as hooks.
 */
export async function startMsa(options: MsaOptions): Promise<Msa> {
  const { pool, bus, logger, settings } = options;
  installStrictSasl();
  const authenticator = createAuthenticator(pool, logger, settings.auth);
  const signer = createSigningPool(settings.dkimSignThreads ?? 0);
  const limiter = createSubmissionLimiter(pool, settings.submission, {
    onFlushError: (error) => logger.warn({ err: error }, "could not write submission counts; kept for the next write"),
  });
  // Recipient lookups from memory for both ports, kept true by the directory's notifications.
  const directory = new DirectoryCache(pool);
  const sessions = new WeakMap<SMTPServerSession, SessionState>();
  // What to count once a message is committed, by queue id.
  const toCount = new Map<string, { accountId: number; recipients: number }>();

  const stateOf = (session: IntakeSession | SMTPServerSession): SessionState => {
    const raw = "raw" in session ? session.raw : session;
    let state = sessions.get(raw);
    if (!state) {
      state = { auth: { failures: 0 }, identity: null, transaction: null };
      sessions.set(raw, state);
    }
    return state;
  };

  const identityFor = async (state: SessionState, session: IntakeSession, sender: string): Promise<Identity | null> => {
    // The library forgets the login at STARTTLS (RFC 3207 4.2); so does this.
    if (!session.user) state.identity = null;
    if (state.identity) return state.identity;
    if (!settings.popBeforeSmtp.enabled) return null;
    // POP-before-SMTP: an account that recently logged in over POP3 from this address and owns the sender.
    for (const account of await popBeforeSmtpAccounts(pool, session.clientIp, settings.popBeforeSmtp.windowMs)) {
      const owned = await ownedAddresses(pool, account.id);
      if (owned.has(addressKey(sender))) return { user: { accountId: account.id, username: account.address }, owned };
    }
    return null;
  };

  // Signing keys by domain (null: no key), kept briefly so a busy domain costs no query per message.
  const keyCache = new Map<string, { key: DkimSigningKey | null; until: number }>();
  const dkimKeys = async (domains: string[]): Promise<DkimSigningKey[]> => {
    const now = Date.now();
    const missing = domains.filter((domain) => (keyCache.get(domain)?.until ?? 0) <= now);
    if (missing.length > 0) {
      const loaded = await loadDkimKeys(pool, missing);
      if (keyCache.size > 10_000) keyCache.clear();
      for (const domain of missing) {
        keyCache.set(domain, { key: loaded.find((k) => k.domain === domain) ?? null, until: now + settings.dkimKeyCacheMs });
      }
    }
    return domains.map((domain) => keyCache.get(domain)?.key).filter((key): key is DkimSigningKey => !!key);
  };

  function refuse(reason: string, r: SmtpReply): never {
    metrics.refused.inc({ reason });
    throw new SmtpError(r);
  }

  const hooks = {
    auth: {
      required: !settings.popBeforeSmtp.enabled,
      allowInsecure: settings.authBeforeTls,
      // With POP-before-SMTP, clients without a recent POP3 login keep the bound on commands before AUTH.
      ...(settings.popBeforeSmtp.enabled
        ? { allowedWithoutLogin: async (session: IntakeSession) => (await popBeforeSmtpAccounts(pool, session.clientIp, settings.popBeforeSmtp.windowMs)).length > 0 }
        : {}),
      async authenticate({ username, password, session }: { username: string; password: string; session: IntakeSession }) {
        const state = stateOf(session);
        const outcome = await authenticator.authenticate(username, password, session.clientIp, state.auth);
        if (!outcome.ok) {
          metrics.auth.inc({ result: outcome.result });
          throw new SmtpError(outcome.reply);
        }
        metrics.auth.inc({ result: "ok" });
        state.identity = { user: outcome.user, owned: await ownedAddresses(pool, outcome.user.accountId) };
        return outcome.user.username;
      },
    },

    async validateSender(sender: string, session: IntakeSession): Promise<void> {
      const state = stateOf(session);
      state.transaction = null;
      const identity = await identityFor(state, session, sender);
      if (!identity) refuse("no-auth", Replies.authRequired);
      if (sender === "") refuse("null-sender", MsaReplies.nullSender);
      if (!identity.owned.has(addressKey(sender))) refuse("sender-not-owned", Replies.senderNotOwned);
      const usage = await limiter.usage(identity.user.accountId);
      if (!limiter.messageAllowed(usage)) refuse("message-rate", MsaReplies.messageRate);
      state.transaction = { identity, usage, recipients: 0 };
    },

    async resolveRecipient(address: string, session: IntakeSession) {
      const transaction = stateOf(session).transaction;
      if (!transaction) throw new SmtpError(Replies.badSequence);
      if (!limiter.recipientAllowed(transaction.usage, transaction.recipients)) refuse("recipient-rate", MsaReplies.recipientRate);
      // Routing per DESIGN.md rule 5: local accounts and aliases become local deliveries, the rest remote.
      const resolution = await resolveRecipient(pool, address, { allowRemote: true, lookup: (a) => directory.lookup(a) });
      if (resolution.ok) transaction.recipients++;
      return resolution;
    },

    async transformMessage(message: IncomingMessage): Promise<TransformResult> {
      const transaction = stateOf(message.session).transaction;
      if (!transaction) throw new SmtpError(Replies.badSequence);
      const { identity } = transaction;
      // A submission is mail from outside our checks too: no result may claim to be ours (RFC 8601 5).
      const fixed = fixMessage(withoutOurResults(message.raw, settings.hostname), {
        user: identity.user.username,
        owned: identity.owned,
        envelopeFrom: message.sender,
        defaultDomain: splitAddress(identity.user.username).domain,
        hostname: settings.hostname,
      });
      if (!fixed.ok) refuse(fixed.reply.code === 553 ? "from-not-owned" : "bad-header", fixed.reply);
      let raw = fixed.message;
      const domains = [...new Set(fixed.fromAddresses.map((address) => splitAddress(address).domain))];
      try {
        const keys = await dkimKeys(domains);
        if (keys.length > 0) {
          raw = Buffer.concat([Buffer.from(await signer.sign(raw, keys), "latin1"), raw]);
          metrics.signed.inc();
        }
      } catch (error) {
        logger.error({ err: error, domains, queueId: message.queueId }, "DKIM signing failed");
        refuse("dkim", MsaReplies.signingFailed);
      }
      toCount.set(message.queueId, { accountId: identity.user.accountId, recipients: message.recipients.length });
      if (toCount.size > 10_000) toCount.delete(toCount.keys().next().value!);
      logger.debug({ queueId: message.queueId, changes: fixed.changes, signed: domains }, "submission fixed");
      return { raw };
    },

    onAccepted(accepted: AcceptedMessage): void {
      const count = toCount.get(accepted.queueId);
      if (count) {
        toCount.delete(accepted.queueId);
        limiter.record(count.accountId, count.recipients);
      }
      options.onAccepted?.(accepted);
    },
  };

  const common = {
    directory,
    service: "msa",
    source: "submission" as const,
    pool,
    bus,
    logger,
    hostname: settings.hostname,
    host: settings.listen,
    tls: options.tls,
    limits: settings.intake,
    ...(settings.banner ? { banner: settings.banner } : {}),
    ...(settings.postmaster ? { postmaster: settings.postmaster } : {}),
    ...hooks,
  };
  const servers: IntakeServer[] = [
    createIntakeServer({ ...common, port: settings.submissionPort, tlsMode: "starttls" }),
    createIntakeServer({ ...common, port: settings.submissionsPort, tlsMode: "implicit" }),
  ];
  for (const server of servers) {
    onSaslRefused(server.server, async (session, refusal, reason) => {
      const outcome = await authenticator.refuse(refusal, reason, session.remoteAddress, stateOf(session).auth);
      metrics.auth.inc({ result: outcome.result });
      return outcome.reply;
    });
  }
  await directory.start();
  const [submissionPort, submissionsPort] = [await servers[0]!.listen(), await servers[1]!.listen()];

  // Old counter windows are removed now and then (every replica may do it; the deletes are idempotent).
  const keepMs = Math.max(settings.auth.windowMs, settings.submission.windowMs) * 2;
  const pruner = setInterval(() => {
    pruneCounters(pool, keepMs).catch((error) => logger.warn({ err: error }, "could not prune counters"));
  }, 600_000);
  pruner.unref();

  const sweeper = startSweeper(bus, pool, logger, settings.sweep.intervalMs, { undispatchedAfterMs: settings.sweep.undispatchedAfterMs });
  logger.info({ submissionPort, submissionsPort }, "msa listening");
  return {
    submissionPort,
    submissionsPort,
    updateTls(tls) {
      for (const server of servers) server.updateTls(tls);
    },
    async stop() {
      clearInterval(pruner);
      await Promise.all(servers.map((server) => server.stop()));
      await limiter.flush().catch((error) => logger.warn({ err: error }, "could not write the last submission counts"));
      await directory.stop();
      await sweeper.stop();
      await signer.close();
    },
  };
}

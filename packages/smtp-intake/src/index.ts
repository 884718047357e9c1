/**
 * @mailstack/smtp-intake: the SMTP server side shared by mta-inbound (port 25) and msa
 * (587/465). One call, `createIntakeServer(options)`, gives an smtp-server instance with
 * mailstack's policy; the service only adds its hooks.
 *
 * ```ts
 * const intake = createIntakeServer({
 *   service: "msa", source: "submission", pool, bus, logger,
 *   hostname: config.MAIL_HOSTNAME, port: 587, tlsMode: "starttls", tls: { key, cert },
 *   limits: limitsFromConfig(config),                  // env: intakeShape (SMTP_*)
 *   auth: { required: true, authenticate: async ({ username, password }) => user | null },
 *   allowRemote: (session) => session.user !== null,   // MSA relays for its users; inbound: false
 *   validateSender: async (sender, session) => { if (!owned) throw new SmtpError(Replies.senderNotOwned); },
 *   transformMessage: async (message) => ({ raw: withDateMessageIdAndDkim(message.raw) }),
 * });
 * await intake.listen();            // resolves with the bound port (port 0 in tests)
 * await intake.stop();              // stop accepting, finish messages in DATA (other commands: 421), wait for commits
 * ```
 *
 * The contract:
 * - TLS: `tlsMode` 'starttls' (plain, STARTTLS offered), 'implicit' (TLS from the first
 *   byte) or 'none'. AUTH is offered only when `auth` is given (PLAIN, LOGIN), only after
 *   STARTTLS unless `auth.allowInsecure`; bad credentials get 535 5.7.8; with
 *   `auth.required`, MAIL/RCPT/DATA before AUTH get 530.
 * - EHLO advertises PIPELINING, SIZE <limit>, 8BITMIME, SMTPUTF8, ENHANCEDSTATUSCODES, DSN
 *   (and STARTTLS/AUTH as above). Every reply carries an enhanced status code.
 * - MAIL FROM: the sender is parsed with @mailstack/mail (bad syntax 553 5.1.7), then
 *   `validateSender(sender, session)` runs; '' is the null sender. SIZE= over the limit: 552.
 *   Parameters other than SIZE, BODY, SMTPUTF8, RET, ENVID (and AUTH where offered) or NOTIFY,
 *   ORCPT are 555 5.5.4; malformed xtext in ENVID/ORCPT/AUTH is 501 5.5.4 (params.ts).
 * - RCPT TO: relay tricks (user%host@, host!user@, @route:, "a@b"@, IP literals) are
 *   554 5.7.1; then `resolveRecipient(address, session)` (default: the directory's
 *   resolveRecipient with `allowRemote`) decides: relay-denied 554 5.7.1, unknown 550 5.1.1,
 *   disabled 550 5.2.1, alias loop 550 5.4.6. Aliases fan out and merge here; a recipient
 *   given twice is one delivery: one of ours however its local part is cased (our mailboxes
 *   are case-insensitive), a remote one when written the same (RFC 5321 2.4: `A@r` and `a@r`
 *   may be two mailboxes). A recipient given again is accepted again, not routed again
 *   (`resolveRecipient` is not asked), stays as first given (form, NOTIFY, ORCPT), counts once.
 *   Sender and recipients keep their local part's case as given, to be stored and relayed
 *   so. More than maxRecipients distinct recipients: 452 4.5.3. NOTIFY and ORCPT
 *   are kept per recipient, RET and ENVID per message. `<postmaster>`, and postmaster at a
 *   served domain without such an address, go to `postmaster` (RFC 5321 4.5.1).
 * - DATA with no accepted recipient is 554 5.5.1 and the connection is closed, so a
 *   pipelined body can never run as commands. Command lines ending in a bare LF are 500
 *   5.5.2 and change nothing. TURN/SEND/SOML/SAML/EXPN are 502 5.5.1, VRFY 252.
 * - The body: over the size limit 552 5.3.4 after the final dot (nothing stored); past the
 *   memory budget shared by all sessions (maxBufferedBytes) 452 4.3.1; bare CR
 *   or LF are rejected 550 5.6.11 (or normalised to CRLF with bareLineEndings 'normalize');
 *   NUL bytes 554 5.6.0; 8-bit headers without SMTPUTF8 550 5.6.7; 100 or more Received:
 *   fields (a mail loop, RFC 5321 6.3) 554 5.4.6. Only "\r\n.\r\n" ends
 *   DATA (the library), so no smuggled second message. The whole DATA phase has an absolute
 *   deadline (dataTimeoutMs, then 421 4.4.2).
 * - `transformMessage(message)` sees the message as received and may replace it, choose a
 *   folder for local deliveries (DMARC quarantine → 'Junk'), attach auth results for the
 *   messages row, or throw SmtpError to refuse (DMARC reject 550 5.7.1).
 * - A message whose first line is not a header field gets an empty header section first.
 * - A Received: header with the queue id and `(trace <trace id>)` is prepended; then the
 *   message, its deliveries and their `accepted` events are committed in one transaction
 *   (group-committed with concurrent accepts) and only then is 250 sent; dispatch to NATS
 *   follows the commit (the sweeper repairs a lost dispatch). PostgreSQL failing, or NATS
 *   being disconnected when the message arrives: 451 4.3.0 with nothing stored.
 * - Bounds: maxClients overall and maxClientsPerIp (421 4.7.0), maxCommands per session
 *   (421 4.7.0), command line length (maxLineLength, 421), idle timeout, greeting delay
 *   (early talkers get 421; 0 = off, a setting through our smtp-server patch), reverse DNS
 *   off unless configured.
 */
export { addressReply, createIntakeServer, defaultLimits, SmtpError } from "./server.ts";
export type { AcceptedRecipient, IncomingMessage, IntakeLimits, IntakeOptions, IntakeServer, IntakeSession, TransformResult } from "./server.ts";
export { intakeShape, limitsFromConfig, type IntakeConfig } from "./config.ts";
export { AcceptBatcher, type AcceptBatcherOptions } from "./batcher.ts";
export { BodyScanner, hasBareLineEnding, headerValue, normalizeLineEndings, withHeaderSection, withoutOurResults } from "./body.ts";
export { checkParameters } from "./params.ts";
export { GuardReplies, guardCommands, refuseArguments, refuseBareLf, refuseEmptyData, type CommandGuard, type GuardedConnection } from "./guard.ts";
export { receivedHeader, rfc5322Date, type ReceivedFields } from "./received.ts";

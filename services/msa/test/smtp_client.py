# Scenarios driven by the msa tests with Debian's Python smtplib (/usr/bin/python3).
# Usage: smtp_client.py SCENARIO PORT [ARGS...]; prints one JSON object.
import base64, json, smtplib, ssl, sys

scenario, port = sys.argv[1], int(sys.argv[2])
args = sys.argv[3:]
context = ssl.create_default_context()
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
b64 = lambda s: base64.b64encode(s.encode()).decode()
out = {}

def starttls():
    s = smtplib.SMTP("127.0.0.1", port, timeout=20)
    s.ehlo("client.test")
    s.starttls(context=context)
    s.ehlo("client.test")
    return s

if scenario == "ehlo":
    s = smtplib.SMTP("127.0.0.1", port, timeout=20)
    s.ehlo("client.test")
    out["before_tls"] = s.esmtp_features.get("auth")
    out["starttls"] = s.has_extn("starttls")
    code, msg = s.docmd("AUTH", "PLAIN " + b64("\0x@y\0z"))
    out["auth_cmd_before_tls"] = [code, msg.decode()]
    s.starttls(context=context)
    s.ehlo("client.test")
    out["after_tls"] = s.esmtp_features.get("auth")
    out["features"] = sorted(s.esmtp_features.keys())
    s.quit()
elif scenario == "mail-before-auth":
    s = starttls()
    code, msg = s.mail("alice@example.test")
    out["mail"] = [code, msg.decode()]
    s.quit()
elif scenario == "malformed":
    # Each refusal counts as a failed login: the third on a connection is 421, so two per connection.
    s = starttls()
    out["plain_bad_base64"] = [c for c in [s.docmd("AUTH", "PLAIN !!!notbase64")[0]]]
    out["plain_missing_part"] = s.docmd("AUTH", "PLAIN " + b64("alice@example.test\0secret"))[0]
    s.quit()
    s = starttls()
    out["plain_missing_password"] = list(s.docmd("AUTH", "PLAIN " + b64("\0alice@example.test\0")))
    out["plain_other_authzid"] = list(s.docmd("AUTH", "PLAIN " + b64("bob@example.test\0alice@example.test\0whatever")))
    s.quit()
    s = starttls()
    code, _ = s.docmd("AUTH", "LOGIN")
    out["login_prompt"] = code
    out["login_bad_username"] = list(s.docmd("bm90 YmFzZTY0"))
    out["still_open"] = s.noop()[0]
    s.quit()
    out = {k: (v if not isinstance(v, list) else [x.decode() if isinstance(x, bytes) else x for x in v]) for k, v in out.items()}
elif scenario == "wrong-password":
    user, password = args[0], args[1]
    s = starttls()
    codes = []
    for _ in range(4):
        try:
            code, msg = s.docmd("AUTH", "PLAIN " + b64("\0" + user + "\0" + password))
            codes.append([code, msg.decode()])
        except smtplib.SMTPServerDisconnected:
            codes.append("disconnected")
            break
    out["attempts"] = codes
elif scenario == "submit":
    # submit PORT MODE USER PASSWORD FROM TO[,TO...] < message
    mode, user, password, sender, rcpts = args[0], args[1], args[2], args[3], args[4].split(",")
    data = sys.stdin.buffer.read()
    if mode == "implicit":
        s = smtplib.SMTP_SSL("127.0.0.1", port, timeout=20, context=context)
        s.ehlo("client.test")
    else:
        s = starttls()
    try:
        s.login(user, password)
        out["login"] = "ok"
        refused = s.sendmail(sender, rcpts, data)
        out["result"] = "sent"
        out["refused"] = {k: [v[0], v[1].decode()] for k, v in refused.items()}
    except smtplib.SMTPResponseException as e:
        out["result"] = "error"
        out["code"] = e.smtp_code
        out["message"] = e.smtp_error.decode()
    except smtplib.SMTPRecipientsRefused as e:
        out["result"] = "recipients-refused"
        out["refused"] = {k: [v[0], v[1].decode()] for k, v in e.recipients.items()}
    try:
        s.quit()
    except Exception:
        pass
elif scenario == "noauth-submit":
    # noauth-submit PORT FROM TO < message: STARTTLS, no AUTH (POP-before-SMTP)
    sender, rcpt = args[0], args[1]
    s = starttls()
    out["ehlo_auth"] = s.esmtp_features.get("auth")
    try:
        s.sendmail(sender, [rcpt], sys.stdin.buffer.read())
        out["result"] = "sent"
    except smtplib.SMTPResponseException as e:
        out["result"] = "error"
        out["code"] = e.smtp_code
        out["message"] = e.smtp_error.decode()
    s.quit()
elif scenario == "plain-auth":
    # plain-auth PORT USER PASSWORD: AUTH without TLS (allowed only when configured)
    s = smtplib.SMTP("127.0.0.1", port, timeout=20)
    s.ehlo("client.test")
    out["ehlo_auth"] = s.esmtp_features.get("auth")
    code, msg = s.docmd("AUTH", "PLAIN " + b64("\0" + args[0] + "\0" + args[1]))
    out["auth"] = [code, msg.decode()]
    s.quit()
elif scenario == "plain-auth-tls":
    # plain-auth-tls PORT USER PASSWORD: AUTH PLAIN after STARTTLS, reply only
    s = starttls()
    code, msg = s.docmd("AUTH", "PLAIN " + b64("\0" + args[0] + "\0" + args[1]))
    out["auth"] = [code, msg.decode()]
    s.quit()
elif scenario == "dsn-submit":
    # dsn-submit PORT USER PASSWORD FROM TO < message, with ENVID/RET and NOTIFY/ORCPT
    user, password, sender, rcpt = args
    s = starttls()
    s.login(user, password)
    s.sendmail(sender, [rcpt], sys.stdin.buffer.read(), mail_options=["RET=HDRS", "ENVID=env-42"], rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;" + rcpt])
    out["result"] = "sent"
    s.quit()
elif scenario == "compose":
    # compose PORT USER PASSWORD TO < JSON [[subject, name, address, policy], ...]: each message
    # built by Python's email package (headerregistry.Address; policy "smtp" or "smtputf8", or
    # "formataddr" for email.utils.formataddr) and sent with send_message in one session
    from email.message import EmailMessage
    from email.headerregistry import Address
    from email.utils import formataddr
    from email import policy
    user, password, rcpt = args
    s = starttls()
    s.login(user, password)
    results = {}
    for subject, name, address, kind in json.loads(sys.stdin.read()):
        m = EmailMessage(policy=policy.SMTPUTF8 if kind == "smtputf8" else policy.SMTP)
        local, domain = address.rsplit("@", 1)
        m["From"] = formataddr((name, address)) if kind == "formataddr" else Address(name, local, domain)
        m["To"] = rcpt
        m["Subject"] = subject
        m.set_content("composed by the email package\n")
        try:
            # send_message asks for SMTPUTF8 itself only when an envelope address is not ASCII.
            utf8_header = kind == "smtputf8" and (address + rcpt).isascii()
            s.send_message(m, from_addr=address, to_addrs=[rcpt], mail_options=["SMTPUTF8"] if utf8_header else [])
            results[subject] = {"result": "sent"}
        except smtplib.SMTPResponseException as e:
            results[subject] = {"result": "error", "code": e.smtp_code, "message": e.smtp_error.decode()}
            s.rset()
    out["results"] = results
    s.quit()
print(json.dumps(out))

"""Drives mailstack's POP3 server with Python's poplib; prints what it saw as JSON."""
import base64, json, poplib, ssl, sys

host, port, mode, cafile, user, password = sys.argv[1:7]
delete = sys.argv[7:] and sys.argv[7] == "dele-all"
context = ssl.create_default_context(cafile=cafile)
context.check_hostname = False  # the test certificate names localhost; we connect to 127.0.0.1 by IP
if mode == "ssl":
    pop = poplib.POP3_SSL(host, int(port), context=context, timeout=30)
else:
    pop = poplib.POP3(host, int(port), timeout=30)
out = {"welcome": pop.getwelcome().decode()}
out["capa_before"] = sorted(pop.capa().keys())
if mode == "stls":
    pop.stls(context)
    out["capa_after"] = sorted(pop.capa().keys())
pop.user(user)
pop.pass_(password)
count, size = pop.stat()
out["stat"] = [count, size]
out["list"] = [line.decode() for line in pop.list()[1]]
out["uidl"] = [line.decode() for line in pop.uidl()[1]]
messages = []
for i in range(1, count + 1):
    resp, lines, octets = pop.retr(i)
    # poplib unstuffs and strips line endings; rebuild the CRLF message to compare bytes.
    messages.append({"resp": resp.decode(), "octets": octets, "b64": base64.b64encode(b"".join(l + b"\r\n" for l in lines)).decode()})
    if delete:
        pop.dele(i)
out["messages"] = messages
if count:
    out["top"] = base64.b64encode(b"".join(l + b"\r\n" for l in pop.top(1, 0)[1])).decode()
out["quit"] = pop.quit().decode()
print(json.dumps(out))

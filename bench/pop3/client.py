"""One POP3 session with Python's poplib: login, STAT, RETR 1..N (timed), QUIT. Prints JSON."""
import json, poplib, sys, time

host, port, user, password = sys.argv[1:5]
started = time.perf_counter()
pop = poplib.POP3(host, int(port), timeout=120)
pop.user(user)
pop.pass_(password)
count, size = pop.stat()
logged_in = time.perf_counter()
octets = 0
for i in range(1, count + 1):
    resp, lines, n = pop.retr(i)
    octets += n
finished = time.perf_counter()
pop.quit()
print(json.dumps({"count": count, "size": size, "octets": octets,
                  "login_s": logged_in - started, "retr_s": finished - logged_in}))

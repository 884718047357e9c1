"""A minimal MDA for fetchmail: appends the message from stdin to an mbox, untouched."""
import sys
data = sys.stdin.buffer.read()
with open(sys.argv[1], "ab") as mbox:
    mbox.write(b"From fetchmail@localhost Thu Jan  1 00:00:00 1970\n" + data + b"\n")

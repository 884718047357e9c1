#!/bin/sh
# A Dovecot POP3 instance of its own for the reference (REFERENCE-PEERS.md): its own config file,
# base_dir and maildir; pop3 on 127.0.0.1:2110; a passwd-file passdb; static userdb uid/gid 5000.
#   bench/pop3/dovecot.sh start USER PASSWORD | stop | maildir USER (prints the maildir path)
set -eu
DIR=/tmp/mailstack-pop3-bench-dovecot
BASE=/var/mail/vhosts-pop3bench
case "$1" in
start)
  user=$2; password=$3
  id vmail >/dev/null 2>&1 || { groupadd -g 5000 vmail 2>/dev/null || true; useradd -u 5000 -g 5000 -M -s /usr/sbin/nologin vmail; }
  mkdir -p "$DIR/run" "$DIR/state" "$BASE"
  chown -R 5000:5000 "$BASE"
  echo "$user:{PLAIN}$password::::::" > "$DIR/passwd"
  cat > "$DIR/dovecot.conf" <<CF
protocols = pop3
listen = 127.0.0.1
base_dir = $DIR/run
state_dir = $DIR/state
instance_name = mailstack-pop3-bench
log_path = $DIR/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
mail_location = maildir:$BASE/%d/%n
first_valid_uid = 1000
passdb {
  driver = passwd-file
  args = $DIR/passwd
}
userdb {
  driver = static
  args = uid=5000 gid=5000 home=$BASE/%d/%n
}
service pop3-login {
  inet_listener pop3 {
    port = 2110
  }
  inet_listener pop3s {
    port = 0
  }
}
CF
  dovecot -c "$DIR/dovecot.conf"
  ;;
stop)
  if [ -f "$DIR/dovecot.conf" ]; then doveadm -c "$DIR/dovecot.conf" stop 2>/dev/null || true; fi
  ;;
maildir)
  echo "$BASE/${2#*@}/${2%@*}"
  ;;
esac

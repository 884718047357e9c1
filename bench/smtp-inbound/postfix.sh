#!/bin/sh
# A Postfix instance of its own for the inbound reference (leaves /etc/postfix's settings and
# other benchmarks' instances alone): accepts mail for bench.test on 127.0.0.1:$PF_PORT and
# delivers it to the virtual maildir $BASE/bench.test/user1/, as REFERENCE-PEERS.md describes.
#   bench/smtp-inbound/postfix.sh start PF_PORT | stop | clean
set -eu
DIR=/tmp/mailstack-inbound-bench-postfix
BASE=/var/mail/vhosts-inboundbench
case "$1" in
start)
  PF_PORT=$2
  id vmail >/dev/null 2>&1 || { groupadd -g 5000 vmail 2>/dev/null || true; useradd -u 5000 -g 5000 -M -s /usr/sbin/nologin vmail; }
  mkdir -p "$DIR" /var/spool/postfix-inboundbench /var/lib/postfix-inboundbench "$BASE"
  chown postfix /var/lib/postfix-inboundbench
  chown 5000:5000 "$BASE"
  cp /etc/postfix/master.cf "$DIR/master.cf"
  sed -i "s/^smtp      inet/$PF_PORT      inet/" "$DIR/master.cf"
  cat > "$DIR/main.cf" <<CF
compatibility_level = 3.6
queue_directory = /var/spool/postfix-inboundbench
data_directory = /var/lib/postfix-inboundbench
myhostname = inboundbench.localdomain
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
virtual_mailbox_domains = bench.test
virtual_mailbox_base = $BASE
virtual_mailbox_maps = hash:$DIR/vmailbox
virtual_uid_maps = static:5000
virtual_gid_maps = static:5000
virtual_minimum_uid = 100
relayhost = [127.0.0.1]:2626
smtp_tls_security_level = none
maillog_file = /var/log/postfix-inboundbench.log
alias_maps =
alias_database =
CF
  echo "user1@bench.test bench.test/user1/" > "$DIR/vmailbox"
  postmap "$DIR/vmailbox"
  if ! postconf -h alternate_config_directories | grep -q "$DIR"; then
    postconf -e "alternate_config_directories = $(postconf -h alternate_config_directories) $DIR"
  fi
  postfix -c "$DIR" check
  postfix -c "$DIR" start
  ;;
stop)
  postfix -c "$DIR" stop 2>/dev/null || true
  ;;
clean)
  rm -rf "$BASE/bench.test"
  ;;
esac

#!/bin/sh
# A Postfix instance of its own for the relay reference (does not touch /etc/postfix's
# settings or the default instance other benchmarks may use): relays everything that
# arrives on 127.0.0.1:$PF_PORT to the smart host [127.0.0.1]:$SINK_PORT, as
# REFERENCE-PEERS.md describes (relayhost=[127.0.0.1]:2626 there).
#   bench/relay/postfix.sh start PF_PORT SINK_PORT | stop
set -eu
DIR=/tmp/mailstack-relay-bench-postfix
case "$1" in
start)
  PF_PORT=$2
  SINK_PORT=$3
  mkdir -p "$DIR" /var/spool/postfix-relaybench /var/lib/postfix-relaybench
  chown postfix /var/lib/postfix-relaybench
  cp /etc/postfix/master.cf "$DIR/master.cf"
  # The smtpd listener on PF_PORT instead of 25.
  sed -i "s/^smtp      inet/$PF_PORT      inet/" "$DIR/master.cf"
  cat > "$DIR/main.cf" <<CF
compatibility_level = 3.6
queue_directory = /var/spool/postfix-relaybench
data_directory = /var/lib/postfix-relaybench
myhostname = relaybench.localdomain
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks reject
relayhost = [127.0.0.1]:$SINK_PORT
smtp_tls_security_level = none
maillog_file = /var/log/postfix-relaybench.log
alias_maps =
alias_database =
CF
  # Postfix only runs a non-default configuration directory listed in the default one.
  if ! postconf -h alternate_config_directories | grep -q "$DIR"; then
    postconf -e "alternate_config_directories = $DIR"
  fi
  postfix -c "$DIR" check
  postfix -c "$DIR" start
  ;;
stop)
  postfix -c "$DIR" stop 2>/dev/null || true
  ;;
esac

#!/usr/bin/env bash
# Installs the Debian packages the tests use as real peers (mail clients, MTAs, DNS, DKIM
# verifier, promtool), when they are missing and this is a Debian machine we may install on.
set -uo pipefail
missing=()
command -v swaks >/dev/null 2>&1 || missing+=(swaks)
# swaks speaks TLS (STARTTLS, 465) only with these Perl modules, which are merely recommended.
perl -MNet::SSLeay -MIO::Socket::SSL -e 1 >/dev/null 2>&1 || missing+=(libnet-ssleay-perl libio-socket-ssl-perl)
command -v fetchmail >/dev/null 2>&1 || missing+=(fetchmail)
command -v smtp-sink >/dev/null 2>&1 || [ -x /usr/sbin/smtp-sink ] || missing+=(postfix)
command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || missing+=(dnsmasq)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
[ -x /usr/bin/python3 ] && /usr/bin/python3 -c "import dkim" 2>/dev/null || missing+=(python3 python3-dkim)
command -v nats-server >/dev/null 2>&1 || missing+=(nats-server)
# promtool checks and unit-tests the alerting rules (deploy/components/monitoring).
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "==> installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null 2>&1 || true
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
    || echo "warning: could not install ${missing[*]}; tests that need them will fail" >&2
  # The postfix package may start its own daemon on port 25: tests need the port free.
  postfix stop >/dev/null 2>&1 || true
else
  echo "warning: missing ${missing[*]} and not root with apt-get; tests that need them will fail" >&2
fi

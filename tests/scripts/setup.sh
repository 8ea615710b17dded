#!/usr/bin/env bash
# Installs everything edgefront needs on a fresh Debian 12 machine (as root).
# Idempotent: packages already present are not fetched again.
set -euo pipefail

PACKAGES=(
  postgresql-15 postgresql-client-15   # primary and replicas (server binaries in /usr/lib/postgresql/15/bin)
  cmake build-essential pkg-config     # pingora's zlib-ng build needs cmake
  nginx-light wrk caddy                # benchmark peers and load generator
  openssl                              # TLS tests (s_client)
  pebble                               # ACME CA for tests (pebble + pebble-challtestsrv)
  bird2 iproute2 ethtool               # the anycast lab: BGP speakers, namespaces, veth offloads
  nftables                             # second-chance forwarding in the lab (edgefront-health)
  patroni etcd-server etcd-client      # the origin's failover: Patroni on a 3-member etcd
  ansible-core ansible-lint            # deployment: playbook syntax, lint, template render test
  mmdebstrap systemd-container        # the deploy test boots Debian machines (systemd-nspawn)
  openssh-client                       # ansible reaches them over ssh
  prometheus                           # promtool checks the shipped alert rules (never started)
  chromium                             # the network map, tested in a real headless browser
  ca-certificates curl procps
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "setup: missing packages ${missing[*]}; run as root (or install them) first" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Debian's postgresql package must not start its own cluster on :5432.
  mkdir -p /usr/sbin && if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  echo "setup: cargo not found; install the Rust toolchain (1.94+) first" >&2
  exit 1
fi
for comp in rustfmt clippy; do
  cargo "${comp/rustfmt/fmt}" --version >/dev/null 2>&1 || rustup component add "$comp" >/dev/null 2>&1 || true
done
id postgres >/dev/null 2>&1 || { echo "setup: the postgres user is missing (postgresql-15 install failed?)" >&2; exit 1; }
# The deploy test's machines boot from this root file system (built once, cached).
"$(dirname "$0")/debian-rootfs.sh" >/dev/null
echo "setup: ok"

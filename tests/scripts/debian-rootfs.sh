#!/usr/bin/env bash
# Builds, once, the Debian 12 root file system the deploy test boots its
# machines from (systemd as PID 1 under systemd-nspawn, each machine an
# overlay on this tree), and prints its path. Cached under
# /var/cache/edgefront by a hash of what it holds, so a second call costs
# nothing; concurrent callers wait for one build.
#
# The packages the ansible roles install are preinstalled, so the machines
# need no route out: ansible's apt tasks find them present, as on a host
# whose image carries them. Everything else (users, files, units, clusters)
# is ansible's to do.
set -euo pipefail

PACKAGES=(
  systemd systemd-sysv dbus           # a booted machine
  openssh-server python3 python3-apt  # ansible over ssh, its apt module
  apt ca-certificates sudo iproute2 procps curl
  postgresql-15 postgresql-client-15  # roles/postgresql
  bird2 nftables logrotate            # roles/bird, roles/health, roles/logging
  etcd-server etcd-client patroni     # roles/etcd, roles/patroni (origin failover)
)
VERSION=1 # bump when the customisation below changes

cache=/var/cache/edgefront
sum=$(printf '%s\n' "$VERSION" "${PACKAGES[@]}" | sha256sum | cut -c1-12)
dir="$cache/debian-12-$sum"
if [[ -e "$dir/.complete" ]]; then
  echo "$dir"
  exit 0
fi

command -v mmdebstrap >/dev/null || {
  echo "debian-rootfs: mmdebstrap is missing (tests/scripts/setup.sh installs it)" >&2
  exit 1
}
mkdir -p "$cache"
exec 9>"$cache/rootfs.lock"
flock 9
if [[ -e "$dir/.complete" ]]; then
  echo "$dir"
  exit 0
fi

# The mirror apt uses here (deb822 or one-line sources), else Debian's.
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
[[ -n "$mirror" ]] || mirror=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
[[ -n "$mirror" ]] || mirror=http://deb.debian.org/debian

rm -rf "$dir.tmp"
include=$(IFS=,; echo "${PACKAGES[*]}")
mmdebstrap --quiet --variant=minbase --include="$include" \
  --customize-hook='rm -f "$1"/etc/machine-id "$1"/var/lib/dbus/machine-id; : > "$1"/etc/machine-id' \
  --customize-hook='mkdir -p "$1"/root/.ssh && chmod 700 "$1"/root/.ssh' \
  --customize-hook='rm -f "$1"/etc/resolv.conf; : > "$1"/etc/resolv.conf' \
  bookworm "$dir.tmp" "$mirror" >&2
touch "$dir.tmp/.complete"
mv "$dir.tmp" "$dir"
echo "$dir"

#!/usr/bin/env bash
# Runs the README's seller example (its first ```sh block) as written against
# the lab of README line 1, started detached under a prefix of its own (the
# example's `eflab` names become that prefix), and checks what it prints: the
# domain verified, the store served from Mumbai with the new price, plain HTTP
# redirected to https, the order placed. The lab is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
prefix="efrd$$"
out=$(mktemp)
script=$(mktemp)
cleanup() {
  target/release/edge-ctl lab down --prefix "$prefix" >/dev/null 2>&1 || true
  rm -f "$out" "$script"
}
trap cleanup EXIT
awk '/^```sh$/ { n++; f = (n == 1); next } /^```$/ { f = 0 } f' README.md \
  | sed "s/eflab/$prefix/g" > "$script"
[ -s "$script" ] || { echo "README.md has no sh block" >&2; exit 1; }
target/release/edgefront-lab --detach --prefix "$prefix" > /dev/null
if ! timeout 120 bash "$script" > "$out" 2>&1; then
  cat "$out"
  echo "the README example failed" >&2
  exit 1
fi
for want in '"state":"active"' 'x-edge-route: bom1' '₹59.00' 'HTTP/1.1 301' \
  'location: https://chai-corner.example/' '"status":"placed"' '"total_cents":11800'; do
  grep -qF -- "$want" "$out" || {
    cat "$out"
    echo "the README example printed no $want" >&2
    exit 1
  }
done
echo "README seller example: every check passed against lab $prefix"

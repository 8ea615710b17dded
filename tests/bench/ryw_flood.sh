#!/usr/bin/env bash
# Read-your-writes abuse benchmark: legitimate shoppers' latency on the cached
# page while a flood of forged `ef_lsn` cookies hits the same edge, compared
# with no flood and with a flood of the same size without cookies (the cost of
# the load itself on this 2-core machine). Prints a markdown report for
# docs/benchmarks.md. Usage: tests/bench/ryw_flood.sh [seconds-per-run]
set -euo pipefail
cd "$(dirname "$0")/../.."
DUR=${1:-10}
LEGIT_CONC=${LEGIT_CONC:-4}
FLOOD_CONC=${FLOOD_CONC:-32}
tests/scripts/setup.sh >/dev/null
cargo build --release --workspace --locked >/dev/null 2>&1

WORK=$(mktemp -d /tmp/edgefront-rywflood-XXXXXX)
LAB_PID=""
cleanup() {
  [[ -n $LAB_PID ]] && kill -INT "$LAB_PID" 2>/dev/null && wait "$LAB_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
EDGE=$(free_port); ADMIN=$(free_port); ORIGIN=$(free_port)
HOST=spiceroute.example
target/release/edgefront-local --edge-port "$EDGE" --admin-port "$ADMIN" --origin-port "$ORIGIN" > "$WORK/lab.log" 2>&1 &
LAB_PID=$!
for _ in $(seq 1 300); do grep -q "Press Ctrl-C" "$WORK/lab.log" && break; sleep 0.1; done
grep -q "Press Ctrl-C" "$WORK/lab.log" || { cat "$WORK/lab.log"; exit 1; }
URL="http://127.0.0.1:$EDGE/"
curl -sf -o /dev/null -H "Host: $HOST" "$URL"

p99() { awk '$1=="99%" {print $2}' "$1"; }
to_ms() { awk -v v="$1" 'BEGIN { if (v ~ /us$/) { sub(/us$/,"",v); print v/1000 } else if (v ~ /ms$/) { sub(/ms$/,"",v); print v } else { sub(/s$/,"",v); print v*1000 } }'; }
rps() { awk '/Requests\/sec/ {print $2}' "$1"; }
metric() { curl -s "http://127.0.0.1:$ADMIN/metrics" | awk -v m="$1" 'index($0, m) == 1 {s += $NF} END {print s+0}'; }

legit() { wrk -t1 -c"$LEGIT_CONC" -d"${DUR}s" --latency -H "Host: $HOST" "$URL" > "$WORK/$1.txt"; }
flood() { wrk -t1 -c"$FLOOD_CONC" -d"$((DUR + 2))s" -H "Host: $HOST" "$@" "$URL" > /dev/null; }

primary0=$(metric 'edgefront_read_your_writes_total{outcome="primary"')
legit idle
flood -H "Cookie: ef_lsn=FFFFFFFF/FFFFFFFF" & F=$!; sleep 1; legit forged; wait $F
flood -H "Cookie: ef_lsn=0/1.1800000000.k1.0011223344556677889900112233445566778899001122334455667788990011" & F=$!; sleep 1; legit forged_mac; wait $F
flood & F=$!; sleep 1; legit plain; wait $F
primary1=$(metric 'edgefront_read_your_writes_total{outcome="primary"')
malformed=$(metric 'edgefront_read_your_writes_total{outcome="malformed"')
unknown=$(metric 'edgefront_read_your_writes_total{outcome="unknown_key"')

idle=$(to_ms "$(p99 "$WORK/idle.txt")")
cat <<REPORT
### Read-your-writes cookie flood ($(date -u +%Y-%m-%d), $(nproc) cores, \`tests/bench/ryw_flood.sh $DUR\`)
Cached storefront page on \`edgefront-local\` (one region, loopback, PostgreSQL as the
fixture starts it). Legitimate shoppers: wrk, $LEGIT_CONC keep-alive connections. Floods:
wrk, $FLOOD_CONC connections, closed loop (as fast as the edge answers).

| run | legit req/s | legit p99 | p99 vs idle |
|---|---|---|---|
| idle | $(rps "$WORK/idle.txt") | $(p99 "$WORK/idle.txt") | 1.00× |
| flood of \`ef_lsn=FFFFFFFF/FFFFFFFF\` | $(rps "$WORK/forged.txt") | $(p99 "$WORK/forged.txt") | $(awk -v a="$(to_ms "$(p99 "$WORK/forged.txt")")" -v b="$idle" 'BEGIN{printf "%.2f×", a/b}') |
| flood of well-shaped cookies with a forged MAC | $(rps "$WORK/forged_mac.txt") | $(p99 "$WORK/forged_mac.txt") | $(awk -v a="$(to_ms "$(p99 "$WORK/forged_mac.txt")")" -v b="$idle" 'BEGIN{printf "%.2f×", a/b}') |
| same flood without cookies (control) | $(rps "$WORK/plain.txt") | $(p99 "$WORK/plain.txt") | $(awk -v a="$(to_ms "$(p99 "$WORK/plain.txt")")" -v b="$idle" 'BEGIN{printf "%.2f×", a/b}') |

Primary reads caused by the floods: $((${primary1%.*} - ${primary0%.*})); cookies refused as
malformed: ${malformed%.*}, as signed by an unknown key: ${unknown%.*}.
REPORT

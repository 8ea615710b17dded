#!/usr/bin/env bash
# Proxied-write benchmark: seller writes (PATCH /api/store, one committed
# transaction each) through an edge to the origin, and straight to the origin,
# with the edge → origin link in plain HTTP and over TLS (the origin's public
# listener under the internal CA, verified by the edge; pooled keep-alive).
# Prints a markdown report for docs/benchmarks.md.
# Usage: tests/bench/writes.sh [seconds-per-run]
set -euo pipefail
cd "$(dirname "$0")/../.."
DUR=${1:-10}
CONC=${CONC:-8}
tests/scripts/setup.sh >/dev/null
cargo build --release --workspace --locked >/dev/null 2>&1

WORK=$(mktemp -d /tmp/edgefront-writes-XXXXXX)
LAB_PID=""
stop_lab() {
  if [[ -n $LAB_PID ]]; then kill -INT "$LAB_PID" 2>/dev/null || true; wait "$LAB_PID" 2>/dev/null || true; LAB_PID=""; fi
}
cleanup() { stop_lab; rm -rf "$WORK"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cat > "$WORK/patch.lua" <<'LUA'
wrk.method = "PATCH"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("TOKEN")
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"tagline":"benchmark write"}'
LUA

p50() { awk '$1=="50%" {print $2}' "$1"; }
p99() { awk '$1=="99%" {print $2}' "$1"; }
rps() { awk '/Requests\/sec/ {print $2}' "$1"; }
non2xx() { awk '/Non-2xx/ {print $NF}' "$1" | grep . || echo 0; }

# run MODE (plain|tls): starts edgefront-local (one region) and loads it.
run() {
  local mode=$1 flag="" scheme=http
  [[ $mode == tls ]] && { flag=--origin-tls; scheme=https; }
  local edge admin origin
  edge=$(free_port); admin=$(free_port); origin=$(free_port)
  target/release/edgefront-local --regions bom1 --edge-port "$edge" --admin-port "$admin" \
    --tls-port 0 --origin-port "$origin" $flag > "$WORK/lab-$mode.log" 2>&1 &
  LAB_PID=$!
  for _ in $(seq 1 300); do grep -q "Press Ctrl-C" "$WORK/lab-$mode.log" && break; sleep 0.1; done
  grep -q "Press Ctrl-C" "$WORK/lab-$mode.log" || { cat "$WORK/lab-$mode.log"; exit 1; }
  TOKEN=$(curl -sf "http://127.0.0.1:$edge/api/stores" -H 'content-type: application/json' \
    -d "{\"name\":\"Bench $mode\",\"slug\":\"bench-$mode-$RANDOM\",\"currency\":\"EUR\"}" \
    | sed -E 's/.*"token":"([^"]+)".*/\1/')
  export TOKEN
  # Warm-up, then the two measured runs.
  wrk -t1 -c"$CONC" -d2s -s "$WORK/patch.lua" "http://127.0.0.1:$edge/api/store" > /dev/null
  wrk -t1 -c"$CONC" -d"${DUR}s" --latency -s "$WORK/patch.lua" "http://127.0.0.1:$edge/api/store" > "$WORK/edge-$mode.txt"
  wrk -t1 -c"$CONC" -d"${DUR}s" --latency -s "$WORK/patch.lua" "$scheme://127.0.0.1:$origin/api/store" > "$WORK/origin-$mode.txt"
  stop_lab
}
run plain
run tls

row() { echo "| $1 | $(rps "$2") | $(p50 "$2") | $(p99 "$2") | $(non2xx "$2") |"; }
cat <<REPORT
### Proxied writes, edge → origin in plain HTTP and over TLS ($(date -u +%Y-%m-%d), $(nproc) cores, \`tests/bench/writes.sh $DUR\`)
\`PATCH /api/store\` (one committed transaction on the primary each) from wrk, $CONC
keep-alive connections, closed loop, ${DUR} s per run after a 2 s warm-up; \`edgefront-local
--regions bom1\` on loopback (PostgreSQL as the test fixture starts it: fsync off). "TLS":
the origin's public listener serves TLS 1.3 under a fresh internal CA and the edge verifies
it against that CA alone, on pooled keep-alive connections; straight-to-origin runs use
https then too (wrk does not verify).

| path | req/s | p50 | p99 | non-2xx |
|---|---|---|---|---|
$(row "through the edge, origin link plain" "$WORK/edge-plain.txt")
$(row "through the edge, origin link TLS" "$WORK/edge-tls.txt")
$(row "straight to the origin, plain" "$WORK/origin-plain.txt")
$(row "straight to the origin, TLS" "$WORK/origin-tls.txt")

TLS vs plain through the edge: $(awk -v a="$(rps "$WORK/edge-tls.txt")" -v b="$(rps "$WORK/edge-plain.txt")" 'BEGIN{printf "%.2f×", a/b}') the throughput.
REPORT

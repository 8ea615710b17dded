#!/usr/bin/env bash
# Benchmarks the edge against nginx on this machine and prints a markdown
# report (append it to docs/benchmarks.md). Everything runs on loopback; every
# load run is bounded in time. Usage: tests/bench/bench.sh [seconds-per-run]
set -euo pipefail
cd "$(dirname "$0")/../.."
DUR=${1:-10}
CONC=${CONC:-32}
tests/scripts/setup.sh >/dev/null
cargo build --release --workspace --locked >/dev/null 2>&1

WORK=$(mktemp -d /tmp/edgefront-bench-XXXXXX)
chmod 755 "$WORK"   # nginx workers (www-data) must read the page
LAB_PID=""; NGINX_PID=""; COLD_PID=""
cleanup() {
  [[ -n $COLD_PID ]] && kill -INT "$COLD_PID" 2>/dev/null || true
  [[ -n $NGINX_PID ]] && kill "$NGINX_PID" 2>/dev/null || true
  [[ -n $LAB_PID ]] && kill -INT "$LAB_PID" 2>/dev/null && wait "$LAB_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
EDGE=$(free_port); ADMIN=$(free_port); ORIGIN=$(free_port); NGX=$(free_port); COLD=$(free_port); COLD_ADMIN=$(free_port)
HOST=spiceroute.example

target/release/edgefront-local --edge-port "$EDGE" --admin-port "$ADMIN" --origin-port "$ORIGIN" > "$WORK/lab.log" 2>&1 &
LAB_PID=$!
for _ in $(seq 1 300); do grep -q "Press Ctrl-C" "$WORK/lab.log" && break; sleep 0.1; done
grep -q "Press Ctrl-C" "$WORK/lab.log" || { cat "$WORK/lab.log"; exit 1; }
EDGE_PID=$(pgrep -f "edge --region bom1 --listen 127.0.0.1:$EDGE ")
REPLICA_URL=$(ps -o args= -p "$EDGE_PID" | sed -E 's/.*--replica-url ([^ ]+).*/\1/')

# The same page bytes as a static file for nginx.
curl -sf -H "Host: $HOST" "http://127.0.0.1:$EDGE/" -o "$WORK/index.html"
chmod 644 "$WORK/index.html"
PAGE_BYTES=$(stat -c %s "$WORK/index.html")
[[ $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$EDGE/" -H "Host: $HOST") == 200 ]]
cat > "$WORK/nginx.conf" <<NGINX
worker_processes 2;
daemon off;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  keepalive_requests 1000000;
  sendfile on;
  tcp_nopush on;
  open_file_cache max=100;
  server {
    listen 127.0.0.1:$NGX;
    location = / { root $WORK; try_files /index.html =404; default_type text/html; }
  }
}
NGINX
nginx -c "$WORK/nginx.conf" -p "$WORK" &
NGINX_PID=$!
for _ in $(seq 1 50); do curl -sf -o /dev/null "http://127.0.0.1:$NGX/" && break; sleep 0.1; done
cmp <(curl -sf "http://127.0.0.1:$NGX/") "$WORK/index.html" || { echo "nginx does not serve the page bytes" >&2; exit 1; }

run_wrk() { # url conns [lua script] -> "rps p50 p99 non2xx"
  local out
  out=$(wrk -t1 -c"$2" -d"${DUR}s" --latency -H "Host: $HOST" ${3:+-s "$3"} "$1")
  local rps p50 p99
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  local non2xx
  non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
  echo "$rps $p50 $p99 ${non2xx:-0}"
}

# Warm the cache, then alternate runs so drift hits both alike.
curl -sf -o /dev/null -H "Host: $HOST" "http://127.0.0.1:$EDGE/"
read -r E1 E1p50 E1p99 E1bad < <(run_wrk "http://127.0.0.1:$EDGE/" "$CONC")
read -r N1 N1p50 N1p99 N1bad < <(run_wrk "http://127.0.0.1:$NGX/" "$CONC")
read -r E2 E2p50 E2p99 E2bad < <(run_wrk "http://127.0.0.1:$EDGE/" "$CONC")
read -r N2 N2p50 N2p99 N2bad < <(run_wrk "http://127.0.0.1:$NGX/" "$CONC")
RSS_KB=$(ps -o rss= -p "$EDGE_PID" | tr -d ' ')
NGX_RSS_KB=$(ps --ppid "$NGINX_PID" -o rss= | awk '{s+=$1} END {print s}')

# Cold render: an edge whose cache entries expire after 1 ms, one request at a time.
target/release/edge --region bom1 --listen "127.0.0.1:$COLD" --admin-listen "127.0.0.1:$COLD_ADMIN" \
  --replica-url "$REPLICA_URL" --origin "127.0.0.1:$ORIGIN" --cache-ttl-ms 1 > "$WORK/cold.log" 2>&1 &
COLD_PID=$!
for _ in $(seq 1 100); do curl -sf -o /dev/null -H "Host: $HOST" "http://127.0.0.1:$COLD/" && break; sleep 0.1; done
MISS=$(curl -s -D - -o /dev/null -H "Host: $HOST" "http://127.0.0.1:$COLD/" | tr -d '\r' | awk -F': ' 'tolower($1)=="cache-status" {print $2}')
TIMING=$(curl -s -D - -o /dev/null -H "Host: $HOST" "http://127.0.0.1:$COLD/" | tr -d '\r' | awk -F': ' 'tolower($1)=="server-timing" {print $2}')
# wrk waits 3 ms before each request (not counted in latency), so every entry has expired.
echo 'function delay() return 3 end' > "$WORK/delay.lua"
read -r C C50 C99 Cbad < <(run_wrk "http://127.0.0.1:$COLD/" 1 "$WORK/delay.lua")
MISSES=$(curl -s "http://127.0.0.1:$COLD_ADMIN/metrics" | awk '/^edgefront_cache_lookups_total\{result="miss"/ {print $2}')
HITS=$(curl -s "http://127.0.0.1:$COLD_ADMIN/metrics" | awk '/^edgefront_cache_lookups_total\{result="hit"/ {print $2}')
HIST=$(curl -s "http://127.0.0.1:$COLD_ADMIN/metrics" | grep -E '^edgefront_render_duration_seconds_(sum|count)')

ratio() { python3 -c "print(f'{($1)/($2):.2f}')"; }
CPU=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)
cat <<REPORT
## Run of $(date -u +%Y-%m-%d) on $(nproc) cores ($CPU), $(free -g | awk '/Mem:/ {print $2}') GiB

Command: \`tests/bench/bench.sh $DUR\` (wrk -t1, ${DUR}s per run, keep-alive, $CONC connections for the cached page;
edge and nginx each with 2 workers, nginx with sendfile and open_file_cache; client and servers share the 2 cores). Page: \`$HOST/\`
(large demo store, 22 categories, 176 products), $PAGE_BYTES bytes, identity encoding, same bytes for both.

| cached page | run | req/s | p50 | p99 | non-2xx |
|---|---|---|---|---|---|
| edge | 1 | $E1 | $E1p50 | $E1p99 | $E1bad |
| nginx (static file) | 1 | $N1 | $N1p50 | $N1p99 | $N1bad |
| edge | 2 | $E2 | $E2p50 | $E2p99 | $E2bad |
| nginx (static file) | 2 | $N2 | $N2p50 | $N2p99 | $N2bad |

Edge / nginx throughput: run 1 **$(ratio "$E1" "$N1")×**, run 2 **$(ratio "$E2" "$N2")×** (target ≥ 0.8×).

Cold render (cache miss on every request: 1 connection, 3 ms pause between requests so the 1 ms TTL
expires; host lookup + 3 replica queries + template): p50 **$C50**, p99 **$C99** end to end over
${MISSES:-0} misses (${HITS:-0} hits; target p50 < 5 ms). Sample \`cache-status: $MISS\`,
\`server-timing: $TIMING\`. Render histogram (seconds, replica and template phases):

\`\`\`
$HIST
\`\`\`

Edge resident memory after the cached-page runs: **$((RSS_KB / 1024)) MiB** (nginx workers: $((NGX_RSS_KB / 1024)) MiB).
REPORT

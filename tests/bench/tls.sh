#!/usr/bin/env bash
# TLS handshakes/s of the edge vs nginx and Caddy (Debian packages) serving the
# same certificate, full and resumed, TLS 1.3 and 1.2, on loopback. Prints a
# markdown report. Usage: tests/bench/tls.sh [seconds-per-run]
set -euo pipefail
cd "$(dirname "$0")/../.."
DUR=${1:-5}
tests/scripts/setup.sh >/dev/null
command -v caddy >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq caddy >/dev/null; }
cargo build --release --workspace --locked >/dev/null 2>&1

WORK=$(mktemp -d /tmp/edgefront-tlsbench-XXXXXX); chmod 755 "$WORK"
LAB_PID=""; NGINX_PID=""; CADDY_PID=""
cleanup() {
  [[ -n $CADDY_PID ]] && kill "$CADDY_PID" 2>/dev/null || true
  [[ -n $NGINX_PID ]] && kill "$NGINX_PID" 2>/dev/null || true
  [[ -n $LAB_PID ]] && kill -INT "$LAB_PID" 2>/dev/null && wait "$LAB_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
EDGE=$(free_port); TLS=$(free_port); ADMIN=$(free_port); ORIGIN=$(free_port); NGX=$(free_port); CAD=$(free_port)

target/release/edgefront-local --regions bom1 --edge-port "$EDGE" --tls-port "$TLS" --admin-port "$ADMIN" \
  --origin-port "$ORIGIN" > "$WORK/lab.log" 2>&1 &
LAB_PID=$!
for _ in $(seq 1 300); do grep -q "Press Ctrl-C" "$WORK/lab.log" && break; sleep 0.1; done
grep -q "Press Ctrl-C" "$WORK/lab.log" || { cat "$WORK/lab.log"; exit 1; }
LABDIR=$(grep -o '/tmp/edgefront-lab-[^ )]*/ca.pem' "$WORK/lab.log" | head -1 | xargs dirname)
cp "$LABDIR/ca.pem" "$LABDIR/spiceroute.pem" "$LABDIR/spiceroute.key" "$WORK/"
chmod 644 "$WORK"/*.pem "$WORK"/*.key
echo ok > "$WORK/index.html"; chmod 644 "$WORK/index.html"

cat > "$WORK/nginx.conf" <<NGINX
worker_processes 2;
daemon off;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  ssl_session_cache shared:SSL:10m;
  ssl_session_tickets on;
  ssl_protocols TLSv1.2 TLSv1.3;
  server {
    listen 127.0.0.1:$NGX ssl http2;
    server_name spiceroute.example;
    ssl_certificate $WORK/spiceroute.pem;
    ssl_certificate_key $WORK/spiceroute.key;
    root $WORK;
  }
}
NGINX
nginx -c "$WORK/nginx.conf" -p "$WORK" &
NGINX_PID=$!

cat > "$WORK/Caddyfile" <<CADDY
{
  admin off
  auto_https off
  storage file_system $WORK/caddy-data
}
https://spiceroute.example:$CAD {
  bind 127.0.0.1
  tls $WORK/spiceroute.pem $WORK/spiceroute.key
  respond "ok"
}
CADDY
XDG_DATA_HOME=$WORK XDG_CONFIG_HOME=$WORK GOMAXPROCS=2 caddy run --config "$WORK/Caddyfile" --adapter caddyfile > "$WORK/caddy.log" 2>&1 &
CADDY_PID=$!
for p in $NGX $CAD $TLS; do
  for _ in $(seq 1 100); do
    curl -s -o /dev/null --cacert "$WORK/ca.pem" --resolve "spiceroute.example:$p:127.0.0.1" "https://spiceroute.example:$p/" && break
    sleep 0.1
  done
done

CPU=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)
echo "## TLS handshakes — run of $(date -u +%Y-%m-%d) on $(nproc) cores ($CPU)"
echo
echo "Command: \`tests/bench/tls.sh $DUR\`: a rustls (ring) client, 1 thread, ${DUR}s per cell, per connection: connect →"
echo "handshake (verifying the chain, SNI spiceroute.example) → one HEAD / with Connection: close → close; 'resumed' keeps a session cache. Same ECDSA P-256 certificate"
echo "from the lab CA for all three; edge, nginx (2 workers, shared session cache + tickets) and Caddy (GOMAXPROCS=2)."
echo
for v in 13 12; do
  target/release/edgefront-bench-tls --sni spiceroute.example --ca "$WORK/ca.pem" --seconds "$DUR" --tls "$v" \
    --target "edge=127.0.0.1:$TLS" --target "nginx=127.0.0.1:$NGX" --target "caddy=127.0.0.1:$CAD"
  echo
done
EDGE_PID=$(pgrep -f "edge --region bom1 --listen 127.0.0.1:$EDGE ")
echo "Edge resident memory after the runs: $(( $(ps -o rss= -p "$EDGE_PID") / 1024 )) MiB."

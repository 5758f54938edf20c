#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# One nginx, three locations: no limit, nginx's limit_req, shmzone_limit_req, each
# zone at a rate no request reaches, keyed on X-Key with 10 000 distinct values
# (wrk's script picks one per request). wrk (Debian's) drives each location in
# turn, several rounds; the ratios are of the medians:
#   RATIO rps/nginx_limit_req  our requests/s over limit_req's
#   RATIO p99/nginx_limit_req  limit_req's 99th percentile latency over ours
# Needs root (nginx's user), SHMZONED, NGINX_BIN, NGINX_MODULE, WRK (NGINX itself is what nginx reads its inherited sockets from).
set -euo pipefail
rounds=${ROUNDS:-5}
secs=${SECONDS_PER_RUN:-4}
conns=${CONNECTIONS:-32}
[ "$(id -u)" -eq 0 ] || { echo "SKIP bench-nginx: needs root"; exit 0; }

dir=$(mktemp -d /tmp/bench-nginx.XXXXXX)
daemon_pid=""
nginx_pid=""
cleanup() {
        [ -z "$nginx_pid" ] || { kill -QUIT "$nginx_pid" 2>/dev/null || true; wait "$nginx_pid" 2>/dev/null || true; }
        [ -z "$daemon_pid" ] || { kill -TERM "$daemon_pid" 2>/dev/null || true; wait "$daemon_pid" 2>/dev/null || true; }
        rm -rf "$dir"
}
trap cleanup EXIT

printf '[daemon]\n' >"$dir/shmzone.conf"
"$SHMZONED" --config "$dir/shmzone.conf" --socket "$dir/sock" --no-mount 2>"$dir/daemon.log" &
daemon_pid=$!
for _ in $(seq 100); do [ -S "$dir/sock" ] && break; sleep 0.1; done

port=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
echo ok >"$dir/f"
cat >"$dir/nginx.conf" <<CONF
load_module $NGINX_MODULE;
daemon off;
master_process on;
user root;
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $dir; proxy_temp_path $dir; fastcgi_temp_path $dir; uwsgi_temp_path $dir; scgi_temp_path $dir;
  shmzone_socket $dir/sock;
  limit_req_zone \$http_x_key zone=bench_nginx:16m rate=100000r/s;
  shmzone_limit_req_zone \$http_x_key zone=bench_shmzone:16m rate=100000r/s;
  server {
    listen 127.0.0.1:$port;
    location = /none { alias $dir/f; }
    location = /nginx { limit_req zone=bench_nginx burst=1000 nodelay; alias $dir/f; }
    location = /shmzone { shmzone_limit_req zone=bench_shmzone burst=1000 nodelay; alias $dir/f; }
  }
}
CONF
cat >"$dir/keys.lua" <<'LUA'
math.randomseed(os.time())
request = function()
  return wrk.format(nil, nil, { ["X-Key"] = "key-" .. math.random(10000) })
end
done = function(summary, latency, requests)
  io.write(string.format("BENCH %.1f %.1f %d %d\n", summary.requests / (summary.duration / 1e6),
    latency:percentile(99), summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write))
end
LUA
"$NGINX_BIN" -p "$dir" -c "$dir/nginx.conf" &
nginx_pid=$!
for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.1
done

declare -A rps p99
for r in $(seq "$rounds"); do
        for loc in none nginx shmzone; do
                line=$("$WRK" -t1 -c"$conns" -d"${secs}s" -s "$dir/keys.lua" "http://127.0.0.1:$port/$loc" | grep '^BENCH')
                read -r _ q l bad errs <<<"$line"
                # Every answer a 200: a limit that refused or failed would measure something else.
                [ "$bad" -eq 0 ] && [ "$errs" -eq 0 ] || { echo "bench-nginx: /$loc: $bad non-2xx, $errs errors" >&2; exit 1; }
                rps[$loc]+="$q "
                p99[$loc]+="$l "
                echo "round $r /$loc: $q requests/s, p99 $l us"
        done
done
median() { tr ' ' '\n' | sed '/^$/d' | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
for loc in none nginx shmzone; do
        eval "m_rps_$loc=$(echo "${rps[$loc]}" | median)"
        eval "m_p99_$loc=$(echo "${p99[$loc]}" | median)"
done
echo "median requests/s: none $m_rps_none, nginx $m_rps_nginx, shmzone $m_rps_shmzone"
echo "median p99 (us): none $m_p99_none, nginx $m_p99_nginx, shmzone $m_p99_shmzone"
awk -v a="$m_rps_shmzone" -v b="$m_rps_nginx" 'BEGIN {printf "RATIO rps/nginx_limit_req %.3f\n", a / b}'
awk -v a="$m_p99_nginx" -v b="$m_p99_shmzone" 'BEGIN {printf "RATIO p99/nginx_limit_req %.3f\n", a / b}'
awk -v a="$m_rps_shmzone" -v b="$m_rps_none" 'BEGIN {printf "RATIO rps/no_limit %.3f\n", a / b}'

#!/usr/bin/env bash
# Make sure a Redis answers at REDIS_URL (default redis://127.0.0.1:6379/0).
#   scripts/redis.sh check          exit 0 when one answers
#   scripts/redis.sh foreground     run a private Redis under var/redis in the foreground (for the Procfile)
#   scripts/redis.sh private PORT   start a private Redis under var/redis-PORT in the background, print its URL
set -euo pipefail
cd "$(dirname "$0")/.."
url="${REDIS_URL:-redis://127.0.0.1:6379/0}"
hostport="${url#redis://}"; hostport="${hostport%%/*}"; hostport="${hostport##*@}"
host="${hostport%%:*}"; port="${hostport##*:}"; [ "$port" = "$host" ] && port=6379

case "${1:-check}" in
  check)
    redis-cli -h "$host" -p "$port" ping 2>/dev/null | grep -q PONG ;;
  foreground)
    mkdir -p var/redis
    exec redis-server --bind 127.0.0.1 --port "$port" --dir "$PWD/var/redis" --save "" --appendonly no ;;
  private)
    p="${2:?port}"; dir="$PWD/var/redis-$p"; mkdir -p "$dir"
    redis-server --daemonize yes --bind 127.0.0.1 --port "$p" --dir "$dir" --save "" --appendonly no \
      --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" >/dev/null
    for _ in $(seq 50); do redis-cli -p "$p" ping 2>/dev/null | grep -q PONG && break; sleep 0.1; done
    echo "redis://127.0.0.1:$p/0" ;;
  stop-private)
    p="${2:?port}"; pidfile="$PWD/var/redis-$p/redis.pid"
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true ;;
esac

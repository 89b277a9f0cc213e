#!/usr/bin/env bash
# `make run`: set up, migrate, make an admin, and run web + worker + beat (+ a private Redis when none answers).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh run
PY=.venv/bin/python

$PY manage.py migrate --noinput
$PY manage.py collectstatic --noinput -v 0
$PY manage.py ensure_admin

procs=(web worker beat watcher)
if ! scripts/redis.sh check; then
  echo "==> Nothing answers at ${REDIS_URL:-redis://127.0.0.1:6379/0}; starting a private Redis under var/redis"
  procs=(redis "${procs[@]}")
fi
port="${PORT:-8000}"
echo "==> LanHub is starting at http://127.0.0.1:$port/  (admin: http://127.0.0.1:$port/admin/)  Ctrl-C stops it."
export PORT="$port"
exec .venv/bin/honcho -f Procfile start "${procs[@]}"

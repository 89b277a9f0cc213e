#!/usr/bin/env bash
# `make test`: the same set-up, then the whole suite against a real Redis (private when REDIS_URL is unset)
# and PostgreSQL when DATABASE_URL is set (SQLite otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh test

private_port=""
if [ -z "${REDIS_URL:-}" ]; then
  private_port=$((20000 + RANDOM % 20000))
  REDIS_URL=$(scripts/redis.sh private "$private_port")
  export REDIS_URL
  trap 'scripts/redis.sh stop-private "$private_port"' EXIT
else
  # A shared Redis: use a database number of this run's own (1-15, never the portal's 0). Celery's worker ping
  # (the health check) broadcasts over the whole database, so a running portal's worker on the same database
  # would answer for this run's.
  db="${LANHUB_TEST_REDIS_DB:-$((1 + $$ % 15))}"
  if [[ "$REDIS_URL" =~ ^(rediss?://[^/?]+)(/[0-9]*)?$ ]]; then
    REDIS_URL="${BASH_REMATCH[1]}/$db"
    export REDIS_URL
  else
    echo "==> REDIS_URL=$REDIS_URL is not redis://host:port/db: kept as given (the health test may see other workers)"
  fi
fi
# A queue and cache prefix of this run's own: a `make run` worker or another test run on the same Redis must not
# take this run's tasks, and rate-limit counters must not carry over between runs.
export CELERY_QUEUE="lanhub-test-$$" CACHE_PREFIX="lanhub-test-$$"
echo "==> Tests on ${DATABASE_URL:-SQLite} with Redis at $REDIS_URL"
.venv/bin/python -m pytest "$@"

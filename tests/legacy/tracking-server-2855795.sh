#!/usr/bin/env bash
# deploy/tracking-server.sh as of commit 2855795 (before issue 25): tests/test_server.py makes a DIR with it to test its migration.
# A shared MLflow tracking server on this machine: PostgreSQL for runs and the registry,
# a folder for artifacts served through the server (proxied), both bound to 127.0.0.1.
#
#   deploy/tracking-server.sh start [DIR]   start both; prints the MLFLOW_TRACKING_URI to use
#   deploy/tracking-server.sh stop  [DIR]   stop both (the data stays in DIR)
#   deploy/tracking-server.sh uri   [DIR]   print the MLFLOW_TRACKING_URI again
#
# DIR (default .tracking-server) holds pgdata/, artifacts/, logs and the generated database
# password. Ports: MLFLOW_PORT (default 5000) and PG_PORT (default 5433).
# AUTH=1: MLflow's basic-auth app (users and permissions in DIR/basic_auth.db); the admin's
# password is generated into DIR/admin-password on the first start (MLflow 3 ships none and
# refuses to start the app without one), the app's CSRF key into DIR/flask-secret; needs
# `pip install -e ".[auth]"`; clients set MLFLOW_TRACKING_USERNAME/_PASSWORD.
# PostgreSQL refuses to run as root: as root, its processes run as the `postgres` user.
set -euo pipefail

command=${1:-}
dir=$(mkdir -p "${2:-.tracking-server}" && cd "${2:-.tracking-server}" && pwd)
mlflow_port=${MLFLOW_PORT:-5000}
pg_port=${PG_PORT:-5433}
pg_bin=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
[ -n "$pg_bin" ] && [ -x "$pg_bin/initdb" ] || { echo "error: PostgreSQL not found (apt-get install postgresql), or set PG_BIN" >&2; exit 1; }

as_pg() {  # run a PostgreSQL program as a non-root user
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start() {
  if [ ! -f "$dir/pgdata/PG_VERSION" ]; then
    umask 077
    head -c 24 /dev/urandom | base64 | tr -d '/+=' > "$dir/pg-password"
    mkdir -p "$dir/pgdata"
    [ "$(id -u)" = 0 ] && chown postgres "$dir" "$dir/pgdata" "$dir/pg-password"
    as_pg "$pg_bin/initdb" -D "$dir/pgdata" --username=mlflow --pwfile="$dir/pg-password" \
      --auth-local=scram-sha-256 --auth-host=scram-sha-256 >"$dir/initdb.log"
  fi
  [ "$(id -u)" = 0 ] && chown postgres "$dir"
  as_pg "$pg_bin/pg_ctl" -D "$dir/pgdata" -l "$dir/postgres.log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $pg_port -k $dir" start >/dev/null
  local password; password=$(cat "$dir/pg-password")
  if ! PGPASSWORD=$password "$pg_bin/psql" -h 127.0.0.1 -p "$pg_port" -U mlflow -d postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname='mlflow'" | grep -q 1; then
    PGPASSWORD=$password "$pg_bin/createdb" -h 127.0.0.1 -p "$pg_port" -U mlflow mlflow
  fi

  mkdir -p "$dir/artifacts"
  local auth=()
  if [ "${AUTH:-0}" = 1 ]; then
    [ -f "$dir/admin-password" ] || (umask 077; head -c 24 /dev/urandom | base64 | tr -d '/+=' > "$dir/admin-password")
    # the app's CSRF protection signs with this key; every worker must share it
    [ -f "$dir/flask-secret" ] || (umask 077; head -c 32 /dev/urandom | base64 | tr -d '/+=' > "$dir/flask-secret")
    printf '[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///%s/basic_auth.db\nadmin_username = admin\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\n' \
      "$dir" > "$dir/basic_auth.ini"
    auth=(--app-name basic-auth)
    export MLFLOW_AUTH_CONFIG_PATH="$dir/basic_auth.ini" MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY
    MLFLOW_AUTH_ADMIN_PASSWORD=$(cat "$dir/admin-password")
    MLFLOW_FLASK_SERVER_SECRET_KEY=$(cat "$dir/flask-secret")
  fi
  # setsid: the server gets its own process group, so `stop` ends it with all its workers.
  setsid mlflow server "${auth[@]}" \
    --backend-store-uri "postgresql+psycopg://mlflow:$password@127.0.0.1:$pg_port/mlflow" \
    --artifacts-destination "$dir/artifacts" --serve-artifacts \
    --host 127.0.0.1 --port "$mlflow_port" --workers "${MLFLOW_WORKERS:-2}" \
    >"$dir/mlflow.log" 2>&1 < /dev/null &
  echo $! > "$dir/mlflow.pid"
  echo "$mlflow_port" > "$dir/mlflow.port"
  for _ in $(seq 1 300); do  # a first start migrates the schema: can take minutes on a busy machine
    if curl -fsS "http://127.0.0.1:$mlflow_port/health" >/dev/null 2>&1; then
      if [ "${AUTH:-0}" = 1 ]; then
        echo "export MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD=\$(cat $dir/admin-password)"
      fi
      echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:$mlflow_port"
      return 0
    fi
    kill -0 "$(cat "$dir/mlflow.pid")" 2>/dev/null || break
    sleep 1
  done
  echo "error: mlflow server did not come up; see $dir/mlflow.log" >&2
  tail -n 5 "$dir/mlflow.log" >&2
  stop
  exit 1
}

stop() {
  if [ -f "$dir/mlflow.pid" ]; then
    kill -- -"$(cat "$dir/mlflow.pid")" 2>/dev/null || true
    rm -f "$dir/mlflow.pid"
  fi
  if [ -f "$dir/pgdata/postmaster.pid" ]; then
    as_pg "$pg_bin/pg_ctl" -D "$dir/pgdata" -m fast -w stop >/dev/null
  fi
  echo "stopped (data kept in $dir)"
}

case "$command" in
  start) start ;;
  stop) stop ;;
  uri) echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:$(cat "$dir/mlflow.port")" ;;
  *) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac

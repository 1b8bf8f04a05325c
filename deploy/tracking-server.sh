#!/usr/bin/env bash
# A shared MLflow tracking server on this machine: PostgreSQL for runs and the registry,
# a folder for artifacts served through the server (proxied), both bound to 127.0.0.1.
#
#   deploy/tracking-server.sh start [DIR]   start both; prints the MLFLOW_TRACKING_URI to use
#   deploy/tracking-server.sh stop  [DIR]   stop both (the data stays in DIR)
#   deploy/tracking-server.sh uri   [DIR]   print the MLFLOW_TRACKING_URI again
#
# DIR (default .tracking-server) holds pgdata/, artifacts/, logs and the generated secrets, all
# private to their owner (folders 0700, files 0600, re-applied on every start). Ports: MLFLOW_PORT
# (default 5000) and PG_PORT (default 5433). AUTH=1: MLflow's basic-auth app (users in
# DIR/basic_auth.db, admin password generated into DIR/admin-password; needs `pip install -e ".[auth]"`);
# clients set MLFLOW_TRACKING_USERNAME/_PASSWORD. More in the README's Security section.
#
# MLflow connects as the role `mlflow`, which owns the database `mlflow` and nothing more; its
# password is in the libpq password file DIR/mlflow-pgpass and never on a command line. The
# cluster's superuser (the OS user that runs PostgreSQL: `postgres` when started as root, which
# PostgreSQL refuses to run as) has no password and is reached only through the Unix socket in DIR
# (peer authentication). A DIR made by the earlier script (superuser `mlflow` with the password in
# DIR/pg-password) is migrated to this layout on its next start.
set -euo pipefail
umask 077  # what this script and the servers it starts create is private to its owner

command=${1:-}
usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
case "$command" in start | stop | uri) ;; *) usage ;; esac  # before DIR is made: nothing for an unknown command
dir=$(mkdir -p "${2:-.tracking-server}" && cd "${2:-.tracking-server}" && pwd)
mlflow_port=${MLFLOW_PORT:-5000}
pg_port=${PG_PORT:-5433}
pg_bin=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
[ -n "$pg_bin" ] && [ -x "$pg_bin/initdb" ] || { echo "error: PostgreSQL not found (apt-get install postgresql), or set PG_BIN" >&2; exit 1; }
if [ "$(id -u)" = 0 ]; then pg_user=postgres; else pg_user=$(id -un); fi
pgpass="$dir/mlflow-pgpass"
secret_length=24  # random bytes per generated password (base64, letters and digits kept)

as_pg() {  # run a PostgreSQL program as the cluster's OS user (from /: it may not enter our folder)
  if [ "$(id -u)" = 0 ]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

admin_sql() {  # SQL on stdin, as the superuser over the Unix socket (peer: no password exists)
  as_pg "$pg_bin/psql" -X -q -v ON_ERROR_STOP=1 -h "$dir" -p "$pg_port" -U "$pg_user" -d postgres "$@"
}

new_secret() { head -c "$secret_length" /dev/urandom | base64 | tr -d '/+='; }

give_to_pg() {  # as root, PostgreSQL's files belong to `postgres`, and DIR too (its socket lives there)
  if [ "$(id -u)" = 0 ]; then chown postgres "$dir" && chown -R postgres "$@"; fi
}

secure() {  # folders 0700, files 0600: also repairs what an earlier script or umask left open
  give_to_pg "$dir/pgdata"
  find "$dir" \( -type d -exec chmod 700 {} + \) -o \( -type f -exec chmod 600 {} + \)
}

write_hba() {  # who may connect: exactly two rules, rewritten on every start
  cat > "$dir/pgdata/pg_hba.conf" <<EOF
# Written by deploy/tracking-server.sh on every start; edits are lost.
# TYPE  DATABASE  USER        ADDRESS        METHOD
local   all       $pg_user                   peer
host    mlflow    mlflow      127.0.0.1/32   scram-sha-256
EOF
  : > "$dir/pgdata/pg_ident.conf"
  give_to_pg "$dir/pgdata/pg_hba.conf" "$dir/pgdata/pg_ident.conf"
}

pg_start() {  # $1: the addresses to listen on ('' = the Unix socket only)
  as_pg "$pg_bin/pg_ctl" -D "$dir/pgdata" -l "$dir/postgres.log" -w \
    -o "-c listen_addresses='$1' -p $pg_port -k $dir -c unix_socket_permissions=0700" start >/dev/null
}

pg_stop() { as_pg "$pg_bin/pg_ctl" -D "$dir/pgdata" -m fast -w stop >/dev/null; }

init_cluster() {
  mkdir -p "$dir/pgdata"
  give_to_pg "$dir/pgdata"
  as_pg "$pg_bin/initdb" -D "$dir/pgdata" --username="$pg_user" --auth-local=peer --auth-host=reject \
    >"$dir/initdb.log"
}

ensure_mlflow_role() {  # the role MLflow connects as: owns its database, no other privilege
  [ -s "$pgpass" ] || printf '127.0.0.1:*:mlflow:mlflow:%s\n' "$(new_secret)" > "$pgpass"
  local password; password=$(cut -d: -f5 "$pgpass")
  # The password reaches psql on stdin (printf is a shell builtin), never on a command line.
  printf '%s\n' \
    "SELECT NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mlflow') AS missing \\gset" \
    "\\if :missing" "CREATE ROLE mlflow;" "\\endif" \
    "ALTER ROLE mlflow LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD '$password';" \
    "SELECT NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mlflow') AS missing \\gset" \
    "\\if :missing" "CREATE DATABASE mlflow OWNER mlflow;" "\\endif" \
    "REVOKE ALL ON DATABASE mlflow FROM PUBLIC;" \
    "REVOKE ALL ON DATABASE postgres, template1 FROM PUBLIC;" | admin_sql
}

migrate() {  # a DIR of the earlier script: its superuser `mlflow` had a password on the command line
  echo "migrating $dir: MLflow connected as the database superuser, whose password was on the mlflow server command line; moving its data to a role that owns only its database" >&2
  # Reach the old superuser without its password: peer authentication mapped to it, socket only.
  printf 'local all mlflow peer map=migrate\n' > "$dir/pgdata/pg_hba.conf"
  printf 'migrate %s mlflow\n' "$pg_user" > "$dir/pgdata/pg_ident.conf"
  give_to_pg "$dir/pgdata/pg_hba.conf" "$dir/pgdata/pg_ident.conf"
  pg_start ''
  as_pg "$pg_bin/pg_dump" -h "$dir" -p "$pg_port" -U mlflow -d mlflow --format=custom --no-owner \
    --no-privileges -f "$dir/migration.dump"
  pg_stop
  mv "$dir/pgdata" "$dir/pgdata.old"
  init_cluster
  write_hba
  pg_start ''
  ensure_mlflow_role
  # --role: every restored table belongs to `mlflow`, as MLflow would have created it
  as_pg "$pg_bin/pg_restore" -h "$dir" -p "$pg_port" -U "$pg_user" -d mlflow --role=mlflow --no-owner \
    --no-privileges --exit-on-error "$dir/migration.dump"
  pg_stop
  rm -rf "$dir/pgdata.old" "$dir/migration.dump" "$dir/pg-password"
  echo "migrated $dir: MLflow now connects as role mlflow (password in $pgpass), the superuser $pg_user has no password and accepts only local peer connections; $dir/pg-password is removed" >&2
}

start() {
  if [ -f "$dir/mlflow.pid" ] && kill -0 "$(cat "$dir/mlflow.pid")" 2>/dev/null; then
    echo "error: the server of $dir is already running (pid $(cat "$dir/mlflow.pid")); stop it first: $0 stop $dir" >&2
    exit 1
  fi
  if [ -d "$dir/pgdata.old" ]; then
    echo "error: an earlier migration of $dir did not finish; its data is in $dir/pgdata.old: remove $dir/pgdata, rename $dir/pgdata.old to $dir/pgdata, then start again" >&2
    exit 1
  fi
  if [ -f "$dir/pg-password" ]; then
    if [ -f "$dir/pgdata/postmaster.pid" ]; then
      echo "error: $dir must be migrated but its PostgreSQL is running; stop it first: $0 stop $dir" >&2
      exit 1
    fi
    secure
    migrate
  fi
  [ -f "$dir/pgdata/PG_VERSION" ] || init_cluster
  write_hba
  secure
  pg_start 127.0.0.1
  ensure_mlflow_role

  mkdir -p "$dir/artifacts"
  local auth=()
  if [ "${AUTH:-0}" = 1 ]; then
    [ -f "$dir/admin-password" ] || new_secret > "$dir/admin-password"
    # the app's CSRF protection signs with this key; every worker must share it
    [ -f "$dir/flask-secret" ] || new_secret > "$dir/flask-secret"
    printf '[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///%s/basic_auth.db\nadmin_username = admin\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\n' \
      "$dir" > "$dir/basic_auth.ini"
    auth=(--app-name basic-auth)
    # secrets in the environment: only the same user (and root) can read /proc/PID/environ
    export MLFLOW_AUTH_CONFIG_PATH="$dir/basic_auth.ini" MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY
    MLFLOW_AUTH_ADMIN_PASSWORD=$(cat "$dir/admin-password")
    MLFLOW_FLASK_SERVER_SECRET_KEY=$(cat "$dir/flask-secret")
  fi
  # No password in the URI: libpq reads it from the file PGPASSFILE names (0600, owner only).
  # setsid: the server gets its own process group, so `stop` ends it with all its workers.
  PGPASSFILE=$pgpass setsid mlflow server "${auth[@]}" \
    --backend-store-uri "postgresql+psycopg://mlflow@127.0.0.1:$pg_port/mlflow" \
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
    pg_stop
  fi
  echo "stopped (data kept in $dir)"
}

case "$command" in
  start) start ;;
  stop) stop ;;
  uri) echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:$(cat "$dir/mlflow.port")" ;;
  *) usage ;;
esac

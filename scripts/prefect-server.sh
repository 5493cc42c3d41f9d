#!/usr/bin/env bash
# A local Prefect server for tests and CI, on 127.0.0.1, with its PREFECT_HOME (database, logs)
# under DIR; telemetry off. Ends only the process it started, by the pid in DIR.
#
#   scripts/prefect-server.sh start DIR [PORT]   # prints PREFECT_API_URL=http://127.0.0.1:PORT/api
#   scripts/prefect-server.sh stop DIR
#
# Without PORT a free one is chosen. PREFECT_SERVER_WAIT_S (default 120) bounds the wait for
# /api/health (the first start on a fresh database sets it up: 10-30 s).
set -euo pipefail

usage() { echo "usage: $0 start DIR [PORT] | stop DIR" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)
port=${3:-}
pidfile="$dir/prefect-server.pid"
log="$dir/prefect-server.log"
wait_s=${PREFECT_SERVER_WAIT_S:-120}
here=$(cd "$(dirname "$0")/.." && pwd)
prefect_bin=$(command -v prefect || true)
[ -n "$prefect_bin" ] || prefect_bin="$here/.venv/bin/prefect"

running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

healthy() {
    python3 - "$1" <<'PY' >/dev/null 2>&1
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=2) as response:
    sys.exit(0 if response.status == 200 else 1)
PY
}

case "$cmd" in
start)
    if running; then
        echo "a Prefect server started from $dir is running already (pid $(cat "$pidfile"))" >&2
        exit 1
    fi
    if [ -z "$port" ]; then
        port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    fi
    mkdir -p "$dir/home"
    PREFECT_HOME="$dir/home" PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 PREFECT_UI_ENABLED=false \
        PREFECT_SERVER_API_HOST=127.0.0.1 PREFECT_SERVER_API_PORT="$port" \
        nohup "$prefect_bin" server start --host 127.0.0.1 --port "$port" >"$log" 2>&1 </dev/null &
    echo $! >"$pidfile"
    url="http://127.0.0.1:$port/api"
    deadline=$((SECONDS + wait_s))
    until healthy "$url/health"; do
        if ! running; then
            echo "the Prefect server exited while starting; its log ($log):" >&2
            tail -n 30 "$log" >&2
            rm -f "$pidfile"
            exit 1
        fi
        if [ $SECONDS -ge $deadline ]; then
            echo "the Prefect server did not answer $url/health within ${wait_s}s; its log ($log):" >&2
            tail -n 30 "$log" >&2
            "$0" stop "$dir" || true
            exit 1
        fi
        sleep 0.5
    done
    echo "PREFECT_API_URL=$url"
    ;;
stop)
    if [ ! -f "$pidfile" ]; then
        echo "no Prefect server pid file in $dir" >&2
        exit 0
    fi
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "the Prefect server (pid $pid) did not stop within 20 s: killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile"
    ;;
*)
    usage
    ;;
esac

#!/usr/bin/env bash
# A local Prefect server for tests, CI and users, started and stopped with Prefect's own CLI:
# `prefect server start --background`, `prefect server status --wait`, `prefect server stop`.
# It listens on 127.0.0.1, keeps its PREFECT_HOME (database, pid file) under DIR, telemetry off.
#
#   scripts/prefect-server.sh start DIR [PORT]   # prints PREFECT_API_URL=http://127.0.0.1:PORT/api
#   scripts/prefect-server.sh stop DIR
#
# Without PORT a free one is chosen. PREFECT_SERVER_WAIT_S (default 120) bounds the wait for the
# API (the first start on a fresh database sets it up: 10-30 s). The UI is off unless
# PREFECT_SERVER_UI_ENABLED=true is set.
#
# What `--background` leaves to this script (Prefect 3.9):
# - it returns before the API answers: `prefect server status --wait` waits, a few seconds at a
#   time, so that a server that died while starting is seen at once rather than after the timeout;
# - the server's own output goes to pipes that nobody reads once `start` returns, so its log is
#   lost: DIR/prefect-server.log holds only what `start` printed (run `prefect server start`
#   without --background to see the server's log);
# - the server stays in the caller's session: it is started in a session of its own (setsid), so
#   a Ctrl-C meant for the caller does not stop it;
# - `prefect server stop` sends SIGTERM to the pid in PREFECT_HOME/server.pid and returns at once:
#   `stop` waits for that pid to end (SIGKILL after 20 s), so the port is free when it returns;
# - a server that died leaves its pid file, and `start --background` then refuses to start:
#   `start` lets `prefect server stop` clean a stale one first.
set -euo pipefail

usage() { echo "usage: $0 start DIR [PORT] | stop DIR" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)
port=${3:-}
home="$dir/home"
pidfile="$home/server.pid"   # written by `prefect server start --background`
log="$dir/prefect-server.log"
wait_s=${PREFECT_SERVER_WAIT_S:-120}
here=$(cd "$(dirname "$0")/.." && pwd)
prefect_bin=$(command -v prefect || true)
[ -n "$prefect_bin" ] || prefect_bin="$here/.venv/bin/prefect"

# Prefect's CLI for the server of DIR: its home, telemetry off, no other server's API.
prefect_here() {
    PREFECT_HOME="$home" PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 \
        PREFECT_SERVER_UI_ENABLED="${PREFECT_SERVER_UI_ENABLED:-false}" PREFECT_API_URL="${api_url:-}" \
        "$prefect_bin" "$@"
}

server_pid() { [ -s "$pidfile" ] && cat "$pidfile"; }
running() { local pid; pid=$(server_pid) && kill -0 "$pid" 2>/dev/null; }

case "$cmd" in
start)
    mkdir -p "$home"
    if running; then
        echo "a Prefect server started from $dir is running already (pid $(server_pid)); stop it with: $0 stop $dir" >&2
        exit 1
    fi
    [ -e "$pidfile" ] && prefect_here server stop >/dev/null   # a stale pid file: start would refuse
    if [ -z "$port" ]; then
        port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    fi
    if ! command -v setsid >/dev/null; then
        echo "setsid (util-linux) is needed to start the server in a session of its own" >&2
        exit 1
    fi
    PREFECT_HOME="$home" PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 \
        PREFECT_SERVER_UI_ENABLED="${PREFECT_SERVER_UI_ENABLED:-false}" PREFECT_API_URL="" \
        setsid -w "$prefect_bin" server start --background --host 127.0.0.1 --port "$port" --analytics-off \
        >"$log" 2>&1 </dev/null || {
            echo "prefect server start failed; its output ($log):" >&2
            tail -n 30 "$log" >&2
            exit 1
        }
    api_url="http://127.0.0.1:$port/api"
    deadline=$((SECONDS + wait_s))
    until prefect_here server status --wait --timeout 5 >>"$log" 2>&1; do
        if ! running || [ $SECONDS -ge $deadline ]; then
            if running; then
                echo "the Prefect server did not answer $api_url within ${wait_s}s" >&2
            else
                echo "the Prefect server exited while starting (run \`prefect server start\` without --background to see why)" >&2
            fi
            tail -n 20 "$log" >&2
            "$0" stop "$dir" || true
            exit 1
        fi
    done
    echo "PREFECT_API_URL=$api_url"
    ;;
stop)
    if ! pid=$(server_pid); then
        echo "no Prefect server started from $dir is running" >&2
        exit 0
    fi
    prefect_here server stop >/dev/null
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || exit 0; sleep 0.5; done
    echo "the Prefect server (pid $pid) did not stop within 20 s: killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
    ;;
*)
    usage
    ;;
esac

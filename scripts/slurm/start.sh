#!/usr/bin/env bash
# Start a single-node SLURM (slurmctld + slurmd, with munge) on this machine, for development and
# CI. Needs root; works without systemd. Installs Debian's packages first if they are missing.
#
#   bash scripts/slurm/start.sh          # then: export SLURM_CONF=/tmp/dasktrain-slurm/slurm.conf
#   bash scripts/slurm/stop.sh           # ends only the daemons this script started
#
#   DASKTRAIN_SLURM_DIR  where the config, pid files, state, spool and logs go (default /tmp/dasktrain-slurm)
#
# The daemons this script starts are recorded in $DIR/started (one name per line); their pids are
# in $DIR/<name>.pid. A daemon that was already running is used as it is and never recorded.
set -euo pipefail
DIR=${DASKTRAIN_SLURM_DIR:-/tmp/dasktrain-slurm}
HERE=$(cd "$(dirname "$0")" && pwd)
say() { echo "slurm: $*"; }
die() { echo "slurm: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "start.sh must run as root (it starts slurmctld, slurmd and munged)"

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sinfo >/dev/null \
    || ! command -v munged >/dev/null; then
  say "installing slurmctld slurmd slurm-client munge (Debian packages, --no-install-recommends)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # No systemd here: the packages' start attempts fail harmlessly; this script starts the daemons.
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

mkdir -p "$DIR/state" "$DIR/spool"
touch "$DIR/started"
record() { grep -qx "$1" "$DIR/started" || echo "$1" >> "$DIR/started"; }

# -- munge: a key, its run directory, and munged as the munge user ------------------------------
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  say "munged is already running; using it"
else
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key --force
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
  fi
  chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge && chmod 0755 /run/munge
  runuser -u munge -- munged --pid-file=/run/munge/munged.pid
  for _ in $(seq 50); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
  cp /run/munge/munged.pid "$DIR/munged.pid"
  record munged
  munge -n | unmunge >/dev/null || die "munged started but does not answer (see /var/log/munge/munged.log)"
fi

# -- slurm.conf for this node -------------------------------------------------------------------
HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))  # below the machine's memory
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
if ! alive "$DIR/slurmctld.pid" && ! alive "$DIR/slurmd.pid"; then
  sed -e "s|@DIR@|$DIR|g" -e "s|@HOST@|$HOST|g" -e "s|@CPUS@|$CPUS|g" -e "s|@MEMORY@|$MEM_MB|g" \
      -e "s|@CTLD_PORT@|${SLURMCTLD_PORT:-6817}|g" -e "s|@SLURMD_PORT@|${SLURMD_PORT:-6818}|g" \
      "$HERE/slurm.conf.in" > "$DIR/slurm.conf"
fi
export SLURM_CONF="$DIR/slurm.conf"

# -- the daemons (each forks into the background and writes its pid file under $DIR) -----------
if alive "$DIR/slurmctld.pid"; then say "slurmctld is already running (pid $(cat "$DIR/slurmctld.pid"))"
else slurmctld -f "$SLURM_CONF"; record slurmctld; fi
if alive "$DIR/slurmd.pid"; then say "slurmd is already running (pid $(cat "$DIR/slurmd.pid"))"
else slurmd -f "$SLURM_CONF"; record slurmd; fi

# `sinfo -o %T` says idle even for a node that does not answer; %t marks that with a '*'.
for _ in $(seq 150); do
  state=$(sinfo -h -N -o %t 2>/dev/null | head -1 || true)
  [ "$state" = idle ] && break
  sleep 0.2
done
[ "$state" = idle ] || die "node $HOST is '${state:-unknown}', not idle, after 30 s (logs: $DIR/slurmctld.log, $DIR/slurmd.log)"
say "node $HOST idle ($CPUS CPUs, ${MEM_MB} MB); clients need: export SLURM_CONF=$SLURM_CONF"

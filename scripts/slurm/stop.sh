#!/usr/bin/env bash
# Stop the daemons that scripts/slurm/start.sh started (and only those), by their pid files.
# Jobs still queued or running are cancelled first, so that no Dask worker outlives SLURM.
set -uo pipefail
DIR=${DASKTRAIN_SLURM_DIR:-/tmp/dasktrain-slurm}
say() { echo "slurm: $*"; }
[ -f "$DIR/started" ] || { say "nothing to stop: $DIR/started does not exist"; exit 0; }
export SLURM_CONF="$DIR/slurm.conf"

if grep -qx slurmctld "$DIR/started" && command -v squeue >/dev/null; then
  jobs=$(squeue -h -o %i 2>/dev/null || true)
  if [ -n "$jobs" ]; then
    say "cancelling jobs: $(echo $jobs)"
    scancel $jobs 2>/dev/null || true
    for _ in $(seq 100); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi

# slurmd first (it ends its jobs' process groups), then slurmctld, then munged.
status=0
for name in slurmd slurmctld munged; do
  grep -qx "$name" "$DIR/started" || continue
  pidfile="$DIR/$name.pid"
  pid=$(cat "$pidfile" 2>/dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      say "$name (pid $pid) did not stop in 10 s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    say "stopped $name (pid $pid)"
  fi
  rm -f "$pidfile"
  sed -i "/^$name\$/d" "$DIR/started"
done
exit $status

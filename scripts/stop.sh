#!/usr/bin/env bash
# Stop the TorchServe started by scripts/serve.sh (same scratch folder, so the same pid file)
# and wait until its processes are gone.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN="${KRYPTON_SERVE_DIR:-$ROOT/.serve}"
TS="$ROOT/.venv/bin/torchserve"
PIDFILE="$RUN/tmp/.model_server.pid"
if [ ! -f "$PIDFILE" ]; then
  echo "[stop] no TorchServe started from $RUN is running"
  exit 0
fi
PID="$(cat "$PIDFILE")"
TMPDIR="$RUN/tmp" TEMP="$RUN/tmp" "$TS" --stop --foreground || true
for _ in $(seq 1 30); do
  kill -0 "$PID" 2>/dev/null || break
  sleep 1
done
if kill -0 "$PID" 2>/dev/null; then
  echo "[stop] frontend $PID still alive after 30 s: sending SIGKILL" >&2
  kill -9 "$PID" 2>/dev/null || true
fi
rm -f "$PIDFILE"
echo "[stop] stopped (logs kept in $RUN/logs)"

#!/usr/bin/env bash
# Set up, archive the default models, start TorchServe with config.properties, wait until every
# registration has a READY worker, then print working curl examples and the stop command.
#
# Deployment (README "Deployment"): each archive is registered twice, NAME (predictions) and
# NAME_explain (explanations), each with its own worker and queue, so explanations never queue in front
# of predictions; POST /explanations/NAME then answers 404 naming /explanations/NAME_explain.
#
#   scripts/serve.sh                      # setup + archives + start (token authorization on)
#   scripts/serve.sh --shared             # one registration per archive: /predictions/NAME and
#                                         #   /explanations/NAME share its worker and queue (less memory)
#   scripts/serve.sh --no-token-auth      # local experiments only: no Authorization header needed
#   scripts/serve.sh --weights vgg16=/path/vgg16-397923af.pth   # real weights (repeatable)
#   scripts/serve.sh --no-setup --no-archive --timeout 600
#   scripts/stop.sh                       # stop it
#
# Scratch folder (logs, pid file, worker sockets, key_file.json, the sample photo): .serve/ in the
# repo, ignored by git through its own .gitignore. Override with KRYPTON_SERVE_DIR.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RUN="${KRYPTON_SERVE_DIR:-$ROOT/.serve}"
PY="$ROOT/.venv/bin/python"
TS="$ROOT/.venv/bin/torchserve"
SETUP=1; ARCHIVE=1; TOKEN=1; SHARED=0; TIMEOUT=600; WEIGHTS=()
log() { echo "[serve] $*"; }
die() { echo "[serve] ERROR: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --token-auth) TOKEN=1 ;;  # the default; kept for old command lines
    --no-token-auth) TOKEN=0 ;;
    --no-setup) SETUP=0 ;;
    --no-archive) ARCHIVE=0 ;;
    --timeout) shift; TIMEOUT="${1:?--timeout needs seconds}" ;;
    --weights) shift; WEIGHTS+=(--weights "${1:?--weights needs NAME=PATH}") ;;
    --shared) SHARED=1 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done

if [ "$SETUP" = 1 ]; then
  [ -f scripts/setup.sh ] || die "scripts/setup.sh is missing"
  bash scripts/setup.sh
fi
[ -x "$PY" ] && [ -x "$TS" ] || die "no .venv with torchserve: run scripts/setup.sh"

if [ "$ARCHIVE" = 1 ]; then
  "$PY" scripts/archive_models.py "${WEIGHTS[@]}"
fi
# load_models entries are NAME=FILE.mar (or FILE.mar, registered as FILE); --shared keeps one per file.
LOAD="$(sed -n 's/^load_models=//p' config.properties)"
if [ "$SHARED" = 1 ]; then
  LOAD="$(echo "$LOAD" | tr ',' '\n' | grep -v '^[A-Za-z0-9_]*_explain=' | paste -sd, -)"
fi
MODELS="$(echo "$LOAD" | tr ',' '\n' | sed 's/=.*//; s/\.mar$//' | tr '\n' ' ')"
for f in $(echo "$LOAD" | tr ',' '\n' | sed 's/^.*=//'); do
  [ -f "model_store/$f" ] || die "model_store/$f is missing: run scripts/archive_models.py"
done
# The handler reads this: NAME_explain registrations explain, NAME ones refuse explanations (404 naming
# NAME_explain). Set only when the layout has _explain registrations.
if echo "$LOAD" | tr ',' '\n' | grep -q '^[A-Za-z0-9_]*_explain='; then
  export KRYPTON_EXPLAIN_SUFFIX=_explain; EXPLAIN_SUFFIX=_explain
else
  unset KRYPTON_EXPLAIN_SUFFIX; EXPLAIN_SUFFIX=""
fi

# A previous instance from this scratch folder is stopped first; a foreign one holding the ports is an error.
if [ -f "$RUN/tmp/.model_server.pid" ]; then
  log "stopping the previous instance"
  bash "$ROOT/scripts/stop.sh" || true
fi
mkdir -p "$RUN/logs" "$RUN/tmp"
echo '*' > "$RUN/.gitignore"
PORTS="$(sed -n 's/^\(inference\|management\|metrics\)_address=.*:\([0-9]*\)$/\2/p' config.properties | tr '\n' ' ')"
for p in $PORTS; do
  if "$PY" -c "import socket,sys; s=socket.socket(); s.settimeout(0.5); sys.exit(0 if s.connect_ex(('127.0.0.1',$p))==0 else 1)"; then
    die "port $p on 127.0.0.1 is in use (another TorchServe? stop it with scripts/stop.sh or 'torchserve --stop')"
  fi
done

CONFIG="$ROOT/config.properties"
rm -f "$RUN/key_file.json"
if [ "$TOKEN" = 0 ] || [ "$SHARED" = 1 ]; then
  CONFIG="$RUN/config.properties"
  AUTH_OFF=false
  if [ "$TOKEN" = 0 ]; then
    AUTH_OFF=true
    log "token authorization OFF (--no-token-auth): any local process, and any web page open on this machine, can call it"
  fi
  sed "s/^disable_token_authorization=.*/disable_token_authorization=$AUTH_OFF/; s/^load_models=.*/load_models=$LOAD/" \
    "$ROOT/config.properties" > "$CONFIG"
  if [ "$SHARED" = 1 ]; then
    log "--shared: one registration per archive; explanations queue in front of its predictions"
  fi
fi

log "starting TorchServe (logs: $RUN/logs)"
(
  cd "$RUN"
  export TMPDIR="$RUN/tmp" TEMP="$RUN/tmp" LOG_LOCATION="$RUN/logs" METRICS_LOCATION="$RUN/logs"
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  "$TS" --start --ncs --model-store "$ROOT/model_store" --ts-config "$CONFIG" > "$RUN/logs/start.out" 2>&1
)

log "waiting for a READY worker of: $MODELS(timeout ${TIMEOUT}s)"
if ! "$PY" - "$TIMEOUT" "$RUN" $MODELS <<'EOF'
import json, os, sys, time, urllib.request
timeout, run, models = float(sys.argv[1]), sys.argv[2], sys.argv[3:]
deadline = time.time() + timeout
def headers():
    try:
        with open(os.path.join(run, "key_file.json")) as f:
            return {"Authorization": "Bearer " + json.load(f)["management"]["key"]}
    except (OSError, ValueError, KeyError):
        return {}
pending = list(models)
def load_failure(m):  # TorchServe retries a worker that failed to load forever: report it at once
    try:
        with open(os.path.join(run, "logs", "model_log.log"), errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    hit = [i for i, l in enumerate(lines) if f"Failed to load model {m}, exception" in l]
    return None if not hit else "\n".join(lines[max(0, hit[-1] - 30):hit[-1] + 1])
while pending and time.time() < deadline:
    for m in list(pending):
        err = load_failure(m)
        if err:
            print(f"[serve] ERROR: model {m} failed to load; the worker said:\n{err}", file=sys.stderr)
            sys.exit(2)
        try:
            req = urllib.request.Request(f"http://127.0.0.1:8081/models/{m}", headers=headers())
            with urllib.request.urlopen(req, timeout=5) as r:
                info = json.load(r)
            if any(w.get("status") == "READY" for w in info[0].get("workers", [])):
                print(f"[serve] {m}: READY after {timeout - (deadline - time.time()):.0f}s", flush=True)
                pending.remove(m)
        except Exception:
            pass
    time.sleep(1)
if pending:
    print(f"[serve] ERROR: not READY after {timeout:.0f}s: {' '.join(pending)}", file=sys.stderr)
    sys.exit(1)
EOF
then
  for f in "$RUN/logs/start.out" "$RUN/logs/ts_log.log" "$RUN/logs/model_log.log"; do
    [ -f "$f" ] && { echo "----- tail of $f" >&2; tail -n 40 "$f" >&2; }
  done
  echo "[serve] TorchServe is left running for inspection; stop it with: bash $ROOT/scripts/stop.sh" >&2
  exit 1
fi

PHOTO="$RUN/chelsea.jpg"
"$PY" - "$PHOTO" <<'EOF'
import sys
from PIL import Image
from skimage import data  # scikit-image's sample photo of Chelsea the cat (public domain)
Image.fromarray(data.chelsea()).save(sys.argv[1], quality=95)
EOF

AUTH=""; MAUTH=""; KEYNOTE=""
if [ "$TOKEN" = 1 ]; then
  key() { "$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]]["key"])' "$RUN/key_file.json" "$1"; }
  AUTH=" -H \"Authorization: Bearer $(key inference)\""
  MAUTH=" -H \"Authorization: Bearer $(key management)\""
  KEYNOTE="
Keys (token authorization is on): $RUN/key_file.json; the inference key goes to :8080, the
management key to :8081. They expire after token_expiration_min (TorchServe default 60 min); renew with
  curl -s -X POST -H \"Authorization: Bearer $(key API)\" \"http://127.0.0.1:8081/token?type=inference\"
then read the new key from the file (same for type=management)."
fi
cat <<EOF

TorchServe is up with: $MODELS
Explain (JSON; ~10-60 s on a 2-core CPU; explanations of NAME are served at /explanations/NAME$EXPLAIN_SUFFIX):
  curl -s -T $PHOTO$AUTH -H "X-Krypton-Stride: 16" http://127.0.0.1:8080/explanations/efficientnet_lite0$EXPLAIN_SUFFIX | head -c 1200; echo
Explain as a PNG overlay (the whole photo, the model's view in colour, a probability colour bar):
  curl -s -T $PHOTO$AUTH -H "X-Krypton-Stride: 16" -H "X-Krypton-Format: png" -o $RUN/heatmap.png http://127.0.0.1:8080/explanations/efficientnet_lite0$EXPLAIN_SUFFIX
Top-5 classes (predictions of NAME at /predictions/NAME):
  curl -s -T $PHOTO$AUTH http://127.0.0.1:8080/predictions/efficientnet_lite0
Model status (management API):
  curl -s$MAUTH http://127.0.0.1:8081/models/efficientnet_lite0
Metrics (TorchServe 0.12 serves them without a token):
  curl -s http://127.0.0.1:8082/metrics | grep Krypton$KEYNOTE
Stop:
  bash $ROOT/scripts/stop.sh
EOF

#!/usr/bin/env bash
# Idempotent project setup (also what CI runs from a clean clone):
#   1. .venv in the repo root (python3.11, else python3 >= 3.10) if missing
#   2. pinned runtime + test deps from requirements.txt (skipped when unchanged since last run)
#   3. the compiled op krypton._C via `pip install --no-build-isolation --no-deps -e .`
#      (rebuilt only when ext/, setup.py or pyproject.toml are newer than the built .so)
#   4. verifies that `import krypton.ops` loads the compiled op, fails loudly otherwise
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
log() { echo "[setup] $*"; }

# -- 1. venv -------------------------------------------------------------------------------
if [ ! -x "$PY" ] || ! "$PY" -c 'import sys' >/dev/null 2>&1; then
  BASE=""
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1 &&
       "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' >/dev/null 2>&1; then
      BASE="$cand"; break
    fi
  done
  [ -n "$BASE" ] || { echo "[setup] ERROR: need python3.11 (or python3 >= 3.10)" >&2; exit 1; }
  log "creating .venv with $BASE ($("$BASE" --version 2>&1))"
  rm -rf "$VENV"
  "$BASE" -m venv "$VENV"
fi
log "python: $("$PY" --version 2>&1) at $PY"

# -- 2. dependencies -------------------------------------------------------------------------
STAMP="$VENV/.krypton-requirements.sha256"
REQ_HASH="$(sha256sum requirements.txt | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$REQ_HASH" ] && "$PY" -c 'import torch' >/dev/null 2>&1; then
  log "requirements.txt unchanged since last install: skipping pip install -r"
else
  log "installing requirements.txt"
  "$PY" -m pip install -r requirements.txt
  echo "$REQ_HASH" > "$STAMP"
fi
log "torch $("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)')"

# -- 3. build the extension ------------------------------------------------------------------
so_file() { ls -t krypton/_C*.so 2>/dev/null | head -n 1; }
needs_build() {
  local so; so="$(so_file)"
  [ -n "$so" ] || { log "no krypton/_C*.so yet"; return 0; }
  "$PY" -m pip show -q krypton >/dev/null 2>&1 || { log "krypton not installed in .venv"; return 0; }
  local newer
  newer="$(find ext setup.py pyproject.toml -newer "$so" -type f 2>/dev/null | head -n 1)"
  [ -z "$newer" ] || { log "$newer is newer than $so"; return 0; }
  return 1
}
build() {
  log "building krypton._C (pip install --no-build-isolation --no-deps -e .)"
  # unlink first: processes that have the old library mapped keep their copy (overwriting it in
  # place could crash them)
  rm -f krypton/_C*.so
  "$PY" -m pip install --no-build-isolation --no-deps -e .
}
if needs_build; then build; else log "krypton._C is up to date: $(so_file)"; fi

# -- 4. verify ---------------------------------------------------------------------------------
verify() {
  env -u KRYPTON_FORCE_REFERENCE "$PY" -c 'import krypton.ops as o; print(o.backend()); import sys; sys.exit(0 if o.compiled_available() else 1)'
}
if ! BACKEND="$(verify)"; then
  log "the compiled op did not load (backend: ${BACKEND:-?}); rebuilding once"
  build
  BACKEND="$(verify)" || { echo "[setup] ERROR: krypton._C still does not load after a rebuild" >&2; exit 1; }
fi
log "krypton.ops.backend() = $BACKEND"

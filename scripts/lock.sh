#!/usr/bin/env bash
# FIRM's lock file (requirements-lock.txt): the exact versions, torch included, that the whole suite last passed with.
# `make test`, `make demo` and CI install from it, so a new release upstream cannot break a fresh clone.
#
#   scripts/lock.sh upgrade        (make upgrade) re-resolve to the newest releases that setup.py's ranges allow, in a
#                                  separate venv ($UPGRADE_VENV, default build/upgrade-venv); run the whole suite
#                                  there; rewrite the lock only when the suite passes. torch stays at $TORCH_SPEC
#                                  (default torch==2.13.0, the CPU build): an unpinned torch pulls a multi-GB CUDA one.
#   scripts/lock.sh freeze VENV    write the lock from VENV as it is (after the suite passed in it).
#
# Environment: PYTHON (python3), LOCK (requirements-lock.txt), PYTEST_WORKERS (2), PYTEST_ARGS (extra pytest arguments).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
LOCK=${LOCK:-requirements-lock.txt}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

freeze() {
  local venv=$1 tmp
  tmp=$(mktemp)
  {
    echo "# FIRM's lock: the exact versions the whole suite last passed with. make test / make demo / CI install from it."
    echo "# Written by scripts/lock.sh on $(date -u +%Y-%m-%d) for $("$venv/bin/python" -c 'import platform; print(platform.system(), platform.machine(), "CPython", platform.python_version())');"
    echo "# torch is pinned without its local label (+cpu), so the same line takes the CPU or a CUDA build."
    echo "# Move it with \`make upgrade\` (README: Reproducible installs); never edit versions by hand without a suite run."
    # --all keeps pip, setuptools and wheel (the editable install builds without isolation, from these).
    "$venv/bin/python" -m pip freeze --all --exclude-editable --disable-pip-version-check \
      | grep -vE '^(firm|-e )' \
      | sed -E 's/^(torch|torchvision|torchaudio)==([^+]+)\+.*/\1==\2/' \
      | LC_ALL=C sort -f
  } >"$tmp"
  grep -q '^transformers==' "$tmp" || { echo "lock.sh: $venv has no transformers; not writing $LOCK" >&2; exit 1; }
  mv "$tmp" "$LOCK"
  echo "lock.sh: wrote $LOCK ($(grep -vc '^#' "$LOCK") packages)"
}

case "${1:-}" in
  freeze)
    [ -x "${2:-}/bin/python" ] || { echo "usage: scripts/lock.sh freeze VENV" >&2; exit 2; }
    freeze "$2"
    ;;
  upgrade)
    venv=${UPGRADE_VENV:-build/upgrade-venv}
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip setuptools wheel
    "$venv/bin/python" -m pip install -q "$TORCH_SPEC"
    "$venv/bin/python" -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev]"
    "$venv/bin/python" -m pip check
    echo "lock.sh: the newest resolution, against the lock:"
    diff <(grep -v '^#' "$LOCK" 2>/dev/null | LC_ALL=C sort -f) \
         <("$venv/bin/python" -m pip freeze --all --exclude-editable | grep -vE '^(firm|-e )' \
           | sed -E 's/^(torch|torchvision|torchaudio)==([^+]+)\+.*/\1==\2/' | LC_ALL=C sort -f) || true
    # set -e: a failing suite stops here and the lock is left as it was.
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pytest -n "${PYTEST_WORKERS:-2}" ${PYTEST_ARGS:-}
    freeze "$venv"
    ;;
  *)
    echo "usage: scripts/lock.sh upgrade | freeze VENV" >&2
    exit 2
    ;;
esac

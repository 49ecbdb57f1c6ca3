#!/usr/bin/env bash
# fedsight developer entry point: creates .venv from requirements.lock when missing or stale,
# then runs a task.
#   ./run.sh demo [ARGS]   synthetic federation -> federated training -> clinician app
#   ./run.sh test [ARGS]   lint, import contracts, the whole test suite (extra ARGS go to pytest)
#   ./run.sh lock          rewrite requirements.lock from the current .venv
set -euo pipefail
cd "$(dirname "$0")"

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if command -v python3.11 >/dev/null 2>&1; then PY=python3.11; else PY=python3; fi
fi

ensure_venv() {
  local stamp=.venv/.fedsight-installed
  if [ -f "$stamp" ] && [ "$stamp" -nt requirements.lock ] && [ "$stamp" -nt pyproject.toml ]; then
    return
  fi
  if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "fedsight needs Python 3.11; $PY is $("$PY" --version 2>&1). Set PYTHON=/path/to/python3.11" >&2
    exit 2
  fi
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  # pip, not uv: pip here takes torch from the local wheel store (see shared STACK notes).
  .venv/bin/python -m pip install --quiet --upgrade "pip==25.3"
  .venv/bin/python -m pip install --quiet -r requirements.lock
  .venv/bin/python -m pip install --quiet --no-deps -e .
  touch "$stamp"
}

task="${1:-help}"; shift || true
case "$task" in
  demo)
    ensure_venv
    exec .venv/bin/fedsight demo "$@"
    ;;
  test)
    ensure_venv
    .venv/bin/ruff check .
    .venv/bin/lint-imports
    # Three workers, one test file each at a time (module fixtures built once): the long
    # integration files mostly wait on real processes, so they overlap with the rest
    # (tests/conftest.py starts them first). FEDSIGHT_TEST_WORKERS=0 runs in one process.
    exec .venv/bin/python -m pytest -n "${FEDSIGHT_TEST_WORKERS:-3}" --dist loadfile "$@"
    ;;
  lock)
    { echo "# Full tested environment (pip freeze of a working install, Python 3.11, x86_64)."
      echo "# Regenerate: ./run.sh lock"
      .venv/bin/python -m pip freeze --exclude-editable | grep -v '^fedsight'; } > requirements.lock
    ;;
  *)
    sed -n '2,7p' "$0"; exit 2 ;;
esac

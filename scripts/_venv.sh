# Sourced by the other scripts: make ./.venv with peerup and its test/dev extras.
# Idempotent and quick once done; a fresh machine needs only python3.11 and pip.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PEERUP_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x "$VENV/bin/python" ] || [ "$ROOT/pyproject.toml" -nt "$VENV/.installed" ]; then
  echo "setting up $VENV (first run only)..." >&2
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[test,dev]" >&2
  touch "$VENV/.installed"
fi
export PATH="$VENV/bin:$PATH"

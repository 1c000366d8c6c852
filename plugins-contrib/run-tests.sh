#!/usr/bin/env bash
# Install every contrib plugin (editable) into the active Python and run its tests.
# Needs peerup itself installed in that Python first (.ci/run does it). Exits non-zero
# if any install or any package's tests fail; every package is still tried.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python}"
status=0
for pkg in "$HERE"/*/; do
  [ -f "$pkg/pyproject.toml" ] || continue
  name="$(basename "$pkg")"
  echo "== contrib: $name"
  if ! "$PY" -m pip install --quiet -e "$pkg"; then
    echo "!! $name: install failed" >&2
    status=1
    continue
  fi
  # Run from the package so its own pyproject (pytest options, warnings) applies.
  if ! (cd "$pkg" && "$PY" -m pytest -p no:cacheprovider "$@"); then
    echo "!! $name: tests failed" >&2
    status=1
  fi
done
exit $status

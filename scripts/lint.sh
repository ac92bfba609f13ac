#!/usr/bin/env bash
# Lint and format the tracked files: ruff check and ruff format (Python; settings in pyproject.toml),
# clang-format (C++ and CUDA; settings in .clang-format).
#   scripts/lint.sh         check: change nothing, exit 1 if any tool has a finding
#   scripts/lint.sh --fix   apply ruff's safe fixes and both formatters
# The tools come from the venv (VENV, default .venv), where scripts/install.sh puts them (the dev
# extra pins their versions, so every machine formats alike); RUFF and CLANG_FORMAT override.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
RUFF=${RUFF:-$VENV/bin/ruff}
CLANG_FORMAT=${CLANG_FORMAT:-$VENV/bin/clang-format}
case "${1:-}" in
  --fix) FIX=1 ;;
  "") FIX=0 ;;
  *) echo "usage: scripts/lint.sh [--fix]" >&2; exit 2 ;;
esac
for tool in "$RUFF" "$CLANG_FORMAT"; do
  if [ ! -x "$tool" ]; then
    echo "scripts/lint.sh: $tool not found; run bash scripts/install.sh (it installs the dev extra)" >&2
    exit 2
  fi
done
mapfile -t PYTHON < <(git ls-files '*.py')
mapfile -t CXX < <(git ls-files '*.cpp' '*.h' '*.cu' '*.cuh')

status=0
if [ "$FIX" = 1 ]; then
  "$RUFF" check --fix "${PYTHON[@]}" || status=1
  "$RUFF" format "${PYTHON[@]}"
  "$CLANG_FORMAT" -i "${CXX[@]}"
else
  echo "== ruff check"
  "$RUFF" check "${PYTHON[@]}" || status=1
  echo "== ruff format --check"
  "$RUFF" format --check "${PYTHON[@]}" || status=1
  echo "== clang-format --dry-run"
  "$CLANG_FORMAT" --dry-run -Werror "${CXX[@]}" || status=1
fi
exit $status

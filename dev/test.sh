#!/usr/bin/env bash
# The whole gate, as the README says: install what is missing, then formatting, lint, types, tests.
# Services the tests need (a real Glance) are started by the test suite itself on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
dev/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"
ruff format --check src tests bench
ruff check src tests bench
mypy
pytest "$@"

#!/usr/bin/env bash
# The whole gate, as the README says: install what is missing, then formatting, lint, types, tests;
# then both ends of the dependency ranges: the package installed alone (no extras) into a fresh
# venv works (dev/check-install.sh), and the core tests pass on the minimum versions
# (dev/check-min.sh, .venv-min from constraints-min.txt). Arguments go to the main pytest run.
# Services the tests need (a real Glance) are started by the test suite itself on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
dev/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"
ruff format --check src tests bench
ruff check src tests bench
mypy
dev/check-install.sh
pytest "$@"
dev/check-min.sh

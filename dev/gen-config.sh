#!/usr/bin/env bash
# Regenerate etc/imagecache.conf.sample from the options table in src/imagecache/config.py
# (entry point oslo.config.opts = imagecache.config:list_opts). tests/test_config.py fails when
# the committed sample differs from what this writes. Needs the tool venv (dev/bootstrap.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p etc
# PYTHONUTF8: the generator opens --output-file in the locale's encoding; help texts are UTF-8.
PYTHONUTF8=1 .venv/bin/oslo-config-generator --namespace imagecache \
  --output-file etc/imagecache.conf.sample

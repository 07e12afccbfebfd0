#!/usr/bin/env bash
# The main job on an embedded sample: build a realistic host from real qcow2 images (qemu-img)
# under a temporary directory, then show `status` and `plan` for it. Changes nothing outside it.
set -euo pipefail
cd "$(dirname "$0")/.."
dev/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"
work=${1:-$(mktemp -d /tmp/imagecache-demo.XXXXXX)}
python -m imagecache._sample "$work" >/dev/null
echo "== sample host in $work (config $work/nova.conf)"
echo "== imagecache status"
imagecache --config-file "$work/nova.conf" --inventory "$work/inventory.json" status
echo
echo "== imagecache plan"
imagecache --config-file "$work/nova.conf" --inventory "$work/inventory.json" plan

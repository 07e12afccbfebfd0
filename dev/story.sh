#!/usr/bin/env bash
# dev/story.sh [WORKDIR]: the fetch story, all real. Starts a Glance 33 (dev/glance_up.sh) in a
# temporary directory, uploads a small qcow2 with curl, pre-caches it, creates an instance's disks
# on it, deletes the instance, and lets `clean` (with a 5 s threshold) remove the now unused
# bases. Stops Glance at the end. Changes nothing outside WORKDIR. Output is in the README.
set -euo pipefail
cd "$(dirname "$0")/.."
dev/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"
W=${1:-$(mktemp -d /tmp/imagecache-story.XXXXXX)}
PORT=${PORT:-19494}
U=http://127.0.0.1:$PORT
dev/glance_up.sh "$W/glance" "$PORT" >/dev/null
trap 'kill "$(cat "$W/glance/gunicorn.pid")"' EXIT
run() { echo "\$ $*" | sed "s#$W#\$W#g"; "$@" 2>&1 | sed "s#$W#\$W#g"; echo; }

cat >"$W/nova.conf" <<CONF
[DEFAULT]
instances_path = $W/instances
host = story
my_ip = 127.0.0.1
[glance]
api_servers = $U
[image_cache]
remove_unused_original_minimum_age_seconds = 5
[imagecache]
quarantine_seconds = 0
audit_log = $W/audit.jsonl
CONF
export IC="imagecache --config-file $W/nova.conf"

echo "== a Glance on $U; upload a 64 MiB qcow2 (4 MiB of data) with curl"
head -c 4M /dev/urandom >"$W/data.raw"
qemu-img convert -q -f raw -O qcow2 "$W/data.raw" "$W/tiny.qcow2"
qemu-img resize -q "$W/tiny.qcow2" 64M
ID=$(curl -sf -X POST "$U/v2/images" -H 'Content-Type: application/json' \
  -d '{"name": "tiny", "disk_format": "qcow2", "container_format": "bare"}' \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
curl -sf -X PUT "$U/v2/images/$ID/file" -H 'Content-Type: application/octet-stream' \
  -T "$W/tiny.qcow2"
echo "image $ID"
echo

echo "== pre-cache it (twice: the second finds it)"
run $IC precache "$ID"
run $IC precache "$ID"
echo "== an instance: root disk of 1 GiB and 128 MiB of swap, overlays on the cache"
run $IC create-disk --image "$ID" --instance 6b1f6a52-0000-4000-8000-000000000001 --size 1G --swap 128
run qemu-img info -U "$W/instances/6b1f6a52-0000-4000-8000-000000000001/disk"
run $IC status
echo "== the instance goes; 6 s later the bases are unused for longer than the 5 s threshold"
rm -r "$W/instances/6b1f6a52-0000-4000-8000-000000000001"
sleep 6
run $IC clean
run ls -A "$W/instances/_base"

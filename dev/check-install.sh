#!/usr/bin/env bash
# The package installed ALONE works: a fresh venv, `pip install .` with no extras (versions from
# constraints.txt), then that venv's imagecache runs --version, `python -m imagecache`, and
# `status` and `plan` on the embedded sample host, whose nova.conf sets instances_path but no
# my_ip (so oslo.utils finds the address). --os-cloud without the `clouds` extra must say so.
# Called by dev/test.sh after dev/bootstrap.sh; everything it makes is under one temporary
# directory, removed at the end. Takes ~15 s with pip's cache warm.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

tmp=$(mktemp -d /tmp/imagecache-install.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
venv=$tmp/venv
host=$tmp/host
fail() { echo "check-install: $*" >&2; exit 1; }

"$PY" -m venv "$venv"
# A wheel built from a clean copy of this tree (what a user's `pip install` gets, and no stale
# build/ or egg-info of the tree can leak into it), not an editable install.
mkdir "$tmp/tree"
tar -c --exclude=__pycache__ --exclude='*.egg-info' pyproject.toml README.md LICENSE src \
  | tar -x -C "$tmp/tree"
"$venv/bin/pip" install -q --disable-pip-version-check -c constraints.txt "$tmp/tree" 2>&1 \
  | grep -v "^WARNING: Location" || true
"$venv/bin/python" -c 'import imagecache' || fail "the package did not install"
"$venv/bin/pip" check >/dev/null || fail "pip check: $("$venv/bin/pip" check)"
if "$venv/bin/python" -c 'import openstack' 2>/dev/null; then
  fail "openstacksdk got installed without the clouds extra"
fi

cd "$tmp" # never import the source tree by accident
ic=$venv/bin/imagecache
"$ic" --version
"$venv/bin/python" -m imagecache --version

"$venv/bin/python" -m imagecache._sample "$host" >/dev/null
conf=$host/nova.conf
grep -q '^instances_path' "$conf" || fail "the sample nova.conf sets no instances_path"
! grep -q 'my_ip' "$conf" || fail "the sample nova.conf sets my_ip: nothing would be proven"
"$ic" --config-file "$conf" --inventory "$host/inventory.json" status >"$tmp/status.txt" \
  || fail "status exited $?: $(cat "$tmp/status.txt")"
"$ic" --config-file "$conf" --inventory "$host/inventory.json" plan >"$tmp/plan.txt" \
  || fail "plan exited $?: $(cat "$tmp/plan.txt")"
grep -q 'unused-expired' "$tmp/plan.txt" || fail "plan shows no expired entry: $(cat "$tmp/plan.txt")"

# --os-cloud needs the clouds extra: the ConfigError that names it, not a traceback (precache
# reports it per image, exit 1).
rc=0
"$ic" --config-file "$conf" --os-cloud devstack precache 7c3ad6a2-5f0d-4d1c-9a48-1f0e6f0b1a99 \
  >"$tmp/cloud.out" 2>&1 || rc=$?
[ "$rc" != 0 ] && grep -q "ConfigError: --os-cloud needs openstacksdk" "$tmp/cloud.out" \
  && ! grep -q Traceback "$tmp/cloud.out" \
  || fail "--os-cloud without openstacksdk exited $rc: $(cat "$tmp/cloud.out")"
echo "check-install: the package alone works ($(wc -l <"$tmp/status.txt") status lines, plan ok)"

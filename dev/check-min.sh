#!/usr/bin/env bash
# The floors in pyproject.toml are true: the core tests pass with every dependency at its minimum
# (constraints-min.txt) in .venv-min, an editable install of this tree with the test extra.
# The venv is rebuilt only when pyproject.toml, constraints-min.txt or this script change (a
# stamp, as dev/bootstrap.sh keeps for .venv). Called by dev/test.sh; arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
venv=.venv-min
stamp() { sha1sum pyproject.toml constraints-min.txt dev/check-min.sh | sha1sum | cut -d' ' -f1; }

if [ ! -x $venv/bin/python ] || [ "$(cat $venv/.stamp 2>/dev/null)" != "$(stamp)" ]; then
  rm -rf $venv # from scratch: nothing newer may linger from an older set of pins
  "$PY" -m venv $venv
  # netifaces (oslo.utils < 7.4) is built from source: gcc and python3-dev; libvirt-python too
  # (PyPI has only sdists): libvirt-dev and pkg-config (dev/bootstrap.sh).
  $venv/bin/pip install -q --disable-pip-version-check -c constraints-min.txt -e '.[test]' 2>&1 \
    | grep -v "^WARNING: Location" || true
  $venv/bin/pip check
  stamp >$venv/.stamp
fi

# The tests that exercise the dependencies: oslo.config and oslo.utils (config, cli, start-up
# with no my_ip), keystoneauth1, requests and urllib3 (the error table, URL sources, fetches
# from the real Glance), oslo.concurrency's lock (Nova's, at Debian 12's version), libvirt-python
# (the libvirt source, a real libvirtd running a guest), tooz and its redis and etcd3gw clients
# (coordination against a real Redis and etcd), keystoneauth1 again for listing Glance's images
# (capacity's upstream order), and the pure core on top of them. Files that do
# not exist yet are skipped.
shopt -s nullglob
tests=(
  tests/test_config.py tests/test_cli.py tests/test_read_only_imports.py tests/test_api.py
  tests/test_glance.py tests/test_fetch.py tests/test_hashing.py tests/test_locks.py
  tests/test_policy.py tests/test_executor.py tests/test_scan.py tests/test_formats.py
  tests/test_metrics*.py tests/test_logging*.py tests/test_packaging.py tests/test_libvirt*.py
  tests/test_coordination.py tests/test_upstream.py tests/test_capacity*.py tests/test_pins.py
)
exec $venv/bin/python -m pytest -q -p no:cacheprovider -m "not slow" "${tests[@]}" "$@"

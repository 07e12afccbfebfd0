#!/usr/bin/env bash
# Install everything imagecache needs on Debian 12, idempotently (run as root):
# Debian packages, the tool virtualenv (.venv, exact versions from constraints.txt) and the
# virtualenv of the real Glance the integration tests start (.venv-glance, glance-constraints.txt).
# A second run with everything present takes a second or two.
set -euo pipefail
cd "$(dirname "$0")/.."

# gcc, libc6-dev, python3-dev: dev/check-min.sh builds netifaces (oslo.utils < 7.4) from source.
# strace: tests/test_repair.py holds a kill between two block writes of a repair.
# libvirt-dev, pkg-config: pip builds libvirt-python (the libvirt extra; PyPI has only sdists).
# libvirt-daemon, libvirt-daemon-driver-qemu, libvirt-clients, libvirt-daemon-system (the user
# libvirt-qemu that libvirtd insists on), qemu-system-x86: the real libvirtd that
# tests/libvirtd.py starts to run a TCG guest, and qemu:///embed.
# redis-server, etcd-server: the real Redis and etcd that tests/services.py starts on free
# ports of 127.0.0.1 for the coordination tests (tooz's redis:// and etcd3+http:// drivers);
# etcd-client (etcdctl): to look at that etcd by hand. Their packages ship init scripts that
# would start them on 6379 and 2379 at install: the policy-rc.d below keeps them stopped.
DEBS=(qemu-utils curl dosfstools e2fsprogs util-linux procps python3-venv systemd logrotate
      gcc libc6-dev python3-dev strace
      libvirt-dev pkg-config libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
      libvirt-daemon-system qemu-system-x86
      redis-server etcd-server etcd-client)
missing=()
for p in "${DEBS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  # No service starts during the install: libvirt-daemon-system would start the machine's
  # libvirtd, redis-server a Redis on 6379 and etcd-server an etcd on 2379 (through invoke-rc.d,
  # or systemd where it runs), which the tests never use (they start their own). A
  # policy-rc.d that says no (101) while apt runs, unless the machine has one of its own.
  policy=/usr/sbin/policy-rc.d
  if [ ! -e $policy ] || grep -q "dev/bootstrap.sh" $policy; then
    printf '#!/bin/sh\n# dev/bootstrap.sh: no service starts during its apt-get install\nexit 101\n' \
      >$policy
    chmod 755 $policy
    trap 'rm -f '$policy EXIT
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
stamp() { sha1sum pyproject.toml constraints.txt "$@" | sha1sum | cut -d' ' -f1; }

if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.stamp 2>/dev/null)" != "$(stamp)" ]; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]' 2>&1 \
    | grep -v "^WARNING: Location" || true
  # fail loudly
  .venv/bin/python -c 'import imagecache, oslo_config, openstack, libvirt, tooz, redis, etcd3gw'
  stamp > .venv/.stamp
fi

if [ -f glance-constraints.txt ]; then
  if [ ! -x .venv-glance/bin/gunicorn ] \
     || [ "$(cat .venv-glance/.stamp 2>/dev/null)" != "$(sha1sum glance-constraints.txt)" ]; then
    [ -x .venv-glance/bin/python ] || "$PY" -m venv .venv-glance
    .venv-glance/bin/pip install -q --disable-pip-version-check -r glance-constraints.txt 2>&1 \
      | grep -v "^WARNING: Location" || true
    sha1sum glance-constraints.txt > .venv-glance/.stamp
  fi
fi

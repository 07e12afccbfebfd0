#!/usr/bin/env bash
# dev/glance_up.sh WORKDIR PORT
# A real OpenStack Glance 33.0.0 (PyPI) under gunicorn on 127.0.0.1 for the integration tests:
# no Keystone, sqlite, filesystem store in WORKDIR/images. Clients need no token and no identity
# headers (keystoneauth1 noauth, openstacksdk, curl): the stock empty paste flavor gives the
# "unauthenticated-context" pipeline (is_admin=True, roles=[]) and an allow-all policy.yaml lets
# that context through the role-based defaults. Consequences (shared/reference/components.md,
# appendix): images get owner=None, interoperable import fails (use plain uploads), and a
# deactivated image can still be downloaded because the context is admin.
#   GLANCE_VENV=/path/venv   a venv with glance==33.0.0 + gunicorn==27.0.1 (default: the repo's
#                            .venv-glance, which dev/bootstrap.sh installs from glance-constraints.txt)
# Prints the gunicorn master PID. Stop with: kill "$(cat WORKDIR/gunicorn.pid)"
set -euo pipefail
W=$(mkdir -p "${1:?usage: $0 WORKDIR PORT}" && cd "$1" && pwd)
PORT=${2:?usage: $0 WORKDIR PORT}
V=${GLANCE_VENV:-$(cd "$(dirname "$0")/.." && pwd)/.venv-glance}
U=http://127.0.0.1:$PORT

if [ ! -x "$V/bin/gunicorn" ] || [ ! -x "$V/bin/glance-manage" ]; then
  echo "no Glance venv at $V: run dev/bootstrap.sh (or set GLANCE_VENV)" >&2
  exit 1
fi
# With --daemon a bind failure only shows in gunicorn.log, and the health poll below would be
# answered by whatever already listens: refuse instead.
if curl -s -o /dev/null "$U/"; then echo "port $PORT already answers; stop the old server first" >&2; exit 1; fi
mkdir -p "$W"/{etc,images,staging,tasks}

cp "$V/etc/glance/glance-api-paste.ini" "$W/etc/"
sed -i "s#^disable_by_file_path = .*#disable_by_file_path = $W/healthcheck_disable#" "$W/etc/glance-api-paste.ini"

# Every rule whose default is not already "" becomes "" (allow). "default" and "metadef_default"
# are skipped: listing them makes oslo.policy warn about redundant rules.
"$V/bin/python" - >"$W/etc/policy.yaml" <<'PY'
import glance.policies
for rule in glance.policies.list_rules():
    if rule.check_str != '':
        print('"%s": ""' % rule.name)
PY

cat >"$W/etc/glance-api.conf" <<CONF
[DEFAULT]
enabled_backends = fs:file
log_file = $W/glance-api.log
[database]
connection = sqlite:///$W/glance.sqlite
[glance_store]
default_backend = fs
[fs]
filesystem_store_datadir = $W/images/
[os_glance_staging_store]
filesystem_store_datadir = $W/staging/
[os_glance_tasks_store]
filesystem_store_datadir = $W/tasks/
[paste_deploy]
flavor =
[oslo_policy]
policy_file = $W/etc/policy.yaml
CONF

"$V/bin/glance-manage" --config-file "$W/etc/glance-api.conf" db_sync >"$W/db_sync.log" 2>&1 \
  || { tail -30 "$W/db_sync.log" >&2; exit 1; }

rm -f "$W/gunicorn.pid"
# --no-control-socket: gunicorn 27 otherwise shares ~/.gunicorn/gunicorn.ctl between instances.
# access.log: one line per request, so tests can count downloads (GET /v2/images/<id>/file).
OS_GLANCE_CONFIG_DIR="$W/etc" "$V/bin/gunicorn" --daemon --no-control-socket \
  --bind "127.0.0.1:$PORT" --workers 1 --threads 4 --timeout 120 \
  --pid "$W/gunicorn.pid" --error-logfile "$W/gunicorn.log" --access-logfile "$W/access.log" \
  glance.wsgi.api:application

for _ in $(seq 1 300); do curl -sf "$U/healthcheck" >/dev/null && break; sleep 0.1; done
# A header-less read through the real pipeline must work, or something is wrong.
if ! curl -sf "$U/v2/images" >/dev/null; then
  tail -40 "$W/gunicorn.log" "$W/glance-api.log" >&2 || true
  if [ -s "$W/gunicorn.pid" ]; then kill "$(cat "$W/gunicorn.pid")" 2>/dev/null || true; fi
  exit 1
fi
cat "$W/gunicorn.pid"

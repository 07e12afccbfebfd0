"""Fixtures shared by the whole suite."""

from __future__ import annotations

# The real Glance, one per session, for tests marked @pytest.mark.glance; the real Redis and etcd
# (started on first use) and the ``coordination_url`` fixture over file, Redis and etcd.
pytest_plugins = ["tests.glance_server", "tests.services"]

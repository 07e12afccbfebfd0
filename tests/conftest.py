"""Fixtures shared by the whole suite."""

from __future__ import annotations

# The real Glance, one per session, for tests marked @pytest.mark.glance.
pytest_plugins = ["tests.glance_server"]

"""Observe Nova's ``compute_nodes``: which hosts share this storage (their records count)."""

from __future__ import annotations

from imagecache.layout import Layout
from imagecache.model import Problem
from imagecache.store.registry import Hosts, RegistryError, read_registry

__all__ = ["observe_registry"]


def observe_registry(layout: Layout) -> tuple[Hosts, tuple[Problem, ...]]:
    """The registered hosts; an unreadable or undecodable registry is one blocking problem.

    Missing means only this host. Undecodable is not an empty registry: Nova treating it as empty
    (LP 1252659) let hosts delete what other hosts' instances use.
    """
    try:
        return read_registry(layout), ()
    except RegistryError as exc:
        return (), (Problem(exc.code, layout.registry_file, str(exc)),)

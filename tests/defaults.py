"""Default settings and clocks for tests, from the one options table (never written again here)."""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

from imagecache.clock import Clock
from imagecache.config import load_settings
from imagecache.images.fetch import FetchOptions
from imagecache.layout import Layout
from imagecache.plan import Policy
from imagecache.settings import GlanceSettings, Settings

SYSTEM_CLOCK = Clock(wall=time.time, monotonic=time.monotonic, sleep=time.sleep)


@functools.cache
def defaults() -> Settings:
    """Every option at its default (no configuration file), host ``h1``."""
    return load_settings([], instances_path="/nonexistent/instances", host="h1")


def policy(**changes: Any) -> Policy:
    return dataclasses.replace(defaults().policy, **changes)


def glance(**changes: Any) -> GlanceSettings:
    return dataclasses.replace(defaults().glance, **changes)


def fetch_options(instances_path: Any, cache_name: str = "_base", **changes: Any) -> FetchOptions:
    options = FetchOptions.of(Layout(str(instances_path), cache_name), defaults().fetch)
    return dataclasses.replace(options, **changes)


def wall_clock(wall: Any) -> Clock:
    """The system's monotonic clock and sleep, with ``wall`` (a callable) as the wall clock."""
    return dataclasses.replace(SYSTEM_CLOCK, wall=wall)


class FakeClock:
    """A clock whose ``sleep`` advances time at once: lock deadlines without waiting."""

    def __init__(self, wall: float = 1_800_000_000.0) -> None:
        self.wall_now, self.mono_now, self.slept = wall, 0.0, 0.0

    def sleep(self, seconds: float) -> None:
        self.slept += seconds
        self.mono_now += seconds
        self.wall_now += seconds

    @property
    def clock(self) -> Clock:
        return Clock(wall=lambda: self.wall_now, monotonic=lambda: self.mono_now, sleep=self.sleep)

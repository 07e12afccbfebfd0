from __future__ import annotations

import time
from pathlib import Path

import imagecache
from imagecache import _sample as sample


def test_public_api_is_explicit_and_sorted() -> None:
    assert imagecache.__all__ == sorted(imagecache.__all__)
    assert all(not name.startswith("_") for name in imagecache.__all__)
    assert set(imagecache.__all__) <= set(dir(imagecache))


def test_the_read_only_flow_through_public_names_only(tmp_path: Path) -> None:
    # What the package docstring promises a library user: settings -> observe -> decide.
    host = sample.build(tmp_path / "host", now=time.time())
    settings = imagecache.load_settings([str(host.config)])
    inventory = imagecache.observe(settings, inventory_files=[str(host.inventory)])
    plan = imagecache.decide(inventory, settings.policy, time.time())
    assert isinstance(plan, imagecache.Plan) and plan.complete
    got = {d.entry.name: (str(d.entry.kind), str(d.action), str(d.reason)) for d in plan.decisions}
    assert got == sample.EXPECTED
    doc = imagecache.plan_to_dict(plan)
    assert len(doc["entries"]) == len(sample.EXPECTED)
    assert imagecache.classify(imagecache.fingerprint("x")) is imagecache.Kind.ORIGINAL

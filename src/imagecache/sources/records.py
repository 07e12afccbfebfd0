"""Observe instance records from inventory files (DESIGN.md §7): which ids and names are claimed.

An inventory is hostile input like everything else: a record whose text cannot be a file name's
(a lone surrogate), a number that is not a sane size, is a problem naming the file and the
record, never an exception later in the pass.
"""

from __future__ import annotations

from typing import Any

from imagecache import naming
from imagecache.model import InstanceRecord, Problem, ProblemCode
from imagecache.store.jsonfile import JsonFileError, read_json

__all__ = ["load_instance_records"]

_STR_FIELDS = ("name", "host", "image_ref", "kernel_id", "ramdisk_id", "ephemeral_format")
_STATE_FIELDS = ("vm_state", "task_state")
_INT_FIELDS = ("swap_mb", "ephemeral_gb")
_MAX_SIZE = 1 << 40  # MiB of swap, GiB of ephemeral disk: far beyond any real flavor


def load_instance_records(path: str) -> tuple[tuple[InstanceRecord, ...], tuple[Problem, ...]]:
    """Instance records from an inventory file; unknown fields are ignored.

    An unreadable or malformed file is one blocking problem, and so is each malformed record:
    without them the view is incomplete.
    """
    try:
        # Named by the operator (--inventory, inventory_files): a symlink they made is followed.
        doc = read_json(path, follow_symlinks=True)
    except JsonFileError as exc:
        code = ProblemCode.RECORDS_CORRUPT if exc.corrupt else ProblemCode.RECORDS_UNREADABLE
        return (), (Problem(code, path, str(exc)),)
    items = doc.get("instances") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        return (), (Problem(ProblemCode.RECORDS_CORRUPT, path, 'expected {"instances": [...]}'),)
    records: list[InstanceRecord] = []
    problems: list[Problem] = []
    for index, item in enumerate(items):
        try:
            records.append(_record(item))
        except (TypeError, ValueError) as exc:
            ref = f"{path}#instances[{index}]"
            problems.append(Problem(ProblemCode.RECORDS_CORRUPT, ref, str(exc)))
    return tuple(records), tuple(problems)


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string or null")
    if not naming.encodable(value):
        raise ValueError(f"{what} is not valid text: {value!r}")
    return value


def _record(item: Any) -> InstanceRecord:
    if not isinstance(item, dict) or not isinstance(item.get("uuid"), str) or not item["uuid"]:
        raise ValueError("every instance needs a non-empty string 'uuid'")
    uuid = _text(item["uuid"], "uuid")
    values: dict[str, Any] = {"uuid": uuid}
    for key in (*_STR_FIELDS, *_STATE_FIELDS):
        value = item.get(key)
        values[key] = None if value is None else _text(value, f"instance {uuid!r}: {key}")
    for key in _INT_FIELDS:
        value = item.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_SIZE
        ):
            raise TypeError(f"instance {uuid!r}: {key} must be an integer from 0 to 2**40 or null")
        values[key] = value
    return InstanceRecord(**values)

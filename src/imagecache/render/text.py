"""Text for people: sizes, durations, escaped names and tables. Pure."""

from __future__ import annotations

import json
from typing import Any

from imagecache._version import __version__
from imagecache.plan import iso

__all__ = ["document", "dumps", "human_bytes", "human_seconds", "iso", "printable", "render_table"]


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_seconds(seconds: float) -> str:
    sign, s = ("-", -seconds) if seconds < 0 else ("", seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{sign}{s / size:.1f}{unit}"
    return f"{sign}{s:.0f}s"


def document(body: dict[str, Any], *, schema: int = 1) -> dict[str, Any]:
    """A ``--json`` document: ``schema`` (an integer, raised on any incompatible change of this
    document) and ``version`` (the tool's) first, then ``body``."""
    return {"schema": schema, "version": __version__, **body}


# The compact form is written by json's C encoder; only an indent forces the pure-Python one.
# A document is a tree of fresh dicts and lists, never a cycle, so the encoder need not keep a
# set of the containers it is inside: that bookkeeping costs it about a tenth of its time on a
# large plan (performance issue 14). Every other option is json.dumps's default, so the bytes
# are exactly what ``json.dumps(doc)`` writes (non-ASCII and escaped bytes as ``\uXXXX``).
_COMPACT = json.JSONEncoder(check_circular=False)


def dumps(doc: Any, *, pretty: bool = False) -> str:
    """``doc`` as JSON text: indented by two spaces when ``pretty``, else on one line.

    Raises:
        TypeError: ``doc`` holds something JSON has no form for.
    """
    return json.dumps(doc, indent=2) if pretty else _COMPACT.encode(doc)


def printable(text: str) -> str:
    """``text`` with control characters and undecodable bytes escaped, for one table cell.

    A file named ``swap_10\\nswap_20`` must not print as two entries, nor a name that is not
    UTF-8 (surrogate-escaped by Python) stop the output.
    """
    if text.isprintable():
        return text
    return "".join(_escape_char(c) for c in text)


def _escape_char(c: str) -> str:
    if 0xDC80 <= ord(c) <= 0xDCFF:  # an undecodable byte, as os.fsdecode carries it
        return f"\\x{ord(c) - 0xDC00:02x}"
    return c if c.isprintable() else c.encode("unicode_escape").decode("ascii")


def render_table(rows: list[list[str]], header: list[str]) -> str:
    rows = [[printable(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    return "\n".join(lines)

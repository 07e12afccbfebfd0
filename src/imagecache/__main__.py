"""``python -m imagecache``: the command line."""

from imagecache.cli import run

run()

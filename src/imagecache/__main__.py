"""``python -m imagecache``: the command line."""

import sys

from imagecache.cli import main

sys.exit(main())

"""The version of imagecache, in one place (pyproject.toml reads it; plan documents carry it)."""

__version__ = "0.1.0"

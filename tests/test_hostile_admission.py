"""Admission of hostile qcow2 images: incompatible feature bits, external data files.

Every image is made by the real ``qemu-img`` (then a header bit patched where qemu-img cannot be
asked to set it) and fetched through a ``file://`` URL, the whole way a download goes; a refused
image must leave nothing in the cache, whatever ``force_raw_images`` says.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from imagecache.errors import UnsafeImageError
from imagecache.formats import read_header
from imagecache.formats.qcow2 import EXT_DATA_FILE
from imagecache.images.fetch import FetchOptions, ensure_cached
from imagecache.images.url import UrlSource
from imagecache.results import Result
from tests import qemu
from tests.defaults import fetch_options

FEATURES_AT = 72  # qcow2 v3: incompatible_features, 64 bits big-endian


def options(tmp_path: Path, *, force_raw: bool) -> FetchOptions:
    return fetch_options(tmp_path / "instances", force_raw=force_raw)


def cache_listing(opts: FetchOptions) -> list[str]:
    """The cache's entries and temps (not this project's own state: digest records)."""
    cache = Path(opts.cache_dir)
    return (
        sorted(p.name for p in cache.iterdir() if p.name != ".imagecache") if cache.exists() else []
    )


def set_feature_bits(path: Path, bits: int) -> Path:
    """OR ``bits`` into the image's incompatible_features, in place."""
    with path.open("r+b") as f:
        f.seek(FEATURES_AT)
        (old,) = struct.unpack(">Q", f.read(8))
        f.seek(FEATURES_AT)
        f.write(struct.pack(">Q", old | bits))
    return path


def data_file_image(tmp_path: Path) -> Path:
    # qemu-img resolves data_file against its working directory; the header names it relative.
    qemu.qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=data.raw", "df.qcow2", "1M",
                  cwd=tmp_path)  # fmt: skip
    return tmp_path / "df.qcow2"


def flagged_only(tmp_path: Path) -> Path:
    """A qcow2 with the external-data-file bit set and its name extension made unknown.

    qemu-img info still opens it (and reports no data file); converting it fails with
    "'data-file' is required": only the bit says that it reads another file.
    """
    path = data_file_image(tmp_path)
    data = bytearray(path.read_bytes())
    at = data.find(struct.pack(">I", EXT_DATA_FILE), FEATURES_AT)
    assert at > 0
    data[at : at + 4] = struct.pack(">I", 0x12345678)
    path.write_bytes(bytes(data))
    assert read_header(path).data_file is None
    return path


def plain(tmp_path: Path) -> Path:
    return qemu.make_qcow2(tmp_path / "plain.qcow2")


REFUSED = {
    # case: (make the image, what the refusal says)
    "data-file-named": (data_file_image, "external data file 'data.raw'"),
    "data-file-bit": (flagged_only, r"bit 2 \(external data file\)"),
    "dirty": (lambda t: set_feature_bits(plain(t), 1 << 0), r"bit 0 \(dirty"),
    "corrupt": (lambda t: set_feature_bits(plain(t), 1 << 1), r"bit 1 \(corrupt\)"),
    "unknown-bit-5": (lambda t: set_feature_bits(plain(t), 1 << 5), r"bit 5 \(unknown\)"),
    "unknown-bit-63": (lambda t: set_feature_bits(plain(t), 1 << 63), r"bit 63 \(unknown\)"),
}


@pytest.mark.parametrize("force_raw", [True, False], ids=["force-raw", "keep-format"])
@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_qcow2_with_a_refused_feature_is_never_published(
    tmp_path: Path, case: str, force_raw: bool
) -> None:
    make, message = REFUSED[case]
    src = tmp_path / "src"
    src.mkdir()
    image = make(src)
    opts = options(tmp_path, force_raw=force_raw)
    with pytest.raises(UnsafeImageError, match=message):
        ensure_cached(image.as_uri(), source=UrlSource(), options=opts)
    assert cache_listing(opts) == []  # nor a temp file left behind


@pytest.mark.parametrize("force_raw", [True, False], ids=["force-raw", "keep-format"])
@pytest.mark.parametrize("option", ["compression_type=zstd", "extended_l2=on"])
def test_a_qcow2_with_an_admitted_feature_is_cached(
    tmp_path: Path, option: str, force_raw: bool
) -> None:
    image = tmp_path / "src.qcow2"
    qemu.qemu_img("create", "-q", "-f", "qcow2", "-o", option, image, "1M")
    qemu.qemu_img("check", image)  # a clean image: only the admitted bit is set
    opts = options(tmp_path, force_raw=force_raw)
    got = ensure_cached(image.as_uri(), source=UrlSource(), options=opts)
    assert got.outcome is Result.CACHED
    assert read_header(got.path).format == ("raw" if force_raw else "qcow2")
    assert cache_listing(opts) == [got.name]

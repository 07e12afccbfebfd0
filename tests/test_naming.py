from __future__ import annotations

import pytest

from imagecache import naming
from imagecache.model import FileType, Kind

SHA = "0d5e6b61602d758984b3bf038267614d6016eb2a"


def test_fingerprint_matches_nova_fixture() -> None:
    assert naming.fingerprint("fd0cb2f1-8375-44c9-b1f4-3e1f4c4a8ef0") == SHA


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        (SHA, Kind.ORIGINAL),
        (SHA + "_sm", Kind.SMALL),
        (SHA + "_5", Kind.RESIZED),  # Nova's "> 42" check misses this one
        (SHA + "_10737418240", Kind.RESIZED),
        ("swap_512", Kind.SWAP),
        ("ephemeral_20_40d1d2c", Kind.EPHEMERAL),
        ("ephemeral_20_abcdefg", Kind.EPHEMERAL),
        ("fd0cb2f1-8375-44c9-b1f4-3e1f4c4a8ef0", Kind.LEGACY_ID),
        (SHA + ".part", Kind.TEMP),
        (SHA + ".converted", Kind.TEMP),
        (naming.temp_name(SHA, 42, "abc123"), Kind.TEMP),
        ("swap_", Kind.UNKNOWN),
        ("swap_abc", Kind.UNKNOWN),
        ("swap_129_", Kind.UNKNOWN),
        ("ephemeral_0_20_None", Kind.UNKNOWN),
        ("X" * 40, Kind.UNKNOWN),  # Nova deletes any 40-character name
        (SHA.upper(), Kind.UNKNOWN),
        (SHA + "_sm.info", Kind.UNKNOWN),
        (SHA + ".info", Kind.UNKNOWN),
        ("00000001", Kind.UNKNOWN),
        ("README", Kind.UNKNOWN),
    ],
)
def test_classify(name: str, kind: Kind) -> None:
    assert naming.classify(name) is kind


@pytest.mark.parametrize("file_type", [FileType.SYMLINK, FileType.DIRECTORY, FileType.OTHER])
def test_links_and_directories_are_never_entries(file_type: FileType) -> None:
    assert naming.classify(SHA, file_type) is Kind.UNKNOWN


def test_ephemeral_tags_match_nova() -> None:
    assert naming.ephemeral_tag(None) == "0706d66"
    assert naming.ephemeral_tag("ext4") == "40d1d2c"
    assert naming.ephemeral_tag("ext3") == "66f137c"
    assert naming.ephemeral_tag("ntfs") == "68e98b8"
    assert naming.ephemeral_name(4, "ext4") == "ephemeral_4_40d1d2c"


def test_temp_names_belong_to_their_entry() -> None:
    assert naming.entry_of_temp(naming.temp_name("swap_512", 7, "x")) == "swap_512"
    assert naming.entry_of_temp(SHA + ".part") == SHA
    assert naming.image_prefix(SHA + "_sm") == SHA
    assert naming.image_prefix("swap_512") is None

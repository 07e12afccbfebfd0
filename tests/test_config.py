from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imagecache.config import list_opts, load_settings
from imagecache.errors import ConfigError

SAMPLE = Path(__file__).resolve().parent.parent / "etc" / "imagecache.conf.sample"


def conf(tmp_path: Path, text: str, name: str = "nova.conf") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_are_novas(tmp_path: Path) -> None:
    s = load_settings([conf(tmp_path, "[DEFAULT]\nhost = h1\nmy_ip = 10.0.0.1\n")])
    assert s.instances_path == "/var/lib/nova/instances"
    assert s.cache_dir == "/var/lib/nova/instances/_base"
    assert (s.daemon.manager_interval, s.daemon.pass_interval) == (2400, 2400)
    assert s.policy.remove_unused is True
    assert s.policy.original_age == 86400
    assert s.policy.resized_age == 3600
    assert (s.verify.checksum_base_images, s.verify.checksum_interval) == (False, 3600)
    assert (s.policy.remove_unused_kernels, s.fetch.precache_concurrency, s.fetch.force_raw) == (
        False, 1, True)  # fmt: skip
    assert (s.clean.lock_timeout, s.policy.quarantine_seconds, s.policy.stale_temp_age) == (
        60.0, 86400, 86400)  # fmt: skip


def test_old_option_names_still_work(tmp_path: Path) -> None:
    # A Train-era nova.conf: everything under DEFAULT and libvirt.
    path = conf(
        tmp_path,
        "[DEFAULT]\nstate_path = /srv/nova\nmy_ip = 10.1.2.3\n"
        "image_cache_manager_interval = 0\nimage_cache_subdirectory_name = _base_$my_ip\n"
        "remove_unused_base_images = false\nremove_unused_original_minimum_age_seconds = 7\n"
        "[libvirt]\nremove_unused_resized_minimum_age_seconds = 8\n"
        "checksum_base_images = true\nremove_unused_kernels = true\n"
        "[glance]\napi_servers = http://glance:9292\n",  # unrelated sections are fine
    )
    s = load_settings([path])
    assert s.cache_dir == "/srv/nova/instances/_base_10.1.2.3"
    assert (s.daemon.manager_interval, s.daemon.pass_interval) == (0, 60)
    assert s.policy.remove_unused is False
    assert s.policy.original_age == 7
    assert s.policy.resized_age == 8
    assert s.verify.checksum_base_images and s.policy.remove_unused_kernels
    assert s.policy.original_age == 7 and not s.policy.remove_unused


def test_new_name_wins_over_old_and_later_files_win(tmp_path: Path) -> None:
    a = conf(tmp_path, "[DEFAULT]\nimage_cache_manager_interval = 10\n"
             "[image_cache]\nmanager_interval = 20\n", "a.conf")  # fmt: skip
    d = tmp_path / "nova.conf.d"
    d.mkdir()
    (d / "10-override.conf").write_text("[image_cache]\nmanager_interval = -1\n")
    s = load_settings([a])
    assert (s.daemon.nova_manager_interval, s.daemon.manager_interval) == (20, 20)
    s = load_settings([a], [str(d)])
    # Nova's manager off: imagecache's own interval takes Nova's default, not Nova's -1.
    assert (s.daemon.nova_manager_interval, s.daemon.manager_interval) == (-1, 2400)
    assert s.daemon.pass_interval == 2400


@pytest.mark.parametrize(
    ("text", "own", "nova", "every"),
    [
        ("", 2400, 2400, 2400),
        ("[image_cache]\nmanager_interval = 600\n", 600, 600, 600),
        ("[image_cache]\nmanager_interval = 0\n", 0, 0, 60),
        ("[image_cache]\nmanager_interval = -1\n", 2400, -1, 2400),
        ("[image_cache]\nmanager_interval = -1\n[imagecache]\nmanager_interval = 5\n", 5, -1, 5),
        ("[imagecache]\nmanager_interval = -1\n", -1, 2400, None),
    ],
)
def test_own_interval_defaults_to_novas_unless_novas_is_off(
    tmp_path: Path, text: str, own: int, nova: int, every: int | None
) -> None:
    s = load_settings([conf(tmp_path, text)]).daemon
    assert (s.manager_interval, s.nova_manager_interval, s.pass_interval) == (own, nova, every)


@pytest.mark.parametrize(
    ("text", "enabled"),
    [
        ("", True),  # Nova's defaults: its manager runs every 2400 s and removes
        ("[image_cache]\nmanager_interval = -1\n", False),
        ("[image_cache]\nremove_unused_base_images = false\n", False),
        ("[DEFAULT]\nimage_cache_manager_interval = 0\n", True),
    ],
)
def test_novas_own_manager_is_detected(tmp_path: Path, text: str, enabled: bool) -> None:
    assert load_settings([conf(tmp_path, text)]).nova_manager_enabled is enabled


@pytest.mark.parametrize(
    ("value", "parsed"),
    [("127.0.0.1:9477", ("127.0.0.1", 9477)), ("[::1]:0", ("::1", 0)), ("", None)],
)
def test_metrics_listen_is_address_and_port(
    tmp_path: Path, value: str, parsed: tuple[str, int] | None
) -> None:
    text = f"[imagecache]\nmetrics_listen = {value}\n"
    assert load_settings([conf(tmp_path, text)]).metrics.listen == parsed


@pytest.mark.parametrize("value", ["9477", "::1:9477", "host:", ":9477", "h:70000", "h:x"])
def test_a_bad_metrics_listen_names_the_option(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=r"\[imagecache\] metrics_listen"):
        load_settings([conf(tmp_path, f"[imagecache]\nmetrics_listen = {value}\n")])


def test_command_line_overrides_take_part_in_interpolation(tmp_path: Path) -> None:
    path = conf(tmp_path, "[DEFAULT]\ninstances_path = /nope\nhost = h1\n")
    s = load_settings([path], instances_path=str(tmp_path / "inst"), host="h2")
    assert s.cache_dir == str(tmp_path / "inst" / "_base") and s.host == "h2"


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("[image_cache]\nmanager_interval = soon\n", "[image_cache] manager_interval"),
        ("[DEFAULT]\nimage_cache_manager_interval = soon\n", "image_cache_manager_interval"),
        (
            "[image_cache]\nremove_unused_original_minimum_age_seconds = -1\n",
            "remove_unused_original_minimum_age_seconds",
        ),
        (
            "[libvirt]\nremove_unused_resized_minimum_age_seconds = -5\n",
            "remove_unused_resized_minimum_age_seconds",
        ),
        ("[image_cache]\nremove_unused_base_images = maybe\n", "remove_unused_base_images"),
        ("[imagecache]\nquarantine_seconds = -1\n", "[imagecache] quarantine_seconds"),
        ("[image_cache]\nsubdirectory_name = a/b\n", "subdirectory_name"),
        # Capacity (issue 13): the watermarks are checked together.
        (
            "[imagecache]\nhigh_watermark_percent = 80\nlow_watermark_percent = 80\n",
            "[imagecache] low_watermark_percent",
        ),
        (
            "[imagecache]\nhigh_watermark_percent = 80\nlow_watermark_percent = 0\n",
            "[imagecache] low_watermark_percent",
        ),
        ("[imagecache]\nlow_watermark_percent = 50\n", "[imagecache] low_watermark_percent"),
        ("[imagecache]\nhigh_watermark_percent = 101\n", "high_watermark_percent"),
        ("[imagecache]\nhigh_watermark_percent = nan\n", "high_watermark_percent"),
        ("[imagecache]\nmax_cache_bytes = 500G\n", "[imagecache] max_cache_bytes"),
        ("[imagecache]\nmax_cache_bytes = -1\n", "[imagecache] max_cache_bytes"),
        ("[imagecache]\nmin_unused_seconds = -1\n", "[imagecache] min_unused_seconds"),
        ("[imagecache]\nremove_max_bytes_per_second = -1\n", "remove_max_bytes_per_second"),
        ("[imagecache]\nremove_max_bytes_per_second = inf\n", "remove_max_bytes_per_second"),
    ],
)
def test_bad_values_name_the_option(tmp_path: Path, text: str, names: str) -> None:
    with pytest.raises(ConfigError, match=names.replace("[", r"\[").replace("]", r"\]")):
        load_settings([conf(tmp_path, text)])


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.conf"):
        load_settings([str(tmp_path / "missing.conf")])
    with pytest.raises(ConfigError, match="parse"):
        load_settings([conf(tmp_path, "[DEFAULT\nx")])
    assert ConfigError.exit_code == 2


def test_glance_section_builds_glance_settings(tmp_path: Path) -> None:
    s = load_settings(
        [
            conf(
                tmp_path,
                "[glance]\napi_servers = http://g1:9292,g2:9292\nauth_type = password\n"
                "auth_url = http://ks:5000/v3\nusername = nova\npassword = secret\n"
                "project_name = service\nuser_domain_name = Default\n"
                "project_domain_name = Default\nregion_name = R1\n"
                "valid_interfaces = internal\ninsecure = true\ntimeout = 30\n",
            )
        ]
    )
    g = s.glance
    assert g.api_servers == ("http://g1:9292", "g2:9292") and g.auth_type == "password"
    assert dict(g.auth_options) == {
        "auth_url": "http://ks:5000/v3",
        "username": "nova",
        "password": "secret",
        "project_name": "service",
        "user_domain_name": "Default",
        "project_domain_name": "Default",
    }
    assert (g.region_name, g.valid_interfaces, g.insecure, g.timeout) == (
        "R1",
        ("internal",),
        True,
        30,
    )
    assert g.os_cloud is None


def test_glance_endpoint_override_and_os_cloud(tmp_path: Path) -> None:
    path = conf(tmp_path, "[glance]\nendpoint_override = http://g:9292\n")
    assert load_settings([path]).glance.api_servers == ("http://g:9292",)
    assert load_settings([path], os_cloud="c1").glance.os_cloud == "c1"
    assert load_settings([conf(tmp_path, "")]).glance.api_servers == ()


def test_glance_unknown_auth_plugin_names_the_option(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[glance\] auth_type: unknown auth plugin 'bogus'"):
        load_settings([conf(tmp_path, "[glance]\nauth_type = bogus\n")])


def test_unset_my_ip_and_host_interpolate_real_values(tmp_path: Path) -> None:
    # `_base_$my_ip` with no my_ip must name the real per-host cache, never "_base_".
    s = load_settings([conf(tmp_path, "[image_cache]\nsubdirectory_name = _base_$my_ip\n"
                                      "[DEFAULT]\nstate_path = /srv/$host\n")])  # fmt: skip
    assert s.cache_dir == f"{s.instances_path}/_base_{_machine_ip()}"
    assert s.host and s.instances_path == f"/srv/{s.host}/instances"


def _machine_ip() -> str:
    from oslo_utils import netutils

    ip = str(netutils.get_my_ipv4())
    assert ip
    return ip


@pytest.mark.parametrize(
    ("text", "env"),
    [
        ("[image_cache]\nsubdirectory_name = _base_${my_ip}\n", {}),
        # through the environment, which oslo.config reads as a source of its own
        ("[DEFAULT]\n", {"OS_IMAGE_CACHE__SUBDIRECTORY_NAME": "_base_$my_ip"}),
    ],
)
def test_my_ip_is_found_however_a_value_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, env: dict[str, str]
) -> None:
    # Finding the address is skipped when nothing names it: nothing that names it may be missed.
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s = load_settings([conf(tmp_path, text)])
    assert s.cache_dir == f"{s.instances_path}/_base_{_machine_ip()}"


def test_my_ip_named_by_another_option_is_found(tmp_path: Path) -> None:
    s = load_settings([conf(tmp_path, "[DEFAULT]\nstate_path = /srv/$my_ip\n")])
    assert s.instances_path == f"/srv/{_machine_ip()}/instances"


def test_my_ip_in_a_config_dir_is_found(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    conf(tmp_path / "d", "[image_cache]\nsubdirectory_name = _base_$my_ip\n", "10-cache.conf")
    s = load_settings([conf(tmp_path, "[DEFAULT]\n")], [str(tmp_path / "d")])
    assert s.cache_dir == f"{s.instances_path}/_base_{_machine_ip()}"


def test_the_address_is_not_looked_up_when_nothing_names_it(tmp_path: Path) -> None:
    # psutil (through oslo_utils.netutils) is the most costly import of a pass that needs no IP.
    path = conf(tmp_path, "[DEFAULT]\nhost = h1\n[image_cache]\nsubdirectory_name = _base\n")
    code = (
        "import sys\nfrom imagecache.config import load_settings\n"
        f"load_settings([{path!r}])\n"
        "print(sorted(m for m in ('psutil', 'oslo_utils.netutils') if m in sys.modules))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
    argv = [sys.executable, "-c", code]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_inventory_files_option(tmp_path: Path) -> None:
    s = load_settings([conf(tmp_path, "[imagecache]\ninventory_files = /a.json, /b.json\n")])
    assert s.clean.inventory_files == ("/a.json", "/b.json")
    assert load_settings([conf(tmp_path, "[DEFAULT]\n", "empty.conf")]).clean.inventory_files == ()


def test_no_files_gives_the_documented_defaults() -> None:
    s = load_settings([])
    assert s.config_files == ()
    assert s.instances_path == "/var/lib/nova/instances"
    assert s.cache_dir == "/var/lib/nova/instances/_base"
    assert s.host  # the machine's name, not None
    assert s.daemon.manager_interval == 2400
    assert s.policy.remove_unused is True and s.fetch.force_raw is True
    assert (s.policy.quarantine_seconds, s.clean.touch_in_use) == (86400, True)
    assert s.clean.audit_log == "/var/log/imagecache/audit.jsonl"
    assert s.fetch.vmdk_allowed_types == frozenset({"streamOptimized", "monolithicSparse"})
    assert (s.glance.api_servers, s.glance.valid_interfaces) == ((), ("internal", "public"))


def test_committed_sample_is_what_the_generator_writes(tmp_path: Path) -> None:
    generator = Path(sys.executable).parent / "oslo-config-generator"
    assert generator.exists(), f"{generator} missing: oslo.config is not installed in this venv"
    out = tmp_path / "imagecache.conf.sample"
    # As dev/gen-config.sh does: the generator writes --output-file in the locale's encoding.
    env = {**os.environ, "PYTHONUTF8": "1"}
    subprocess.run(
        [str(generator), "--namespace", "imagecache", "--output-file", str(out)],
        check=True,
        env=env,
        timeout=120,
    )
    generated = out.read_text(encoding="utf-8")
    for group, opts in list_opts():
        for opt in opts:
            assert f"\n#{opt.dest} =" in generated, f"[{group}] {opt.dest} not in the sample"
    committed = SAMPLE.read_text(encoding="utf-8") if SAMPLE.exists() else ""
    assert generated == committed, f"{SAMPLE} is out of date: run dev/gen-config.sh"


def test_every_option_has_help_and_the_listing_is_stable() -> None:
    listing = list_opts()
    assert [(g, [o.dest for o in opts]) for g, opts in listing] == [
        (g, [o.dest for o in opts]) for g, opts in list_opts()
    ]
    seen: set[tuple[str, str]] = set()
    for group, opts in listing:
        for opt in opts:
            assert isinstance(opt.help, str) and opt.help.strip(), f"[{group}] {opt.dest}: no help"
            assert (group, opt.dest) not in seen, f"[{group}] {opt.dest} declared twice"
            seen.add((group, opt.dest))
    # Defaults that depend on the machine show a placeholder in the sample, never this host's.
    default = dict(listing)["DEFAULT"]
    for opt in default:
        if opt.dest in ("host", "my_ip"):
            assert opt.default is None and opt.sample_default, opt.dest


def _config_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "imagecache.config" and r.levelno == logging.WARNING
    ]


def test_typo_in_imagecache_section_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="imagecache.config")
    path = conf(tmp_path, "[imagecache]\nlock_timeout_secs = 5\n")
    s = load_settings([path])
    assert s.clean.lock_timeout == 60.0  # the misspelt option is ignored, its default in force
    (message,) = _config_warnings(caplog)
    assert path in message and "lock_timeout_secs" in message
    assert "did you mean lock_timeout_seconds?" in message

    caplog.clear()
    s = load_settings([conf(tmp_path, "[imagecache]\nlock_timeout_seconds = 5\n", "ok.conf")])
    assert s.clean.lock_timeout == 5.0
    assert _config_warnings(caplog) == []


def test_unknown_options_in_nova_groups_are_not_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # nova.conf holds many options imagecache never reads; only [imagecache] is ours alone.
    caplog.set_level(logging.WARNING, logger="imagecache.config")
    path = conf(
        tmp_path,
        "[DEFAULT]\ncompute_driver = libvirt.LibvirtDriver\nlock_timeout_secs = 5\n"
        "[libvirt]\nvirt_type = kvm\n[image_cache]\nmanager_intervall = 5\n"
        "[glance]\nnum_retries = 3\n[placement]\nregion_name = R1\n",
    )
    load_settings([path])
    assert _config_warnings(caplog) == []


def test_config_dir_files_are_checked_for_typos(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="imagecache.config")
    d = tmp_path / "imagecache.conf.d"
    d.mkdir()
    (d / "10-trash.conf").write_text("[imagecache]\nquarantine_secs = 0\n")
    (d / "20-ok.conf").write_text("[imagecache]\nstale_temp_seconds = 7\n")
    (d / "notes.txt").write_text("[imagecache]\nnot_read_at_all = 1\n")  # not *.conf: not read
    s = load_settings([conf(tmp_path, "[DEFAULT]\n")], [str(d)])
    assert (s.policy.quarantine_seconds, s.policy.stale_temp_age) == (86400, 7)
    (message,) = _config_warnings(caplog)
    assert str(d / "10-trash.conf") in message and "quarantine_secs" in message
    assert "did you mean quarantine_seconds?" in message

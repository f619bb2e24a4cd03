"""Configuration: the example validates; every mistake is one error naming the file and key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from harmonicd import config
from harmonicd.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
KEY = "ed25519:" + "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"


def test_example_config_validates() -> None:
    path = ROOT / "docs" / "harmonicd.example.toml"
    cfg = config.validate(tomllib.loads(path.read_text()), str(path))
    assert cfg.role in ("master", "node")


def _write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "h.toml"
    p.write_text(text)
    return str(p)


BASE = f"""
[server]
id = "school-1"
role = "node"
state_dir = "/var/lib/harmonicd"
[upstream]
master_key = "{KEY}"
"""


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (BASE.replace('role = "node"', 'role = "boss"'), "server.role"),
        (BASE + "[server2]\n", "server2"),
        (BASE.replace('id = "school-1"', 'id = "School 1"'), "server.id"),
        (BASE.replace("state_dir", "state_dri"), "server.state_dri"),
        (BASE.replace('"/var/lib/harmonicd"', '"relative/path"'), "server.state_dir"),
        (BASE.replace(KEY, "ed25519:zz"), "upstream.master_key"),
        (BASE + "[packs]\nvolume_size = \"5GiB\"\n", "packs.volume_size"),
        (BASE + "[packs]\nvolume_size = \"lots\"\n", "packs.volume_size"),
        (BASE + "[media]\ndevices = \"usb\"\n", "media.devices"),
        (BASE + "[collections.stats]\npath = \"/x\"\nwatch = true\n", "collections.stats.watch"),
        (BASE + "[archive]\nkeep_days = -1\n", "archive.keep_days"),
        (BASE + 'url = "ftp://master"\n', "upstream.url"),
        (BASE + 'window = "22-06"\n', "upstream.window"),
        (BASE + 'window = "25:00-06:00"\n', "upstream.window"),
        (BASE + 'window = "06:00-06:00"\n', "upstream.window"),
        (BASE + "interval_seconds = -5\n", "upstream.interval_seconds"),
        (BASE + 'rate_limit = "10B"\n', "upstream.rate_limit"),
        (BASE + 'url = "automatic"\n', "upstream.url"),
        (BASE + '[relay]\nqueue_quota = "10B"\n', "relay.queue_quota"),
        (BASE + '[relay]\nqueue = "1GiB"\n', "relay.queue"),
        (BASE.replace("[upstream]", '[upstream]').replace('state_dir = "/var/lib/harmonicd"',
                                                        'state_dir = "/var/lib/harmonicd"\nlisten = "8080"'),
         "server.listen"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    msg = str(info.value)
    assert path in msg
    assert key in msg
    assert "\n" not in msg


def test_auto_upstream_and_relay_quota(tmp_path: Path) -> None:
    cfg = config.load(_write(tmp_path, BASE + 'url = "auto"\n[relay]\nqueue_quota = "2GiB"\n'))
    assert cfg.upstream_url == config.AUTO_UPSTREAM
    assert cfg.relay_queue_quota == 2 << 30


def test_missing_and_unparsable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no configuration file"):
        config.load(str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(_write(tmp_path, "[server\n"))


def test_sizes() -> None:
    assert config.parse_size("3900MiB") == 3900 << 20
    assert config.parse_size(1000) == 1000
    with pytest.raises(ValueError, match="not a size"):
        config.parse_size("3.9G")


def test_sync_window_wraps_past_midnight() -> None:
    w = config.parse_window("22:00-06:00")
    assert w == (22 * 60, 6 * 60)
    assert config.in_window(w, 23 * 60)
    assert config.in_window(w, 5 * 60 + 59)
    assert not config.in_window(w, 6 * 60)
    assert not config.in_window(w, 12 * 60)
    day = config.parse_window("08:30-17:00")
    assert config.in_window(day, 8 * 60 + 30)
    assert not config.in_window(day, 17 * 60)
    assert config.in_window(None, 0)

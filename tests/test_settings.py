"""Settings layering and the one-line errors a user sees for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from peerup.core.errors import ConfigError
from peerup.core.settings import ProxySettings, check_service_name, load_settings


def write(home: Path, text: str) -> None:
    (home / "config.toml").write_text(text)


def test_defaults_are_the_seed_numbers(home: Path) -> None:
    settings = load_settings(home)
    assert settings.timeouts.local_dial == 10
    assert settings.timeouts.service_stream == 30
    assert settings.timeouts.idle is None
    assert (settings.retry.initial, settings.retry.multiplier, settings.retry.max_delay) == (1, 2, 60)
    assert settings.retry.retries == 3
    assert settings.home == home


def test_file_then_environment_then_flags(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(home, "[retry]\nretries = 5\n[timeouts]\nlocal_dial = 4\n")
    assert load_settings(home).retry.retries == 5
    monkeypatch.setenv("PEERUP_RETRY__RETRIES", "7")
    settings = load_settings(home)
    assert settings.retry.retries == 7
    assert settings.timeouts.local_dial == 4  # the file still counts for what env does not set
    assert load_settings(home, retry={"retries": 9}).retry.retries == 9


def test_home_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEERUP_HOME", str(tmp_path))
    write(tmp_path, "log_level = 'debug'\n")
    settings = load_settings()
    assert settings.home == tmp_path
    assert settings.log_level == "debug"


def test_per_service_timeouts_override_globals(home: Path) -> None:
    write(
        home,
        '[services.ssh]\naddress = "127.0.0.1:22"\nlocal_dial_timeout = 3\n'
        '[services.web]\naddress = "localhost:8080"\n',
    )
    settings = load_settings(home)
    ssh, web = settings.services["ssh"], settings.services["web"]
    assert settings.local_dial_timeout(ssh) == 3
    assert settings.local_dial_timeout(web) == 10
    assert settings.service_stream_timeout(ssh) == 30
    assert (ssh.host, ssh.port, ssh.protocol) == ("127.0.0.1", 22, "/peerup/service/ssh/1.0.0")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[timeouts]\nlocal_dial = 'soon'\n", "timeouts.local_dial: Input should be a valid number"),
        ("[timeouts]\nlocal_dial = -1\n", "timeouts.local_dial: Input should be greater than 0"),
        ("[services.ssh]\naddress = '127.0.0.1'\n", "services.ssh.address: '127.0.0.1': expected HOST:PORT"),
        ("[services.SSH]\naddress = '127.0.0.1:22'\n", "service name 'SSH'"),
        ('[services."ssh\\n"]\naddress = "127.0.0.1:22"\n', "service name 'ssh\\n'"),  # `$` matched before a newline
        ("[[proxies]]\npeer = 'home'\nservice = 'a b'\nport = 2222\n", "proxies.0.service: service name 'a b'"),
        ("retires = 3\n", "retires: Extra inputs are not permitted"),
        ("log_level = 'loud'\n", "log_level: expected one of debug, info"),
        ("[timeouts\n", "not valid TOML"),
    ],
)
def test_bad_file_is_one_line_naming_file_and_field(home: Path, text: str, expected: str) -> None:
    write(home, text)
    with pytest.raises(ConfigError) as info:
        load_settings(home)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(home / "config.toml"))
    assert expected in message


def test_a_file_that_is_not_utf8_is_one_line_naming_it(home: Path) -> None:
    (home / "config.toml").write_bytes(b'log_level = "info"\n\xff\xfe = 1\n')
    with pytest.raises(ConfigError) as info:
        load_settings(home)
    assert str(info.value) == f"{home / 'config.toml'}: not UTF-8 text (line 2: byte 0xff); TOML files must be UTF-8"


@pytest.mark.parametrize(
    ("name", "value", "example"),
    [
        ("PEERUP_RELAYS", "not json", """PEERUP_RELAYS='["/ip4/203.0.113.7/tcp/7777/p2p/12D3KooW..."]'"""),
        ("PEERUP_PEERS", "{home: x}", """PEERUP_PEERS='{"home": "12D3KooW..."}'"""),
        ("PEERUP_RELAY__LISTEN", "/ip4/0.0.0.0/tcp/7777", """PEERUP_RELAY__LISTEN='["/ip4/0.0.0.0/tcp/7777"]'"""),
        ("PEERUP_TIMEOUTS", "x", """PEERUP_TIMEOUTS='{"key": "value"}' (or one key at a time: PEERUP_TIMEOUTS__KEY"""),
    ],
)
def test_json_settings_in_the_environment_say_so_and_show_how(
    home: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str, example: str
) -> None:
    """pydantic-settings raised a SettingsError naming the top-level field only: a traceback for the user."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings(home)
    assert str(info.value).startswith(f"environment variable {name}: expects JSON, e.g. {example}")
    assert str(info.value).endswith(f"; got {value!r}")


def test_service_names_share_one_rule() -> None:
    assert check_service_name("ssh-2_b") == "ssh-2_b"
    for bad in ("a b", "ssh\n", "Web", "-x", "", "x" * 64, "a/b"):
        with pytest.raises(ValueError, match="expected lowercase letters"):
            check_service_name(bad)
    with pytest.raises(ValidationError, match="service name 'a b'"):
        ProxySettings(peer="home", service="a b", port=1)


def test_bad_environment_value_names_the_variable(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEERUP_RETRY__RETRIES", "many")
    with pytest.raises(ConfigError, match=r"^environment variable PEERUP_RETRY__RETRIES: retry.retries: "):
        load_settings(home)


def test_friendly_peer_names(home: Path) -> None:
    write(home, '[peers]\nhome = "12D3KooWExample"\n')
    settings = load_settings(home)
    assert settings.resolve_peer("home") == "12D3KooWExample"
    assert settings.resolve_peer("12D3KooWOther") == "12D3KooWOther"


def test_a_flag_for_one_nested_field_keeps_the_others(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(home, "[relay]\nmax_reservations = 5\n")
    monkeypatch.setenv("PEERUP_RELAY__MAX_CIRCUITS", "7")
    settings = load_settings(home, relay={"listen": ["/ip4/127.0.0.1/tcp/1"]})
    assert settings.relay.listen == ["/ip4/127.0.0.1/tcp/1"]
    assert (settings.relay.max_reservations, settings.relay.max_circuits) == (5, 7)

"""``peerup config validate`` and ``peerup service add|remove``: the file-level tools of issue #14."""

from __future__ import annotations

from pathlib import Path

import pytest

from peerup.core.config_edit import add_service, remove_service
from peerup.core.errors import ConfigError
from peerup.core.settings import load_settings
from peerup.core.validate import problems

COMMENTED = """\
# relay on the VPS
relays = []

[services.ssh]  # the one that matters
address = "127.0.0.1:22"
"""


def test_validate_lists_every_error_with_its_key(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        'log_level = "loud"\nsurprise = 1\n[services.web]\naddress = "8080"\n'
        '[tunnels.Bad]\npeer = "home"\nservice = "web"\nport = 99999\n[metrics]\nlisten = "nowhere"\n'
    )
    keys = [line.split(":")[0] for line in problems(path)]
    assert keys == [
        "log_level",
        "services.web.address",
        "tunnels.Bad.[key]",
        "tunnels.Bad.port",
        "metrics.listen",
        "surprise",
    ]


def test_validate_reports_a_syntax_error_with_its_line_and_passes_a_good_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('relays = []\n[services.ssh\naddress = "127.0.0.1:22"\n')
    [error] = problems(path)
    assert "not valid TOML" in error and "line 2" in error
    path.write_text(COMMENTED + '[tunnels.web]\npeer = "home"\nservice = "web"\nport = 8080\n')
    assert problems(path) == []
    assert problems(tmp_path / "absent.toml") == [f"{tmp_path / 'absent.toml'}: no such file"]


def test_service_add_and_remove_keep_comments_and_refuse_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(COMMENTED)
    assert add_service(path, "web", "127.0.0.1:8080", ["home"]) is True
    assert add_service(path, "web", "127.0.0.1:8081") is False  # replaced
    text = path.read_text()
    assert text.startswith(COMMENTED.rstrip("\n"))  # comments and layout untouched
    settings = load_settings(tmp_path)
    assert settings.services["web"].address == "127.0.0.1:8081" and settings.services["web"].allow is None
    with pytest.raises(ConfigError, match="expected HOST:PORT"):
        add_service(path, "api", "8080")
    with pytest.raises(ConfigError, match="service name 'Bad Name'"):
        add_service(path, "Bad Name", "127.0.0.1:1")
    assert path.read_text() == text  # a refused edit writes nothing
    assert remove_service(path, "web") is True
    assert remove_service(path, "web") is False
    assert path.read_text().rstrip("\n") == COMMENTED.rstrip("\n")
    assert path.stat().st_mode & 0o777 == 0o600

"""``peerup service add|remove``: edits to ``[services]`` in config.toml that keep the user's comments.

The new entry is checked by the same model as the file (name, HOST:PORT)
before anything is written, and written in one rename (files.edit_toml), so a
running daemon that reloads reads the old file or the new one, never half.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomlkit
from pydantic import ValidationError

from peerup.core.errors import ConfigError
from peerup.core.files import edit_toml
from peerup.core.settings import ServiceSettings, check_service_name


def add_service(path: Path, name: str, address: str, allow: list[str] | None = None) -> bool:
    """Add or replace ``[services.NAME]``; ``True`` when it is new."""
    try:
        check_service_name(name)
        ServiceSettings(name=name, address=address, allow=allow)
    except (ValueError, ValidationError) as exc:
        message = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
        raise ConfigError(f"service {name!r}: {message.removeprefix('Value error, ')}") from None
    added = True

    def change(document: Any) -> None:
        nonlocal added
        services = document.get("services")
        if services is None:
            services = tomlkit.table(is_super_table=True)
            document["services"] = services
        elif not isinstance(services, dict):
            raise ConfigError(f"{path}: `services` is not a table; fix it by hand first")
        added = name not in services
        entry = tomlkit.table()
        entry["address"] = address
        if allow is not None:
            entry["allow"] = allow
        services[name] = entry

    edit_toml(path, change)
    return added


def remove_service(path: Path, name: str) -> bool:
    """Remove ``[services.NAME]``; ``False`` when there was none (the file is then left as it was)."""
    found = False

    def change(document: Any) -> None:
        nonlocal found
        services = document.get("services")
        if isinstance(services, dict) and name in services:
            del services[name]
            found = True

    edit_toml(path, change)
    return found

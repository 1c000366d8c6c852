"""Reading this plugin's ``[plugin.jitter]`` section, with peerup's one-line errors.

peerup keeps every plugin's section as plain data (``Settings.plugin[NAME]``);
the plugin owns the schema. A bad value must read like peerup's own errors:
one line naming where it came from, the section and the field.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, TypeVar

from peerup.core.errors import ConfigError
from peerup.core.settings import Settings
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


def load_section(model: type[M], settings: Settings, name: str) -> M:
    """Validate ``[plugin.<name>]``; raise :class:`ConfigError` in one line if it is bad.

    Environment values arrive as strings; lists and tables given as JSON
    (``PEERUP_PLUGIN__X__ADDRS='["..."]'``) are decoded here, as peerup does for
    its own top-level settings.
    """
    raw: dict[str, Any] = {}
    for key, value in settings.plugin.get(name, {}).items():
        if isinstance(value, str) and value[:1] in "[{":
            with contextlib.suppress(json.JSONDecodeError):  # left as text: the model says what it expected
                value = json.loads(value)
        raw[key] = value
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(part) for part in first["loc"]]
        where = f"[plugin.{name}] {'.'.join(loc)}: " if loc else f"[plugin.{name}] "  # model checks name fields
        got = first.get("input")
        shown = "" if isinstance(got, dict | list) or got is None else f", got {got!r}"
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{_source(settings, name, loc)}: {where}{message}{shown}") from exc


def _source(settings: Settings, name: str, loc: list[str]) -> str:
    """The variable or file that holds the bad value, so the user knows what to edit."""
    for depth in range(len(loc), 0, -1):
        variable = "PEERUP_PLUGIN__" + "__".join([name, *loc[:depth]]).upper()
        if variable in os.environ:
            return f"environment variable {variable}"
    return str(settings.config_file)

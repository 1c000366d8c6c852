"""``peerup config validate``: every problem in a config file at once, each with its key, nothing started.

Loading settings stops at the first error (one line, so a failing start says
the one thing to fix); an operator editing the file before a reload wants the
whole list. The file alone is checked: no environment, no flags, so the
verdict is about the file that will be deployed.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import ValidationError

from peerup.core.settings import Settings


def problems(path: Path) -> list[str]:
    """One line per problem, ``KEY: what is wrong``; empty when the file is valid."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [f"{path}: no such file"]
    except UnicodeDecodeError as exc:
        return [f"{path}: not UTF-8 text ({exc.reason})"]
    except OSError as exc:
        return [f"{path}: cannot read: {exc.strerror}"]
    except tomllib.TOMLDecodeError as exc:
        return [f"{path}: not valid TOML: {exc}"]  # tomllib names the line and column
    if "home" in data:
        return ["home: not a config file setting (use --home or PEERUP_HOME)"]
    try:
        Settings.model_validate({**data, "home": path.parent})  # validation only: no env, no other sources
    except ValidationError as exc:
        out = []
        for error in exc.errors():
            key = ".".join(str(part) for part in error["loc"]) or "(file)"
            got = error.get("input")
            shown = "" if isinstance(got, dict | list) or got is None else f", got {got!r}"
            out.append(f"{key}: {error['msg'].removeprefix('Value error, ')}{shown}")
        return out
    return []

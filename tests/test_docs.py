"""Meta-tests: every setting a user can write is in the configuration reference."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from peerup.core.settings import ServiceSettings, Settings

DOCS = Path(__file__).parent.parent / "docs"


def dotted_names(model: type[BaseModel], prefix: str = "") -> list[str]:
    names = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names += dotted_names(annotation, f"{prefix}{name}.")
        else:
            names.append(prefix + name)
    return names


def test_every_setting_is_in_the_configuration_reference() -> None:
    reference = (DOCS / "configuration.md").read_text()
    # Tables keyed by a user's names are documented by their entries' form.
    tables = {"services": None, "plugin": "plugin.NAME.*"}
    names = [tables.get(name, name) for name in dotted_names(Settings)]
    names = [name for name in names if name is not None]
    names += [f"services.NAME.{name}" for name in ServiceSettings.model_fields if name != "name"]
    missing = [name for name in names if f"`{name}`" not in reference]
    assert missing == []


def test_readme_has_exactly_the_two_setup_commands() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = readme.split("## Set up", 1)[1].split("##", 1)[0]
    commands = [line for line in blocks.splitlines() if line.startswith("./")]
    assert commands == ["./scripts/demo", "./scripts/test"]

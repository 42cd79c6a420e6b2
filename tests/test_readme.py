"""The README documents what users configure and run."""

from __future__ import annotations

from pathlib import Path

from backend.settings import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_environment_variable_is_in_the_configuration_table():
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        names = [alias] if isinstance(alias, str) else list(alias.choices) if alias else [name.upper()]
        assert any(f"`{n}" in README for n in names), f"{names} missing from README.md's configuration table"


def test_the_quick_start_is_two_commands():
    assert "make demo" in README and "make test" in README

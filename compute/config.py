"""Shared bits for the validated config files in ``config/``: TOML loading and readable errors."""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from ops.errors import UserError

M = TypeVar("M", bound=BaseModel)


class ConfigError(UserError):
    """A config file is missing, malformed or inconsistent; the message says where and why."""


class Carrier(StrEnum):
    ELECTRICITY = "electricity"
    HEAT = "heat"
    STEAM = "steam"
    COOLING = "cooling"
    NATURAL_GAS = "natural_gas"
    DIESEL = "diesel"
    LPG = "lpg"
    COAL = "coal"


# GHG Protocol Scope 2: purchased energy. Everything else above is on-site combustion (Scope 1).
SCOPE2_CARRIERS = frozenset({Carrier.ELECTRICITY, Carrier.HEAT, Carrier.STEAM, Carrier.COOLING})


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def validate(model: type[M], data: Any, path: Path, where: str) -> M:
    """``model.model_validate(data)`` with errors naming the file, the entry and each bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(entry)'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"{path}: {where}: {problems}") from None


def entry_name(data: Any, section: str, index: int) -> str:
    ident = data.get("id") if isinstance(data, dict) else None
    return f"[[{section}]] #{index + 1}" + (f" (id={ident!r})" if ident else "")


def check_keys(data: dict[str, Any], path: Path, sections: Sequence[str]) -> None:
    """Refuse top-level keys other than ``sections`` (a typo would otherwise be ignored)."""
    unknown = set(data) - set(sections)
    if unknown:
        expected = f"only [[{sections[0]}]]" if len(sections) == 1 else str(sorted(sections))
        raise ConfigError(f"{path}: unknown top-level keys {sorted(unknown)}; expected {expected}")


def section_entries(data: dict[str, Any], path: Path, section: str, model: type[M]) -> list[M]:
    """The ``[[section]]`` array of tables, each entry validated with errors naming it."""
    raw = data.get(section, [])
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: '{section}' must be an array of tables ([[{section}]])")
    return [validate(model, item, path, entry_name(item, section, i)) for i, item in enumerate(raw)]

"""Loading a validated TOML file: the one place that turns a missing file, bad TOML or a failed
pydantic validation into a single error line naming the file (gateway configs, device maps and
simulation configs all load this way)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem, with the location in the file as a dotted path."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"{loc}: {err['msg']}")
    return "; ".join(lines)


def load_toml_model(
    path: Path, model: type[M], error: type[Exception], *, missing: str = "no such file"
) -> M:
    """``model`` validated from the TOML file at ``path``; every problem raised as ``error``."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: invalid TOML: {exc}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise error(f"{path}: {format_validation_error(exc)}") from None

"""The base of every typed, load-time-validated param block (stages, models, training).

Lives below the stage contract so that model and training code can declare their own
typed configs without knowing anything about stages."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Params(BaseModel):
    """Unknown keys are errors; values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def required_text(value: str | None, message: str) -> str:
    """``value`` stripped, or ``ValueError(message)`` when it is missing or blank: for params
    that have no sensible default (a source to read), so the error says what to set."""
    if not value or not value.strip():
        raise ValueError(message)
    return value.strip()


def required_field(description: str) -> Any:
    """A param with no default that is validated even when left out (pair it with a
    validator calling :func:`required_text`), so a missing one fails at load, named."""
    return Field(None, validate_default=True, description=f"required: {description}")

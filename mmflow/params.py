"""The base of every typed, load-time-validated param block (stages, models, training).

Lives below the stage contract so that model and training code can declare their own
typed configs without knowing anything about stages."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Params(BaseModel):
    """Unknown keys are errors; values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

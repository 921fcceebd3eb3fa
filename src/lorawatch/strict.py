"""The base of every config section: strict, so that a typo or an impossible value is an error, not a default."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    # No infinities or NaNs: an infinite weight or rate makes training numerically impossible.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

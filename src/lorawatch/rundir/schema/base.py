"""The two kinds of schema value: a Part (a piece of a record) and a Record (one JSON file, versioned)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, NonNegativeInt

SCHEMA_VERSION = 3


class Part(BaseModel):
    """A piece of a record: every field named, nothing unknown, no NaN or infinity. Read back strictly
    (store.read_record): a number must be a JSON number, not `true` or a string."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    def body(self) -> dict:
        """The fields that were given (a default left alone is not written), in the schema's order."""
        return self.model_dump(mode="json", exclude_unset=True)


class Record(Part):
    """One JSON file of a run folder."""

    schema_version: NonNegativeInt = 0  # 0: written before records were versioned

    def body(self) -> dict:
        """The record as it was written, without its version: what a resumed run carries forward."""
        return self.model_dump(mode="json", exclude_unset=True, exclude={"schema_version"})

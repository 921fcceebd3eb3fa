"""A stage's deployed forms (`lorawatch deploy`, deploy/deployed.py): the checkpoint merged, converted to GGUF in one
format and run by llama.cpp, in stage-K/deployed/<format>/. Its files:

    deployed.json           DeployedRecord, written last: the format is done for this stage
    deployed_drift.jsonl    one DeployedDrift row per reference row: the deployed form's next-token distribution at
                            the answer position against the PyTorch checkpoint's
    predictions/<task>.jsonl, predictions/reference.jsonl   the deployed form's outputs, scored as the run's are

These files are new since schema 3 and optional: a run folder without them reads as before (nothing deployed).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field, NonNegativeFloat, NonNegativeInt, StrictBool, StrictInt, StrictStr

from lorawatch.rundir.schema.base import Part, Record
from lorawatch.rundir.schema.stage import FiniteFloat


@dataclass(frozen=True)
class DeployedDrift:
    """One reference row: the deployed form (llama.cpp, this format) against the PyTorch checkpoint it was made
    from, at the answer position."""

    id: StrictStr
    task: StrictStr | None
    kl: FiniteFloat  # KL(deployed || checkpoint), nats
    kl_reverse: FiniteFloat  # KL(checkpoint || deployed): the direction of llama.cpp's --kl-divergence and of export
    same_top1: StrictBool  # the most likely next token is the checkpoint's
    top1_token: StrictInt  # the deployed form's most likely next token

    def to_dict(self) -> dict:
        return {"id": self.id, "task": self.task, "kl": self.kl, "kl_reverse": self.kl_reverse,
                "same_top1": self.same_top1, "top1_token": self.top1_token}


class DeployedDriftSummary(Part):
    """deployed_drift.jsonl summed up: means over the reference rows."""

    rows: NonNegativeInt
    kl_mean: NonNegativeFloat  # KL(deployed || checkpoint)
    kl_max: NonNegativeFloat
    kl_reverse_mean: NonNegativeFloat  # KL(checkpoint || deployed)
    kl_reverse_max: NonNegativeFloat
    same_top1: float = Field(ge=0, le=1)  # share of reference rows whose top-1 token is the checkpoint's


class DeployedRecord(Record):
    """deployed.json: one stage in one deployed format, measured through llama.cpp."""

    stage: NonNegativeInt
    checkpoint: str
    format: str  # a GGUF type: f16, q8_0, q4_k_m, ...
    llama_cpp: str  # llama-cpp-python's version (its llama.cpp converted, quantized and ran the file)
    file_bytes: NonNegativeInt  # the GGUF file's size
    max_new_tokens: NonNegativeInt  # the run's eval.max_new_tokens, greedy
    accuracy: dict[str, float]  # task (and "reference") -> the deployed form's accuracy on the same rows
    # task (and "reference") -> share of rows whose output tokens equal the PyTorch checkpoint's stored ones (None:
    # the checkpoint's predictions have no output_ids, a folder from before they were stored)
    identical: dict[str, float | None]
    reference: DeployedDriftSummary
    generated_tokens: NonNegativeInt  # tokens llama.cpp generated in `seconds` (parts read back from disk excluded)
    seconds: NonNegativeFloat  # wall time of llama.cpp's prompt processing and decoding, single stream
    threads: NonNegativeInt  # llama.cpp's threads

    @property
    def tokens_per_second(self) -> float | None:
        return self.generated_tokens / self.seconds if self.seconds > 0 and self.generated_tokens else None

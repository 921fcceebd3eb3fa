"""How far an exported form is from the checkpoint it was made from, on the run's reference set: at each row's
answer position, KL(checkpoint || export) of the next-token distribution and whether the most likely token is the
same. Each format has a bar; a form below a hard bar is not declared written."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# format -> (least top-1 agreement, largest per-row KL or None, hard). A hard bar refuses the export; an advisory one
# (lossy quantization, where some drift is the price of the format) is reported beside the numbers.
# Same precision as the checkpoint (hf, f32) and f16 keep the top-1 token on at least 99% of reference rows; q8_0
# is held to 95% and 4-bit types to 80%, advisory, until measured runs say more (docs/deployment.md).
BARS: dict[str, tuple[float, float | None, bool]] = {
    "hf": (0.99, 1e-3, True),
    "f32": (0.99, 1e-3, True),
    "f16": (0.99, None, True),
    "bf16": (0.99, None, True),
    "q8_0": (0.95, None, False),
}
LOW_BIT_BAR = (0.80, None, False)


def bar_of(form: str) -> tuple[float, float | None, bool]:
    return BARS.get(form, LOW_BIT_BAR)


@dataclass(frozen=True)
class Agreement:
    form: str  # hf, f16, q8_0, ...
    rows: int
    top1_agreement: float  # share of reference rows whose most likely next token is the checkpoint's
    kl_mean: float  # KL(checkpoint || export), mean and max over the reference rows, in nats
    kl_max: float

    @property
    def passes(self) -> bool:
        least, max_kl, _ = bar_of(self.form)
        return self.top1_agreement >= least and (max_kl is None or self.kl_max <= max_kl)

    @property
    def hard(self) -> bool:
        return bar_of(self.form)[2]

    def bar_text(self) -> str:
        least, max_kl, hard = bar_of(self.form)
        text = f"top-1 agreement ≥ {least:.0%}" + ("" if max_kl is None else f", max KL ≤ {max_kl:g}")
        return text + ("" if hard else " (advisory)")

    def line(self) -> str:
        return (f"{self.form}: top-1 agreement {self.top1_agreement:.1%} on {self.rows} reference rows, KL to the "
                f"checkpoint mean {self.kl_mean:.2e} max {self.kl_max:.2e} (bar: {self.bar_text()}"
                f"{'' if self.passes else ', NOT MET'})")

    def to_dict(self) -> dict:
        return {"form": self.form, "rows": self.rows, "top1_agreement": self.top1_agreement, "kl_mean": self.kl_mean,
                "kl_max": self.kl_max, "bar": self.bar_text(), "passes": self.passes}


def agreement(form: str, checkpoint: torch.Tensor, exported: torch.Tensor) -> Agreement:
    """Both [rows, vocab] logits or log-probabilities of the same reference rows. A GGUF vocabulary can be longer
    than the checkpoint's (padding tokens the converter adds): only the checkpoint's tokens are compared."""
    vocab = min(checkpoint.shape[-1], exported.shape[-1])
    ours = torch.log_softmax(checkpoint[:, :vocab].float(), dim=-1)
    theirs = torch.log_softmax(exported[:, :vocab].float(), dim=-1)
    kl = (ours.exp() * (ours - theirs)).sum(-1).clamp(min=0.0)  # clamp: float round-off below 0
    same = (ours.argmax(-1) == theirs.argmax(-1)).float()
    return Agreement(form=form, rows=len(ours), top1_agreement=float(same.mean()), kl_mean=float(kl.mean()),
                     kl_max=float(kl.max()))

"""`lorawatch gate RUN`: may this checkpoint ship? For CI: exit 0 when nothing regressed and every limit holds,
2 when a task regressed or a limit is exceeded (one line per reason), 1 on an error.

A checkpoint is compared with another of the same seed on the same test rows (verdicts.compare_stages): a task
regressed when its exact McNemar p, adjusted over the tasks, is below alpha and its accuracy fell. Optional limits:
the negative flip rate of any task (`max_nfr`) and the KL to base on the reference set (`max_kl`). A gated stage
whose adapter had no effect (its stage.json's adapter check: the base model's distributions on every reference
row) always fails: its numbers are the base model's. Where the gated stage has deployed forms (`lorawatch deploy`:
the checkpoint through llama.cpp in a GGUF format), a form whose accuracy on a task regressed against the PyTorch
checkpoint on the same rows (the same paired verdict) fails, and `max_deploy_kl` limits each form's mean
KL(checkpoint ‖ deployed) on the reference set (asked for a stage without deployed forms, it is an error, never a
silent pass). RUN is a run folder (`lorawatch run` or `evaluate`) or a
study folder, whose every unit is gated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lorawatch.rundir.layout import RunFolder
from lorawatch.report import verdict_view
from lorawatch.errors import UserError
from lorawatch.rundir.lifecycle import is_run_folder
from lorawatch.report.tables import load_run_config
from lorawatch.analysis.deployed import seed_results as deployed_results
from lorawatch.analysis.verdicts import compare_stages, seed_outcomes


@dataclass
class GateResult:
    reasons: list[str] = field(default_factory=list)  # why it fails; empty when it passes
    checks: list[dict] = field(default_factory=list)  # every seed gated: what was compared and found
    lines: list[str] = field(default_factory=list)  # one per check, for people

    @property
    def passed(self) -> bool:
        return not self.reasons

    def to_dict(self) -> dict:
        return {"passed": self.passed, "reasons": self.reasons, "checks": self.checks}


def parse_stage(text: str, option: str, words: tuple[str, ...]) -> str | int:
    if text in words:
        return text
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"{option}: expected {' or '.join(words)} or a stage number, got {text!r}") from None
    if value < 0:
        raise UserError(f"{option}: stage numbers start at 0 (the base model), got {value}")
    return value


def run_folders(path: Path) -> list[Path]:
    """The run folders a gate covers: RUN itself, or every unit of a study folder."""
    if not path.is_dir():
        raise UserError(f"{path}: no such folder (expected a run or study folder)")
    if is_run_folder(path) or RunFolder(path).config.is_file():
        return [path]
    units = path / "runs"
    if (path / "study.json").is_file() and units.is_dir():
        found = sorted(p for p in units.iterdir() if p.is_dir() and RunFolder(p).config.is_file())
        if found:
            return found
        raise UserError(f"{path}: a study folder whose units have not run yet")
    raise UserError(f"{path}: neither a lorawatch run folder nor a study folder")


def gate(path: Path, *, stage: str | int = "last", against: str | int = "previous", alpha: float | None = None,
         max_nfr: float | None = None, max_kl: float | None = None,
         max_deploy_kl: float | None = None) -> GateResult:
    result = GateResult()
    for run_dir in run_folders(Path(path)):
        config = load_run_config(run_dir)
        settings = config.statistics if alpha is None else config.statistics.model_copy(update={"alpha": alpha})
        for seed in config.seeds:
            _gate_seed(result, run_dir, seed, stage, against, settings, max_nfr, max_kl, max_deploy_kl)
    return result


def _gate_seed(result: GateResult, run_dir: Path, seed: int, stage: str | int, against: str | int, settings,
               max_nfr: float | None, max_kl: float | None, max_deploy_kl: float | None) -> None:
    outcomes = seed_outcomes(run_dir, seed)
    k = outcomes.stage_index(stage)
    if against == "previous":
        if k == 0:
            raise UserError(f"{run_dir}: seed {seed}: stage 0 is the base model; it has no previous checkpoint")
        other, kind = k - 1, "previous"
    elif against == "base":
        other, kind = 0, "base"
    else:
        other, kind = outcomes.stage_index(against), "stage"
    if other == k:
        raise UserError(f"{run_dir}: seed {seed}: --against names the gated stage {k} itself")
    comparison = compare_stages(outcomes, k, other, kind, settings)
    folder = RunFolder(run_dir).stage(seed, k)
    kl = folder.reference_stats.load().kl_mean
    check = folder.record.load().adapter_check if k > 0 else None
    where = (f"{run_dir} seed {seed}: stage {k} ({comparison.checkpoint}) against stage {other} "
             f"({comparison.against_checkpoint})")
    reasons = []
    for t in comparison.tasks:
        if t.verdict == "regressed":
            reasons.append(f"{where}: {t.task} regressed, {verdict_view.number(t.accuracy_before)} → "
                           f"{verdict_view.number(t.accuracy_after)} "
                           f"({verdict_view.with_interval(t.difference, t.ci_low, t.ci_high, sign=True)}), "
                           f"{verdict_view.flips(t)}, p {verdict_view.p_text(t.p_adjusted)} < α {settings.alpha:g}")
        if max_nfr is not None and t.negative_flip_rate > max_nfr:
            reasons.append(f"{where}: {t.task} negative flip rate {t.negative_flip_rate:.3f} ({t.regressed} of {t.n} "
                           f"rows right → wrong) > --max-nfr {max_nfr:g}")
    if max_kl is not None and kl > max_kl:
        reasons.append(f"{where}: KL to base on the reference set {kl:.4f} > --max-kl {max_kl:g}")
    if check is not None and not check.active:
        reasons.append(f"{where}: {check.summary()}")
    deployed = deployed_results(run_dir, seed, settings, stage=k)
    if max_deploy_kl is not None and not deployed:
        raise UserError(f"--max-deploy-kl: {run_dir} seed {seed} stage {k} has no deployed forms (`lorawatch deploy "
                        f"{run_dir}` measures them)")
    # the deployed forms are compared with this checkpoint, not with --against
    reasons += deployed_reasons(f"{run_dir} seed {seed}: stage {k} ({comparison.checkpoint})", deployed, settings,
                                max_deploy_kl)
    worst = max(comparison.tasks, key=lambda t: t.negative_flip_rate)
    result.lines.append(f"{'FAIL' if reasons else 'pass'} {where}: "
                        f"{len(comparison.regressed())} of {len(comparison.tasks)} tasks regressed (α {settings.alpha:g}"
                        f"{', Holm' if settings.correction == 'holm' else ''}); highest negative flip rate "
                        f"{worst.negative_flip_rate:.3f} ({worst.task}); KL to base {kl:.4f}"
                        + ("" if not deployed else "; deployed " + ", ".join(
                            f"{d.format} KL(checkpoint ‖ deployed) {d.record.reference.kl_reverse_mean:.3g}"
                            for d in deployed)))
    result.reasons += reasons
    result.checks.append({"run_dir": str(run_dir), "seed": seed, "stage": k, "against_stage": other,
                          "kl_to_base": kl, "adapter_active": None if check is None else check.active, "alpha": settings.alpha, "correction": settings.correction,
                          "comparison": comparison.model_dump(mode="json"),
                          "deployed": [{"format": d.format, "kl_checkpoint_deployed": d.record.reference.kl_reverse_mean,
                                        "tasks": [t.model_dump(mode="json") for t in d.tasks]} for d in deployed],
                          "reasons": reasons})


def deployed_reasons(where: str, deployed, settings, max_deploy_kl: float | None) -> list[str]:
    """The gated stage's deployed forms: a task regressed against the PyTorch checkpoint, or KL above the limit."""
    reasons = []
    for form in deployed:
        for t in form.regressed():
            reasons.append(f"{where}: deployed {form.format} regressed on {t.task} against the PyTorch checkpoint, "
                           f"{verdict_view.number(t.accuracy_before)} → {verdict_view.number(t.accuracy_after)} "
                           f"({verdict_view.with_interval(t.difference, t.ci_low, t.ci_high, sign=True)}), "
                           f"{verdict_view.flips(t)}, p {verdict_view.p_text(t.p_adjusted)} < α {settings.alpha:g}")
        kl = form.record.reference.kl_reverse_mean
        if max_deploy_kl is not None and kl > max_deploy_kl:
            reasons.append(f"{where}: deployed {form.format} KL(checkpoint ‖ deployed) on the reference set {kl:.3g} > "
                           f"--max-deploy-kl {max_deploy_kl:g}")
    return reasons

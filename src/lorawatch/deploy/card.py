"""The model card of an exported checkpoint: README.md with Hugging Face `model-index` metadata (YAML front matter)
holding what the run measured of this stage, and a body saying the same for people, with the export's own checks.

Everything here is read from the run folder (through rundir/ and analysis/): the stage's accuracy on each task with
its Wilson interval, the continual-learning metrics of the checkpoint, its drift from the base model on the
reference set, the verdict of the paired comparison with the previous checkpoint and the base, the adapter-active
check, and, where `lorawatch deploy` has measured the stage under llama.cpp, each deployed form's accuracy and drift
from the checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lorawatch.analysis.verdicts import load_seed_statistics
from lorawatch.config import ExperimentConfig
from lorawatch.rundir.layout import RunFolder
from lorawatch.rundir.schema import DeployedRecord
from lorawatch.deploy.agreement import Agreement


@dataclass
class StageFacts:
    """What the run folder says of one stage."""

    checkpoint: str
    task: str | None
    accuracy: dict[str, float]  # task (and "reference") -> accuracy
    intervals: dict[str, tuple[float, float]]  # task -> Wilson interval
    metrics: dict[str, float]  # OP, BWT, ... of this checkpoint (those defined)
    drift: dict[str, float]  # kl_mean, kl_p95, entropy_mean_delta, margin_mean_delta
    verdicts: dict[str, str]  # "previous"/"base" -> a one-line verdict
    regressed: bool
    adapter_active: bool | None  # None: stage 0, or a folder written before the check
    confidence: float = 0.95
    notes: list[str] = field(default_factory=list)
    deployed: list[DeployedRecord] = field(default_factory=list)  # the stage's forms measured by `lorawatch deploy`


def stage_facts(run_dir: Path, config: ExperimentConfig, seed: int, stage: int) -> StageFacts:
    folder = RunFolder(run_dir).stage(seed, stage)
    record = folder.record.load()
    stats = load_seed_statistics(run_dir, seed, config.statistics)
    scores = folder.scores.load().accuracy()
    intervals = {a.task: (a.low, a.high) for a in stats.accuracy if a.checkpoint == record.checkpoint}
    metrics = {m.metric: m.value for m in stats.metrics if m.checkpoint == record.checkpoint and m.value is not None}
    ref = folder.reference_stats.load()
    drift = {"kl_mean": ref.kl_mean, "kl_p95": ref.kl_p95, "entropy_mean_delta": ref.entropy_mean_delta,
             "margin_mean_delta": ref.margin_mean_delta}
    verdicts, regressed = {}, False
    for against in ("previous", "base"):
        comparison = stats.comparison(stage, against)
        if comparison is None:
            continue
        worse = [t.task for t in comparison.tasks if t.verdict == "regressed"]
        better = [t.task for t in comparison.tasks if t.verdict == "improved"]
        regressed |= bool(worse)
        verdicts[against] = (f"against stage {comparison.against_stage} ({comparison.against_checkpoint}): "
                             + (f"regressed on {', '.join(worse)}" if worse else "no task regressed")
                             + (f"; improved on {', '.join(better)}" if better else ""))
    check = record.adapter_check
    return StageFacts(checkpoint=record.checkpoint, task=record.task, accuracy=scores, intervals=intervals,
                      metrics=metrics, drift=drift, verdicts=verdicts, regressed=regressed,
                      adapter_active=None if check is None else check.active,
                      confidence=stats.settings.confidence,
                      deployed=[folder.deployed(fmt).record.load() for fmt in folder.deployed_formats()])


def model_index(name: str, facts: StageFacts, checks: list[Agreement]) -> list[dict]:
    """Hugging Face `model-index`: one result per task (accuracy), one for the reference set (drift, and the
    exported forms' agreement with the checkpoint), one for the continual-learning metrics."""
    results = []
    for task, value in facts.accuracy.items():
        if task == "reference":
            continue
        results.append({"task": {"type": "text-generation", "name": "continual learning"},
                        "dataset": {"name": task, "type": task},
                        "metrics": [{"type": "accuracy", "value": round(value, 4), "name": f"accuracy ({task})"}]})
    reference = [{"type": "accuracy", "value": round(facts.accuracy.get("reference", float("nan")), 4),
                  "name": "reference accuracy"}]
    reference += [{"type": key, "value": round(value, 6), "name": key.replace("_", " ")}
                  for key, value in facts.drift.items()]
    reference += [{"type": f"{c.form}_top1_agreement", "value": round(c.top1_agreement, 4),
                   "name": f"{c.form} top-1 agreement with the checkpoint"} for c in checks]
    reference += [{"type": f"{c.form}_kl_max", "value": c.kl_max, "name": f"{c.form} max KL to the checkpoint"}
                  for c in checks]
    for d in facts.deployed:
        reference += [{"type": f"{d.format}_deployed_kl_mean", "value": round(d.reference.kl_mean, 6),
                       "name": f"{d.format} under llama.cpp: mean KL(deployed ‖ checkpoint)"},
                      {"type": f"{d.format}_deployed_same_top1", "value": round(d.reference.same_top1, 4),
                       "name": f"{d.format} under llama.cpp: same top-1 as the checkpoint"}]
        results += [{"task": {"type": "text-generation", "name": f"continual learning, {d.format} under llama.cpp"},
                     "dataset": {"name": task, "type": task},
                     "metrics": [{"type": "accuracy", "value": round(value, 4),
                                  "name": f"accuracy ({task}, {d.format} under llama.cpp)"}]}
                    for task, value in d.accuracy.items() if task != "reference"]
    results.append({"task": {"type": "text-generation", "name": "drift from the base model"},
                    "dataset": {"name": "reference set", "type": "lorawatch-reference"}, "metrics": reference})
    if facts.metrics:
        results.append({"task": {"type": "text-generation", "name": "continual learning"},
                        "dataset": {"name": "all tasks", "type": "lorawatch-tasks"},
                        "metrics": [{"type": key, "value": round(value, 4), "name": key}
                                    for key, value in facts.metrics.items()]})
    return [{"name": name, "results": results}]


def verdict_word(facts: StageFacts) -> str:
    if facts.adapter_active is False:
        return "adapter has no effect"
    return "regressed" if facts.regressed else "no regression detected"


def write_card(path: Path, *, name: str, base_model: str, run_dir: Path, seed: int, stage: int, facts: StageFacts,
               checks: list[Agreement], files: list[str]) -> None:
    meta = {"library_name": "transformers", "base_model": base_model, "tags": ["lorawatch", "lora", "merged"],
            "lorawatch": {"run": str(run_dir), "seed": seed, "stage": stage, "checkpoint": facts.checkpoint,
                          "verdict": verdict_word(facts), "adapter_active": facts.adapter_active},
            "model-index": model_index(name, facts, checks)}
    level = f"{facts.confidence:.0%}"
    lines = [f"# {name}", "",
             f"Stage {stage} ({facts.checkpoint}) of seed {seed} of the lorawatch run `{run_dir}`: "
             + ("the base model as the run loaded it." if stage == 0 else
                f"{base_model} with the run's cumulative LoRA adapter after this stage merged into its weights."),
             "", f"**Verdict: {verdict_word(facts)}.**"]
    lines += [f"- {v}" for v in facts.verdicts.values()]
    if facts.adapter_active is False:
        lines.append("- the adapter-active check found the base model's distributions on every reference row")
    lines += ["", f"## Accuracy on each task ({level} Wilson interval)", "", "| task | accuracy | interval |",
              "|---|---|---|"]
    for task, value in facts.accuracy.items():
        low, high = facts.intervals.get(task, (None, None))
        lines.append(f"| {task} | {value:.3f} | " + ("—" if low is None else f"[{low:.3f}, {high:.3f}]") + " |")
    if facts.metrics:
        lines += ["", "## Continual-learning metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {value:.3f} |" for key, value in facts.metrics.items()]
    lines += ["", "## Drift from the base model (reference set)", "", "| statistic | value |", "|---|---|"]
    lines += [f"| {key} | {value:.4f} |" for key, value in facts.drift.items()]
    lines += ["", "## The exported files against the checkpoint", "",
              "Each file was loaded back (transformers for the folder, llama.cpp for GGUF) and its next-token "
              "distribution at every reference row's answer position compared with the PyTorch checkpoint's:", ""]
    lines += [f"- {c.line()}" for c in checks]
    if facts.deployed:
        lines += ["", "## Measured as deployed (llama.cpp, `lorawatch deploy`)", "",
                  "The checkpoint converted to GGUF and run by llama.cpp on the same test rows, greedy: accuracy, the "
                  "share of outputs identical to the PyTorch checkpoint's, and the drift from the checkpoint at every "
                  "reference row's answer position.", "",
                  "| format | file (MB) | accuracy | identical outputs | KL(deployed ‖ ckpt) mean / max | same top-1 |",
                  "|---|---:|---|---|---|---:|"]
        for d in facts.deployed:
            accuracy = ", ".join(f"{t} {v:.3f}" for t, v in d.accuracy.items() if t != "reference")
            identical = ", ".join(f"{t} {v:.0%}" for t, v in d.identical.items() if t != "reference" and v is not None)
            lines.append(f"| {d.format} | {d.file_bytes / 1e6:.1f} | {accuracy} | {identical or '—'} | "
                         f"{d.reference.kl_mean:.2e} / {d.reference.kl_max:.2e} | {d.reference.same_top1:.1%} |")
    lines += ["", "Files: " + ", ".join(f"`{f}`" for f in files), ""]
    text = "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n" + "\n".join(lines)
    path.write_text(text, encoding="utf-8")

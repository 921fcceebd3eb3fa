"""The deployed form evaluated through llama.cpp: each finished checkpoint of a run (the base model, stage 0, too)
merged, converted to GGUF in each requested format, and run by llama.cpp on the run's own prompts.

    plan      every refusal that needs no model: the run folder, the formats, seeds and stages, the adapters,
              llama-cpp-python and llama.cpp's converter (one line each); the work left (formats not finished)
    build     per stage: the PyTorch checkpoint's reference distributions, the adapter merged into the weights,
              llama.cpp's converter and quantizer (gguf.py) writing each missing format into a work folder under
              the cache, never into the run folder (a GGUF file is the model's size; its size is recorded)
    evaluate  per format: llama.cpp greedy on every task's test rows and the reference rows, token ids in
              (runtime.py), scored by lorawatch's scoring; the next-token distribution after each reference
              prompt against the PyTorch checkpoint's; the outputs against the checkpoint's stored ones
    record    stage-K/deployed/<format>/ (rundir's DeployedForm): predictions and drift rows as they are done,
              deployed.json last

Resumable: a format whose deployed.json is there is not redone, and a task whose predictions are on disk is read
back. Stage 0 does not depend on the seed: done once, copied to the other seeds. The paired statistics, the base
model's drift beside each checkpoint's and the verdicts are analysis/deployed.py's, from these files.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from rich.console import Console

from lorawatch.config import ExperimentConfig
from lorawatch.data.inputs import Encoded, RunData, encode, load_data
from lorawatch.data.prompts import EncodedPrompt
from lorawatch.data.tasks.scoring import Prediction, accuracy, score
from lorawatch.deploy import gguf, merge
from lorawatch.deploy.export import recorded_weights, run_config, stage_adapter
from lorawatch.deploy.formats import DEFAULT_FORMATS, unknown_format
from lorawatch.deploy.runtime import LlamaRunner
from lorawatch.engine.generation import decode_text, stop_token_ids
from lorawatch.errors import UserError
from lorawatch.models.cache import default_cache_dir
from lorawatch.progress import RunProgress
from lorawatch.rundir.layout import DeployedForm, RunFolder, Stage
from lorawatch.rundir.lifecycle import run_lock
from lorawatch.rundir.schema import DeployedDrift, DeployedDriftSummary, DeployedRecord


@dataclass(frozen=True)
class StageWork:
    seed: int
    stage: int
    checkpoint: str
    adapter: Path | None  # None: stage 0, the base model
    formats: tuple[str, ...]  # the formats not finished yet


@dataclass(frozen=True)
class DeployPlan:
    run_dir: Path
    config: ExperimentConfig
    formats: tuple[str, ...]
    work: tuple[StageWork, ...]  # seed by seed, stage 0 first; only stages with a format left
    weights: str | None  # the digest of the base weights the run recorded

    @property
    def forms_left(self) -> int:
        return sum(len(w.formats) for w in self.work)


def check_tools() -> None:
    """llama-cpp-python and llama.cpp's converter are there (a run with a deploy section checks this before any
    model work, not after hours of training)."""
    gguf.llama_cpp_module()
    gguf.converter_folder()


def plan_deployed(run_dir: Path, formats: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
                  stages: Sequence[int] | None = None) -> DeployPlan:
    """What is left to evaluate, after every refusal that needs no model. `formats` default to the run's
    deploy.formats, else DEFAULT_FORMATS; `seeds` to every seed of the run; `stages` to every finished stage.
    Stage 0 is always among them: the base model's own drift in each format is what a checkpoint's is read against."""
    run_dir = Path(run_dir)
    folder = RunFolder(run_dir)
    config = run_config(run_dir)
    if formats is None:
        formats = config.deploy.formats if config.deploy is not None else list(DEFAULT_FORMATS)
    formats = [f.lower() for f in formats]
    problem = unknown_format(formats)
    if problem:
        raise UserError(f"--formats: {problem}")
    if config.strategy.one_adapter_per_task:
        raise UserError(f"strategy '{config.strategy.name}' keeps one adapter per task; the deployed form merges the "
                        "one cumulative adapter of a stage (strategies none, replay, ewc, ...)")
    for seed in seeds or ():
        if seed not in config.seeds:
            raise UserError(f"--seed {seed}: the run has seeds {', '.join(map(str, config.seeds))}")
    for stage in stages or ():
        if stage < 0:
            raise UserError(f"--stages: stage numbers start at 0 (the base model), got {stage}")
    work = []
    for seed in seeds or config.seeds:
        finished = [k for k in folder.seed(seed).stages_on_disk() if folder.stage(seed, k).finished()]
        if stages:
            missing = [k for k in stages if k not in finished]
            if missing:
                raise UserError(f"--stages: seed {seed} has no finished stage {missing[0]} (finished: "
                                f"{', '.join(map(str, finished)) or 'none'})")
            finished = sorted({0, *stages} & set(finished)) if 0 in finished else sorted(stages)
        if 0 not in finished:
            raise UserError(f"seed {seed}: the base stage (stage 0) has not finished; run the run to its end first")
        for k in finished:
            left = tuple(f for f in formats if folder.stage(seed, k).deployed(f).record.intact() is None)
            if left:
                work.append(StageWork(seed, k, folder.stage(seed, k).record.load().checkpoint,
                                      stage_adapter(folder, seed, k), left))
    if work:
        check_tools()
    return DeployPlan(run_dir, config, tuple(formats), tuple(work), recorded_weights(folder))


def evaluate_deployed(plan: DeployPlan, console: Console | None = None) -> list[DeployedForm]:
    """Every form the plan has left, measured and recorded (see the module's docstring); the forms done here."""
    console = console or Console(stderr=True)
    say = lambda text: console.print(f"lorawatch: deploy: {text}")  # noqa: E731
    if not plan.work:
        say(f"every stage already evaluated in {', '.join(plan.formats)}")
        return []
    config, folder = plan.config, RunFolder(plan.run_dir)
    loaded = merge.load_base(config, plan.weights)
    gguf.check_family(loaded.model.config, config.model.spec)
    data = load_data(config)
    encoded = encode(data, loaded.tokenizer, config.train.max_length)
    context = _Context(data=data, encoded=encoded, tokenizer=loaded.tokenizer,
                       stops=frozenset(stop_token_ids(loaded.tokenizer, loaded.model)),
                       vocab=loaded.model.get_output_embeddings().weight.shape[0],
                       max_new_tokens=config.eval.max_new_tokens, threads=torch.get_num_threads())
    per_form = sum(len(t.test) for t in data.tasks) + len(data.reference)
    say(f"{plan.forms_left} form(s) to evaluate ({', '.join(plan.formats)}; {per_form} rows each) through llama.cpp "
        f"{gguf.runtime_version()}")
    done: list[DeployedForm] = []
    with run_lock(plan.run_dir), RunProgress(per_form * plan.forms_left, console) as progress:
        for work in plan.work:
            stage = folder.stage(work.seed, work.stage)
            label = f"seed {work.seed} · stage {work.stage} ({work.checkpoint})"
            formats = list(work.formats)
            if work.stage == 0:  # the base model's forms do not depend on the seed: another seed's are this one's
                for fmt in copy_base_forms(folder, plan.config.seeds, work.seed, formats):
                    formats.remove(fmt)
                    progress.advance(per_form)
                    done.append(stage.deployed(fmt))
            if not formats:
                continue
            check_rows(stage, data)
            progress.phase(f"{label} · merge, convert to {', '.join(formats)}")
            with work_folder() as where:
                files, checkpoint = build_forms(loaded, work.adapter, encoded.reference, where,
                                                f"seed{work.seed}-stage{work.stage}", formats)
                for fmt in formats:
                    form = stage.deployed(fmt)
                    record = evaluate_form(files[fmt], stage, fmt, work, checkpoint, context,
                                           lambda part: progress.phase(f"{label} · {fmt} · {part}"), progress.advance)
                    files[fmt].unlink()
                    progress.log(f"{label} · {fmt}: {summary_line(record)}")
                    done.append(form)
    return done


def summary_line(record: DeployedRecord) -> str:
    tasks = ", ".join(f"{t} {v:.3f}" for t, v in record.accuracy.items() if t != "reference")
    same = [v for t, v in record.identical.items() if t != "reference" and v is not None]
    ref = record.reference
    return (f"accuracy {tasks}; KL(checkpoint ‖ deployed) mean {ref.kl_reverse_mean:.2e}, same top-1 "
            f"{ref.same_top1:.1%}" + (f"; identical outputs {min(same):.0%}–{max(same):.0%} per task" if same else ""))


@dataclass(frozen=True)
class _Context:
    """What every form of a run is evaluated with: the run's rows as the run encoded them, its generation rules."""

    data: RunData
    encoded: Encoded
    tokenizer: object
    stops: frozenset[int]  # the PyTorch generation's stop tokens (engine/generation.stop_token_ids)
    vocab: int  # the checkpoint's output vocabulary
    max_new_tokens: int
    threads: int


@contextmanager
def work_folder() -> Iterator[Path]:
    """A scratch folder beside the model cache for the merged model and its GGUF files (on disk, not /tmp, which is
    often memory), removed when the stage is done."""
    root = default_cache_dir().parent / "deploy-work"
    root.mkdir(parents=True, exist_ok=True)
    where = Path(tempfile.mkdtemp(prefix="work-", dir=root))
    try:
        yield where
    finally:
        shutil.rmtree(where, ignore_errors=True)


def build_forms(loaded, adapter: Path | None, reference: list[EncodedPrompt], where: Path, stem: str,
                formats: list[str]) -> tuple[dict[str, Path], torch.Tensor]:
    """The stage's GGUF files (format -> path) and the PyTorch checkpoint's reference log-probabilities
    ([rows, vocab], unmerged: the checkpoint the run measured)."""
    from peft import PeftModel

    # merge_and_unload writes the adapter into the base weights: a copy keeps the base model for the next stage
    model = loaded.model if adapter is None else PeftModel.from_pretrained(copy.deepcopy(loaded.model), str(adapter))
    checkpoint = merge.reference_logits(model, reference, loaded.tokenizer)
    if adapter is not None:
        model = model.merge_and_unload()
    merge.save(model, loaded.tokenizer, where / "hf")
    del model
    files = gguf.write_gguf(where / "hf", where / "gguf", stem, formats)
    shutil.rmtree(where / "hf")
    return files, checkpoint


def check_rows(stage: Stage, data: RunData) -> None:
    """The run's data still gives the rows the checkpoint's predictions are of (they are paired row by row)."""
    for task in data.tasks:
        stored = [p.id for p in stage.predictions(task.name).load()]
        if stored != [e.id for e in task.test]:
            raise UserError(f"{stage.predictions(task.name).path}: its rows are not the test rows the run's config "
                            f"reads now for task {task.name} (a data file changed since the run?)")


def evaluate_form(path: Path, stage: Stage, fmt: str, work: StageWork, checkpoint: torch.Tensor,
                  context: _Context, phase: Callable[[str], None], advance: Callable[[int], None]) -> DeployedRecord:
    """One GGUF file through llama.cpp: every task's test rows and the reference rows, each part written as it is
    done (a part on disk is read back), deployed.json last."""
    data, encoded = context.data, context.encoded
    kinds = {t.name: t.kind for t in data.tasks}
    parts = [(t.name, t.test, encoded.test[t.name]) for t in data.tasks]
    parts.append(("reference", data.reference, encoded.reference))
    longest = max(len(p.input_ids) for _, _, prompts in parts for p in prompts)
    form = stage.deployed(fmt)
    drift = form.drift.intact_rows([e.id for e in data.reference])
    scores: dict[str, float] = {}
    identical: dict[str, float | None] = {}
    with LlamaRunner(path, longest_prompt=longest, max_new_tokens=context.max_new_tokens, threads=context.threads,
                     vocab=context.vocab) as runner:
        for name, examples, prompts in parts:
            rows = form.predictions(name).intact_rows([e.id for e in examples])
            if rows is None:
                phase(name)
                rows, firsts = [], []
                for example, prompt in zip(examples, prompts):
                    out = runner.continue_greedy(prompt.input_ids, context.stops)
                    task = example.task or name
                    rows.append(score(example.id, task, kinds[task], example.answer,
                                      decode_text(context.tokenizer, out.output_ids), out.output_ids))
                    firsts.append(out.first_logits)
                    advance(1)
                if name == "reference" and drift is None:  # to disk before the predictions that mark the part done
                    drift = drift_rows(data, np.stack(firsts), checkpoint)
                    form.drift.write(d.to_dict() for d in drift)
                form.predictions(name).write(r.to_dict() for r in rows)
            else:
                advance(len(rows))
            scores[name] = accuracy(rows)
            identical[name] = identical_share(rows, stage.predictions(name).load())
        if drift is None:  # the reference outputs were on disk and their drift was not
            phase("reference drift")
            drift = drift_rows(data, np.stack([runner.first_logits(p.input_ids) for p in encoded.reference]),
                               checkpoint)
            form.drift.write(d.to_dict() for d in drift)
        seconds, generated = runner.seconds, runner.generated_tokens
    record = DeployedRecord(stage=work.stage, checkpoint=work.checkpoint, format=form.format,
                            llama_cpp=gguf.runtime_version(), file_bytes=path.stat().st_size,
                            max_new_tokens=context.max_new_tokens, accuracy=scores, identical=identical,
                            reference=summarize(drift), generated_tokens=generated, seconds=round(seconds, 3),
                            threads=context.threads)
    form.record.write(record)
    return record


def drift_rows(data: RunData, deployed_logits: np.ndarray, checkpoint: torch.Tensor) -> list[DeployedDrift]:
    """Per reference row: KL both ways and the top-1 token, over the tokens both vocabularies have."""
    vocab = min(deployed_logits.shape[-1], checkpoint.shape[-1])
    ours = torch.log_softmax(torch.from_numpy(deployed_logits[:, :vocab]).float(), dim=-1)
    theirs = torch.log_softmax(checkpoint[:, :vocab].float(), dim=-1)
    kl = (ours.exp() * (ours - theirs)).sum(-1).clamp(min=0.0)  # clamp: float round-off below 0
    reverse = (theirs.exp() * (theirs - ours)).sum(-1).clamp(min=0.0)
    top1, their_top1 = ours.argmax(-1), theirs.argmax(-1)
    return [DeployedDrift(id=e.id, task=e.task, kl=float(kl[i]), kl_reverse=float(reverse[i]),
                          same_top1=bool(top1[i] == their_top1[i]), top1_token=int(top1[i]))
            for i, e in enumerate(data.reference)]


def summarize(rows: list[DeployedDrift]) -> DeployedDriftSummary:
    kl = np.array([r.kl for r in rows])
    reverse = np.array([r.kl_reverse for r in rows])
    return DeployedDriftSummary(rows=len(rows), kl_mean=float(kl.mean()), kl_max=float(kl.max()),
                                kl_reverse_mean=float(reverse.mean()), kl_reverse_max=float(reverse.max()),
                                same_top1=float(np.mean([r.same_top1 for r in rows])))


def identical_share(deployed: list[Prediction], checkpoint: list[Prediction]) -> float | None:
    """The share of rows whose output tokens are the PyTorch checkpoint's, token for token (None when the
    checkpoint's predictions do not have their tokens)."""
    theirs = {p.id: p.output_ids for p in checkpoint}
    if not deployed or any(theirs.get(p.id) is None for p in deployed):
        return None
    return sum(list(p.output_ids or ()) == list(theirs[p.id]) for p in deployed) / len(deployed)


def copy_base_forms(folder: RunFolder, seeds: Sequence[int], seed: int, formats: list[str]) -> list[str]:
    """Stage 0's forms that another seed has finished, copied into `seed`'s stage 0 (deployed.json last)."""
    copied = []
    for fmt in formats:
        for other in seeds:
            source = folder.stage(other, 0).deployed(fmt)
            if other == seed or source.record.intact() is None:
                continue
            target = folder.stage(seed, 0).deployed(fmt)
            shutil.rmtree(target.path, ignore_errors=True)
            record_name = source.record.path.name
            shutil.copytree(source.path, target.path,
                            ignore=lambda where, names: [record_name] if Path(where) == source.path else [])
            target.record.write(source.record.read())
            copied.append(fmt)
            break
    return copied


def deploy_after_run(run_dir: Path, config: ExperimentConfig, console: Console) -> None:
    """The config's deploy section, honoured once the run's last stage is finished (`lorawatch run`, `evaluate`)."""
    if config.deploy is None:
        return
    evaluate_deployed(plan_deployed(run_dir, config.deploy.formats), console)

"""Faithfulness guard: a finished run's predictions against a plain one-row-at-a-time path.

The plain path is transformers' `generate` on one unpadded prompt at a time, with the adapter loaded the
ordinary way (PEFT, not merged) and no drafts. For every checkpoint of the run it regenerates every test and
reference row and compares the generated tokens; it also rescored the plain outputs and reports how many
examples any cell of the accuracy matrix moves by.

    python bench/guard.py RUN_DIR [--max-checkpoints N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from peft import PeftModel

from lorawatch.rundir import store
from lorawatch.rundir.layout import RunFolder
from lorawatch.config import build_config
from lorawatch.engine.generation import decode_text, stop_token_ids
from lorawatch.data.tasks.scoring import score
from lorawatch.models.loading import load_model
from lorawatch.recipe.protocol import encode, load_data


def plain_generate(model, tokenizer, prompt_ids, max_new_tokens: int, stops: list[int]) -> list[int]:
    ids = torch.tensor([list(prompt_ids)])
    new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, temperature=None, top_p=None, top_k=None, eos_token_id=stops,
                         pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    cut = next((i for i, t in enumerate(new) if t in stops), None)
    return new if cut is None else new[:cut + 1]


def check_run(run_dir: Path, max_checkpoints: int | None = None) -> dict:
    started = time.perf_counter()
    config = build_config(store.read_json(run_dir / "config.json"), source=str(run_dir / "config.json"))
    data = load_data(config)
    loaded = load_model(config.model.spec, device=config.model.device, dtype=config.model.dtype)
    tokenizer, base = loaded.tokenizer, loaded.model
    encoded = encode(data, tokenizer, config.train.max_length)
    stops = stop_token_ids(tokenizer, base)
    kinds = {t.name: t.kind for t in data.tasks}
    parts = [(t.name, t.test, encoded.test[t.name]) for t in data.tasks]
    parts.append(("reference", data.reference, encoded.reference))
    seed = config.seeds[0]
    checkpoints = list(range(len(data.tasks) + 1))[:max_checkpoints]
    report = {"run_dir": str(run_dir), "seed": seed, "checkpoints": [], "rows": 0, "same": 0,
              "max_cell_diff_examples": 0}
    for stage in checkpoints:
        folder = RunFolder(run_dir).stage(seed, stage).path
        model = base if stage == 0 else PeftModel.from_pretrained(base, folder / "adapter").eval()
        entry = {"stage": stage, "rows": 0, "same": 0, "cell_diff_examples": {}}
        for name, examples, prompts in parts:
            recorded = {r["id"]: r for r in store.read_jsonl(folder / "predictions" / f"{name}.jsonl")}
            plain_correct = fast_correct = 0
            for example, prompt in zip(examples, prompts):
                out = plain_generate(model, tokenizer, prompt.input_ids, config.eval.max_new_tokens, stops)
                fast = recorded[example.id]
                entry["rows"] += 1
                entry["same"] += out == fast["output_ids"]
                kind = kinds[example.task or name]
                plain_correct += score(example.id, name, kind, example.answer, decode_text(tokenizer, out)).correct
                fast_correct += fast["correct"]
            entry["cell_diff_examples"][name] = abs(plain_correct - fast_correct)
        if stage > 0:
            base = model.unload()  # the plain base model back, without the adapter wrappers
        report["checkpoints"].append(entry)
        report["rows"] += entry["rows"]
        report["same"] += entry["same"]
        report["max_cell_diff_examples"] = max(report["max_cell_diff_examples"],
                                               *entry["cell_diff_examples"].values())
        print(f"guard: stage {stage}: {entry['same']}/{entry['rows']} identical, cells moved by "
              f"{entry['cell_diff_examples']}", file=sys.stderr, flush=True)
    report["fraction_same"] = round(report["same"] / report["rows"], 4)
    report["holds"] = report["fraction_same"] >= 0.98 and report["max_cell_diff_examples"] <= 1
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--max-checkpoints", type=int, default=None)
    args = parser.parse_args()
    result = check_run(args.run_dir, args.max_checkpoints)
    print(json.dumps(result, indent=2))
    sys.exit(0 if result["holds"] else 1)


if __name__ == "__main__":
    main()

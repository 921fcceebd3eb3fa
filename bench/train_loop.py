"""lorawatch's training stage against a plain PEFT loop on the same rows, in the same process.

    python bench/train_loop.py W1            # the first task of W1 (64 rows), both loops twice, alternating
    python bench/train_loop.py W1 --profile  # and where each loop's time goes (torch.profiler, by operator)

The plain loop is what a user would write from the paper's published implementation: the
same LoRA (r 8, alpha 16, dropout 0.05, all-linear, same seed), the same shuffled micro-batches of 2 with
accumulation 8, AdamW at 5e-5, clipping at 1.0, and the loss as transformers computes it from `labels` (every
position's logits, the mean over answer tokens, divided by the accumulation steps). Both loops start from the
same freshly loaded model and LoRA initialisation; they differ only in what lorawatch does differently (answer-
only logits, its dropout). Their losses are printed beside their times: the same rows, seen in the same order,
must give the same loss up to dropout's draws.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import SHARED_DATA, WORKLOADS, prepare_data, workload_inputs  # noqa: E402


def stage_rows(name: str):
    """The model, tokenizer, training parameters and the first task's encoded training rows of a workload."""
    config, run_data, loaded, encoded = workload_inputs(name, "bench/train_loop.py")
    return config, loaded, encoded.train[run_data.tasks[0].name]


def fresh_adapter(config, loaded, seed: int):
    from peft import get_peft_model

    from lorawatch.recipe.lora import lora_config
    torch.manual_seed(seed)  # LoRA's A matrices: the same initialisation for both loops
    return get_peft_model(loaded.model, lora_config(config))


def lorawatch_loop(model, rows, config, seed: int, pad_id: int) -> tuple[float, list[float]]:
    from lorawatch.recipe.training import TrainParams, train_stage, use_gap_dropout
    use_gap_dropout(model)
    t = config.train
    params = TrainParams(learning_rate=t.learning_rate, batch_size=t.batch_size, grad_accum=t.grad_accum,
                         epochs=t.epochs, max_grad_norm=t.max_grad_norm, weight_decay=t.weight_decay)
    start = time.perf_counter()
    log = train_stage(model, rows, params, seed=seed, pad_id=pad_id, device="cpu")
    return time.perf_counter() - start, log.step_losses


def plain_loop(model, rows, config, seed: int, pad_id: int) -> tuple[float, list[float]]:
    """The published loop, written plainly: labels -> transformers' own loss over every position's logits."""
    t = config.train
    start = time.perf_counter()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=t.learning_rate, weight_decay=t.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    order = torch.randperm(len(rows), generator=generator).tolist()
    batches = [[rows[i] for i in order[b:b + t.batch_size]] for b in range(0, len(order), t.batch_size)]
    model.train()
    losses, window = [], 0.0
    for k, batch in enumerate(batches):
        width = max(len(r.input_ids) for r in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, :len(r.input_ids)] = torch.tensor(r.input_ids)
            labels[i, :len(r.labels)] = torch.tensor(r.labels)
            mask[i, :len(r.input_ids)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss / t.grad_accum
        loss.backward()
        window += loss.item()
        last = k == len(batches) - 1
        if (k + 1) % t.grad_accum == 0 or last:
            torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            in_window = (k % t.grad_accum) + 1
            losses.append(round(window * t.grad_accum / in_window, 6))
            window = 0.0
    model.eval()
    return time.perf_counter() - start, losses


LOOPS = {"lorawatch": lorawatch_loop, "plain": plain_loop}


def compare(name: str, repeat: int, profile: bool) -> dict:
    from lorawatch.models.loading import load_model
    config, _, rows = stage_rows(name)
    seconds: dict[str, list[float]] = {loop: [] for loop in LOOPS}
    losses: dict[str, list[float]] = {}
    tables = {}
    # a throwaway run first: the first loop in a process pays for allocations and kernel choices
    warm = load_model(config.model.spec, device="cpu", dtype="float32")
    plain_loop(fresh_adapter(config, warm, seed=33), rows[:8], config, seed=33, pad_id=warm.tokenizer.pad_token_id)
    del warm
    for r in range(repeat):
        for loop, fn in LOOPS.items():
            loaded = load_model(config.model.spec, device="cpu", dtype="float32")  # no adapter left behind
            model = fresh_adapter(config, loaded, seed=33)
            if profile and r == repeat - 1:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    took, loss = fn(model, rows, config, seed=33, pad_id=loaded.tokenizer.pad_token_id)
                tables[loop] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
            else:
                took, loss = fn(model, rows, config, seed=33, pad_id=loaded.tokenizer.pad_token_id)
            seconds[loop].append(round(took, 2))
            losses[loop] = loss
            print(f"bench/train_loop: {name} {loop} {took:.1f} s, step losses {loss}", file=sys.stderr, flush=True)
    best = {loop: min(s) for loop, s in seconds.items()}
    return {"workload": name, "rows": len(rows), "threads": torch.get_num_threads(), "seconds": seconds,
            "best_s": best, "lorawatch_over_plain": round(best["lorawatch"] / best["plain"], 3),
            "step_losses": losses, "profiles": tables}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workload", nargs="?", default="W1", choices=list(WORKLOADS))
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--source", type=Path, default=SHARED_DATA if SHARED_DATA.is_dir() else None)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "train_loop.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lorawatch-train-") as tmp:
        os.environ.update(prepare_data(args.source, Path(tmp) / "data"))
        result = compare(args.workload, args.repeat, args.profile)
    for loop, table in result.pop("profiles").items():
        print(f"\n== {loop} ==\n{table}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['workload']}: {result['rows']} rows; lorawatch {result['best_s']['lorawatch']:.1f} s, plain loop "
          f"{result['best_s']['plain']:.1f} s: {result['lorawatch_over_plain']:.3f}x")


if __name__ == "__main__":
    main()

"""One decoding step with transformers' DynamicLayer cache against lorawatch's in-place one (passes.GrowingLayer).

    python bench/cache_step.py                       # SmolLM2 fp32, 12 rows x 500 prompt tokens, 64 steps
    python bench/cache_step.py --rows 24 --width 300 --steps 128

Both caches are prefilled with the same random prompts, then decoded greedily, alternating twice; the script
prints milliseconds per step for each and whether every step's logits are bit for bit the same. The shape is
that of the pooled decoding batch at the default token budget: rows x (width + new tokens) ~ 8192.
"""

from __future__ import annotations

import argparse
import time

import torch


def decode(model, ids: torch.Tensor, steps: int, in_place: bool, device: str = "cpu") -> tuple[float, torch.Tensor]:
    """Prefill `ids`, then `steps` greedy decoding steps; (ms per step, every step's logits). On CUDA the device
    is synchronised around the timed steps (bench/gpu_check.py times the same loop there)."""
    from lorawatch.engine.passes import new_cache

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    rows, width = ids.shape
    cache = new_cache(model, in_place)
    mask = torch.ones(rows, width, dtype=torch.long, device=device)
    logits = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    position = torch.full((rows,), width - 1, device=device)
    seen = [logits]
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
        position = position + 1
        logits = model(input_ids=logits.argmax(-1)[:, None], attention_mask=mask, position_ids=position[:, None],
                       cache=cache, use_cache=True).logits[:, -1]
        seen.append(logits)
    sync()
    return (time.perf_counter() - started) / steps * 1000, torch.stack(seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args()

    from lorawatch.models.loading import load_model

    model = load_model(args.model, device="cpu", dtype="float32").model
    ids = torch.randint(100, model.config.vocab_size - 100, (args.rows, args.width),
                        generator=torch.Generator().manual_seed(0))
    times: dict[bool, list[float]] = {False: [], True: []}
    outputs = {}
    with torch.no_grad():
        decode(model, ids, 4, True)  # warm-up
        for _ in range(2):
            for in_place in (False, True):
                ms, outputs[in_place] = decode(model, ids, args.steps, in_place)
                times[in_place].append(ms)
    print(f"{args.model}, fp32, {args.rows} rows x {args.width} prompt tokens, {args.steps} steps, "
          f"{torch.get_num_threads()} threads")
    for in_place, label in ((False, "DynamicLayer (torch.cat)"), (True, "GrowingLayer (in place)")):
        print(f"  {label:26s} {min(times[in_place]):7.1f} ms/step (runs: "
              f"{', '.join(f'{t:.1f}' for t in times[in_place])})")
    print(f"  in place / cat: {min(times[True]) / min(times[False]):.3f}; logits identical: "
          f"{torch.equal(outputs[True], outputs[False])}")


if __name__ == "__main__":
    main()

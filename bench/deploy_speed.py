"""Single-stream decoding speed of the shipped forms: llama.cpp on each GGUF file of a `lorawatch export` folder
against transformers' `generate` on the same folder's Hugging Face model, on the same prompts and cores.

    python bench/deploy_speed.py exports/demo-gguf                    # 12 built-in reference prompts, 64 tokens
    python bench/deploy_speed.py exports/demo-gguf --rows 24 --new-tokens 128 --threads 2 --out speed.json

The prompts are the built-in reference set's rows (the demo's), rendered by the export's chat template as
lorawatch renders every prompt (data/prompts.py) and fed to both runtimes as the same token ids. Each prompt
starts from an empty cache and is continued greedily for exactly --new-tokens tokens, stop tokens ignored, so every
form decodes as many tokens. Prompt processing and decoding are timed apart:

    prefill tokens/s   prompt tokens / seconds to the first next-token logits
    decode tokens/s    (new tokens - 1) / seconds for the rest, one token at a time: what a user waits for;
                       the mean over the prompts with its 95% Student t interval
    speed-up           PyTorch's decode seconds over the form's, prompt by prompt (paired), mean and interval
    size               the GGUF file's; for PyTorch, its weights in memory (MiB)

PyTorch's prefill is a forward pass over the prompt; its decode time is `generate`'s time minus that pass. Both
runtimes use --threads threads (default: torch's). One warm-up prompt per form is not timed. Compare the numbers
only from one invocation with nothing else running on the cores: each form's line says how long it took.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

def prompts(tokenizer, rows: int) -> list[list[int]]:
    from lorawatch.data.prompts import encode_prompt, user_message
    from lorawatch.data.tasks.base import DEFAULT_INSTRUCTIONS
    from lorawatch.data.tasks.builtin import BUILTIN_KINDS, builtin_reference

    examples = builtin_reference(-(-rows // 3))[:rows]
    return [list(encode_prompt(tokenizer, e.id, user_message(DEFAULT_INSTRUCTIONS[BUILTIN_KINDS[e.task]],
                                                              e.prompt), 4096).input_ids) for e in examples]


def time_torch(folder: Path, ids: list[list[int]], new_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prefill, decode = [], []
    with torch.no_grad():
        for i, prompt in enumerate([ids[0], *ids]):
            x = torch.tensor([prompt])
            started = time.perf_counter()
            model(input_ids=x, logits_to_keep=1)
            first = time.perf_counter() - started
            started = time.perf_counter()
            # generate() has no clock between its prefill and its decoding: the decode time is its time minus the
            # prompt pass above (at least a microsecond: a few-token smoke run can make the difference negative)
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            total = time.perf_counter() - started
            assert out.shape[1] - x.shape[1] == new_tokens
            if i:  # the first is the warm-up
                prefill.append(first)
                decode.append(max(total - first, 1e-6))
    return {"form": f"PyTorch {next(model.parameters()).dtype}".replace("torch.", ""),
            "bytes": sum(p.numel() * p.element_size() for p in model.parameters()), "prefill_s": prefill,
            "decode_s": decode}


def time_llama(path: Path, ids: list[list[int]], new_tokens: int, threads: int) -> dict:
    """llama.cpp loaded and stepped as `lorawatch deploy`'s runner does (deploy/runtime.py: the whole prompt in one
    batch, last-position logits, argmax), but timed inside one continuation: the runner's timer covers the prompt
    and the decoding together, and timing them apart by a second prompt pass leaves a difference that short runs
    can make negative."""
    from llama_cpp import Llama, llama_get_logits_ith

    longest = max(map(len, ids))
    llm = Llama(model_path=str(path), n_ctx=longest + new_tokens + 8, n_batch=longest + 8, logits_all=False,
                n_threads=threads, n_threads_batch=threads, verbose=False)
    vocab = llm.n_vocab()

    def step(tokens: list[int]) -> int:
        llm.eval(tokens)
        return int(np.argmax(np.ctypeslib.as_array(llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))))

    prefill, decode = [], []
    for i, prompt in enumerate([ids[0], *ids]):
        llm.reset()
        started = time.perf_counter()
        token = step(prompt)
        first = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(new_tokens - 1):
            token = step([token])
        rest = time.perf_counter() - started
        if i:
            prefill.append(first)
            decode.append(rest)
    llm.close()
    return {"form": f"llama.cpp {path.stem.rsplit('-', 1)[-1]}",
            "bytes": path.stat().st_size, "prefill_s": prefill, "decode_s": decode}


def mean_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """The mean and its Student t interval over the prompts (scipy)."""
    from scipy import stats

    mean = float(np.mean(values))
    if np.ptp(values) == 0:  # PyTorch against itself
        return mean, mean, mean
    low, high = stats.t.interval(confidence, len(values) - 1, loc=mean, scale=stats.sem(values))
    return mean, float(low), float(high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", type=Path, help="a `lorawatch export --format gguf` folder")
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, help="also write the numbers as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    ids = prompts(AutoTokenizer.from_pretrained(args.export), args.rows)
    prompt_tokens = sum(map(len, ids))
    results = [time_torch(args.export, ids, args.new_tokens)]
    files = sorted((args.export / "gguf").glob("*.gguf"), key=lambda p: -p.stat().st_size)  # largest first
    results += [time_llama(p, ids, args.new_tokens, args.threads) for p in files]
    print(f"{args.rows} prompts ({prompt_tokens} tokens), {args.new_tokens} new tokens each, single stream, "
          f"{args.threads} threads; decode: mean over the prompts [95% t interval]; speed-up: paired per prompt")
    print("| form | size | prefill tokens/s | decode tokens/s | decode speed-up over PyTorch | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    reference = np.array(results[0]["decode_s"])
    for r in results:
        seconds = np.array(r["decode_s"])
        r["prefill_tokens_per_s"] = prompt_tokens / sum(r["prefill_s"])
        r["decode_tokens_per_s"] = mean_interval((args.new_tokens - 1) / seconds)
        r["decode_speedup"] = mean_interval(reference / seconds)
        rate, speedup = r["decode_tokens_per_s"], r["decode_speedup"]
        print(f"| {r['form']} | {r['bytes'] / 2**20:.1f} MiB | {r['prefill_tokens_per_s']:.0f} | "
              f"{rate[0]:.1f} [{rate[1]:.1f}, {rate[2]:.1f}] | "
              f"{speedup[0]:.2f}× [{speedup[1]:.2f}, {speedup[2]:.2f}] | "
              f"{sum(r['prefill_s']) + sum(r['decode_s']):.1f} |")
    if args.out:
        args.out.write_text(json.dumps({"rows": args.rows, "prompt_tokens": prompt_tokens,
                                        "new_tokens": args.new_tokens, "threads": args.threads,
                                        "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()

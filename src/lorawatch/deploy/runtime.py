"""A GGUF file run by llama.cpp's own runtime (`llama_cpp.Llama`), the way the deployed-form evaluation needs it:
greedy continuation of prompts given as token ids, and the next-token logits after each prompt.

Token ids, never text: the prompts are the ones lorawatch rendered and tokenized for the PyTorch checkpoint
(data/prompts.py), so the chat template's special tokens are the same ids, and what is compared is the model, not two
tokenizers. Greedy is an argmax over the logits here rather than llama.cpp's sampler chain, so that the rule is the
PyTorch generation's (engine/generation.py): the first most likely token, up to a stop token or max_new_tokens.

Each prompt starts from an empty cache (no prefix reuse between prompts): a shared prefix evaluated in another
batch changes float round-off, and a resumed evaluation must give the same outputs as an uninterrupted one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Sequence

import numpy as np

from lorawatch.deploy.gguf import llama_cpp_module


@dataclass(frozen=True)
class Continuation:
    output_ids: tuple[int, ...]  # generated tokens, ending with the stop token when the row stopped at one
    first_logits: np.ndarray  # float32 [vocab]: the next-token logits after the prompt


class LlamaRunner:
    """One GGUF file loaded by llama.cpp, for prompts up to `longest_prompt` tokens and `max_new_tokens` more."""

    def __init__(self, path: Path, *, longest_prompt: int, max_new_tokens: int, threads: int, vocab: int):
        self.llama_cpp = llama_cpp_module()
        self.max_new_tokens = max_new_tokens
        # n_batch: a whole prompt in one batch; logits of the last position only (logits_all would compute the
        # output layer at every prompt position)
        self.llm = self.llama_cpp.Llama(model_path=str(path), n_ctx=longest_prompt + max_new_tokens + 8,
                                        n_batch=longest_prompt + 8, logits_all=False, n_threads=threads,
                                        n_threads_batch=threads, verbose=False)
        # A GGUF vocabulary can be longer than the checkpoint's (padding the converter adds): only the checkpoint's
        # tokens can be chosen, as only they can be by the PyTorch model.
        self.n_vocab = self.llm.n_vocab()
        self.vocab = min(vocab, self.n_vocab)
        self.seconds = 0.0  # spent in llama.cpp, for tokens per second
        self.generated_tokens = 0

    def close(self) -> None:
        self.llm.close()

    def __enter__(self) -> "LlamaRunner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _eval(self, tokens: Sequence[int]) -> np.ndarray:
        self.llm.eval(list(tokens))
        pointer = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))[:self.vocab].copy()

    def first_logits(self, prompt_ids: Sequence[int]) -> np.ndarray:
        """The next-token logits after the prompt."""
        started = time.perf_counter()
        self.llm.reset()
        logits = self._eval(prompt_ids)
        self.seconds += time.perf_counter() - started
        return logits

    def continue_greedy(self, prompt_ids: Sequence[int], stops: Collection[int]) -> Continuation:
        started = time.perf_counter()
        self.llm.reset()
        logits = first = self._eval(prompt_ids)
        out: list[int] = []
        while True:
            token = int(np.argmax(logits))  # the first of equal maxima, as torch.argmax
            out.append(token)
            if token in stops or len(out) >= self.max_new_tokens:
                break
            logits = self._eval([token])
        self.seconds += time.perf_counter() - started
        self.generated_tokens += len(out)
        return Continuation(tuple(out), first)

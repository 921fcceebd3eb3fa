"""Shared fixtures: a tiny randomly initialised model with its own tokenizer, built in the test session.

No downloads: the tokenizer is a byte-level BPE trained here on a few sentences, the model a 2-layer Llama.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
TRACE_DIR = SHARED / "data" / "trace-llm-cl-500"

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "What is the monetary policy stance for the following text? A. dovish, B. hawkish, C. neutral.",
    "Choose an answer for the following question and give your reasons. Question: Which is a mammal?",
    "Solve the following math problem. Question: Ann has 3 apples and buys 4 more. How many apples?",
    "Answer with only the letter of the correct choice, e.g., \"C\". Answer with only the final number.",
    "The Committee decided to raise the target range to contain inflation pressures. Stance: Text:",
    "0 1 2 3 4 5 6 7 8 9 10 12 24 42 100 A B C D E user assistant system ### Instruction: Response:",
]


def build_tiny_model(folder: Path, *, chat_template: bool = True, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>" if chat_template else
                                        "<|endoftext|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=specials[1:])
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None, tie_word_embeddings=True,
                         # wide enough init that a rank-8 adapter can move the logits by whole nats
                         initializer_range=0.25)
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_plain_model_dir(tmp_path_factory) -> Path:
    """The same kind of tiny model with no chat template (like Gemma-3-270M base)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-plain-model"), chat_template=False)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    # GGUF conversions and base-stage results are cached per test session, never in the user's home.
    # Session scope: module-scoped fixtures that run the protocol are set up before any function-scoped one.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORAWATCH_CACHE", str(tmp_path_factory.getbasetemp() / "lorawatch-cache"))
        patch.delenv("LORAWATCH_BASE_STAGE_CACHE", raising=False)
        yield


def needs_trace() -> None:
    if not TRACE_DIR.is_dir():
        pytest.skip(f"{TRACE_DIR} not present: the shared TRACE data is only beside the developers' checkout")


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

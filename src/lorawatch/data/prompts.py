"""One prompt rendering for training, evaluation and the reference pass.

The user message is the task instruction, a blank line, then the example's prompt (the paper's format).
With a chat template it is rendered as a single user turn with the generation prompt; tokenizers without
one (Gemma-3-270M base) get the plain format below. Training appends the answer exactly as the template
would render an assistant turn, so the tokens the model learns to produce are the tokens it is later
asked to produce.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

# Used when the tokenizer has no chat template (Gemma-3-270M base); the docs' protocol page shows it.
PLAIN_PROMPT = "### Instruction:\n{message}\n\n### Response:\n"


def user_message(instruction: str, prompt: str) -> str:
    return f"{instruction}\n\n{prompt}" if instruction else prompt


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: PreTrainedTokenizerBase, message: str) -> str:
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": message}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=False,  # ignored by templates without a thinking switch
        )
    return PLAIN_PROMPT.format(message=message)


def render_answer(tokenizer: PreTrainedTokenizerBase, message: str, answer: str) -> str:
    """The text that follows `render_prompt(...)` when the assistant gives `answer`, end marker included."""
    if not has_chat_template(tokenizer):
        return answer + (tokenizer.eos_token or "")
    prompt = render_prompt(tokenizer, message)
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": message}, {"role": "assistant", "content": answer}],
        tokenize=False,
        enable_thinking=False,
    )
    if not full.startswith(prompt):
        # Some templates render the last assistant turn differently (e.g. strip reasoning); fall back to
        # the answer and the tokenizer's end-of-sequence text rather than train on a mismatched prefix.
        return answer + (tokenizer.eos_token or "")
    return full[len(prompt):]


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # A chat template already writes any BOS it wants; the plain format relies on the tokenizer's specials.
    return tokenizer(text, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]


@dataclass(frozen=True)
class EncodedPrompt:
    id: str
    input_ids: tuple[int, ...]
    # The gold answer's tokens as training renders them after this prompt (reference rows only; empty where the
    # row has no gold): the drift statistics read the first one's probability (engine/drift_stats.py).
    answer_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class EncodedTrainExample:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # -100 on prompt tokens: the loss covers the answer tokens only


def encode_prompt(tokenizer: PreTrainedTokenizerBase, example_id: str, message: str, max_length: int, *,
                  answer: str | None = None) -> EncodedPrompt:
    """The prompt's token ids; with `answer`, also the answer's tokens as they would follow it (no end marker)."""
    ids = _prompt_ids(tokenizer, render_prompt(tokenizer, message))
    answer_ids = ()
    if answer:
        rendered = render_answer(tokenizer, message, answer)
        # Only the answer's own tokens: the end marker the template appends is not part of the gold.
        cut = rendered.find(answer)
        text = rendered[:cut + len(answer)] if cut >= 0 else answer
        answer_ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
    # Keep the end: the question and the generation prompt sit at the end of the text.
    return EncodedPrompt(example_id, tuple(ids[-max_length:]), answer_ids)


def encode_train_example(tokenizer: PreTrainedTokenizerBase, message: str, answer: str,
                         max_length: int) -> EncodedTrainExample:
    prompt_ids = _prompt_ids(tokenizer, render_prompt(tokenizer, message))
    answer_ids = tokenizer(render_answer(tokenizer, message, answer), add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + answer_ids)[-max_length:]
    labels = ([-100] * len(prompt_ids) + answer_ids)[-max_length:]
    return EncodedTrainExample(tuple(ids), tuple(labels))

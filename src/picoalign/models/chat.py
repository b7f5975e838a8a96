"""Chat rendering: a prompt and an answer as the model sees them, in text and in token ids.

The prompt is rendered with the tokenizer's chat template and the generation prompt; the answer
is the rest of the rendered conversation after it, so it ends with the end-of-turn token (which
training trains, not masks). Prompt and answer are tokenised separately, so the tokens trained
on are those the model sees when it generates, even where a tokenizer would merge across the
boundary. Without a chat template a prompt is plain text (with the tokenizer's BOS) and an
answer its text then EOS.

A prompt is a string (one user turn) or a list of OpenAI-style messages. Training
(`train/batching.py`), generation, eval, the lm-eval harness, `use/` and `serve/` all render
through here, so a model is trained, scored and served on one rendering.
"""

from __future__ import annotations


def as_messages(prompt) -> list[dict]:
    """A prompt as chat messages: a string is one user turn."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def token_ids(tokenizer, text: str) -> list[int]:
    """`text`'s ids with no special tokens added (a rendered template carries its own)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_text(tokenizer, prompt) -> str:
    """The rendered conversation up to where the assistant's answer begins (a chat template's)."""
    return tokenizer.apply_chat_template(as_messages(prompt), tokenize=False, add_generation_prompt=True)


def answer_text(tokenizer, prompt, answer: str) -> str:
    """The text of `answer`'s assistant turn after `prompt_text`, its end-of-turn marker included."""
    messages = as_messages(prompt)
    head = prompt_text(tokenizer, messages)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
    if not full.startswith(head):
        raise ValueError("the chat template renders the prompt differently with an answer after it")
    return full[len(head):]


def render_prompt(tokenizer, prompt) -> list[int]:
    """Token ids of the prompt as the model sees it before answering."""
    if tokenizer.chat_template:
        return token_ids(tokenizer, prompt_text(tokenizer, prompt))
    if not isinstance(prompt, str):
        raise ValueError("a model without a chat template needs plain-text prompts")
    return tokenizer(prompt)["input_ids"]  # with BOS where the tokenizer adds one


def render_answer(tokenizer, prompt, answer: str) -> list[int]:
    """Token ids of `answer` as the assistant turn after `prompt`, ending in end-of-turn/EOS."""
    text = answer_text(tokenizer, prompt, answer) if tokenizer.chat_template else answer
    ids = token_ids(tokenizer, text)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids

"""Batched, seeded generation through the chat template (transformers `generate`)."""

from __future__ import annotations

import torch

from picoalign.train.batching import render_prompt


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list,
    max_new_tokens: int = 200,
    greedy: bool = True,
    temperature: float = 0.8,
    top_p: float = 0.9,
    seed: int = 0,
    batch_size: int = 8,
    raw: bool = False,
    repetition_penalty: float = 1.0,
) -> list[str]:
    """Answers to `prompts` (strings or message lists), generated `batch_size` at a time.

    Prompts are left-padded so every row's last token is its own; `raw` skips the template.
    """
    device = next(model.parameters()).device
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        encoded = [tokenizer(p)["input_ids"] if raw else render_prompt(tokenizer, p) for p in chunk]
        width = max(map(len, encoded))
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
        torch.manual_seed(seed + start)
        sampling = {} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": 0}
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
            do_sample=not greedy, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
            repetition_penalty=repetition_penalty, **sampling,
        )
        texts += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    return texts

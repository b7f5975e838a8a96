"""Plain reference computations the tests compare picoalign against."""

from __future__ import annotations

import math

import torch


def naive_answer_logps(model, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """log p(answer token k | prompt, answer[:k]) from one plain causal forward of one sequence."""
    assert prompt, "the first token of a sequence has no prediction"
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logps = torch.log_softmax(logits, dim=-1)
    start = len(prompt)
    rows = logps[start - 1 : start + len(answer) - 1]  # row k predicts answer[k]
    return rows.gather(1, torch.tensor(answer)[:, None]).squeeze(1)


def t(*values: float) -> torch.Tensor:
    """A 1-D fp32 tensor of hand-worked values."""
    return torch.tensor(values, dtype=torch.float32)


def save_random_adapter(chat_model, folder, target_modules: list[str]):
    """A LoRA adapter on the tiny chat Llama with random (non-zero) B, so merging changes the
    logits, saved with its tokenizer and a picoalign marker naming its base; returns `folder`."""
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(chat_model), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=target_modules,
                                            init_lora_weights=False, task_type="CAUSAL_LM"))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(chat_model)).save_pretrained(folder)
    (folder / "picoalign.json").write_text(json.dumps({"base_model": str(chat_model), "complete": True}))
    return folder


def fixed_rollout(task, model, prompt_ids: list[list[int]], completion_ids: list[list[int]], rewards,
                  old_logps: bool = True):
    """A rollout of given tokens and its rewards (one value per completion, or a list per
    completion with one value or None per reward function), scored as `RLTask.rollout`
    scores its own: old log-probs (when asked), the reference's where the task needs them, the
    advantages."""
    from picoalign.train.rl import Rollout

    per_func = torch.tensor([[math.nan if v is None else v for v in (row if isinstance(row, (list, tuple)) else [row])]
                             for row in rewards], dtype=torch.float32)
    mask = torch.zeros(len(completion_ids), max(map(len, completion_ids)))
    for i, ids in enumerate(completion_ids):
        mask[i, : len(ids)] = 1
    n = len(completion_ids)
    r = Rollout(prompt_ids, completion_ids, [""] * n, ["stop"] * n, per_func, task.rewards.total(per_func), mask)
    if old_logps:
        r.old_logps = task._logps(r, model)
    if task.needs_ref:
        r.ref_logps = task._reference_logps(r)
    task._advantages(r)
    return r

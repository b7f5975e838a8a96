"""Plain reference computations the tests compare picoalign against."""

from __future__ import annotations

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

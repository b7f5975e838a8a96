"""The KL of a policy to its reference on the answers it wrote: eval's cost of alignment, used by
`eval`, the RL task's section (rl_eval.py) and the frontier."""

from __future__ import annotations

import torch

from picoalign.models.chat import render_prompt


@torch.no_grad()
def mean_token_kl(policy, reference, tokenizer, prompts: list, answers: list[str], device,
                  batch_size: int = 16) -> float:
    """Mean over answer tokens of KL(π_policy ‖ π_ref) on the full next-token distributions.

    Sequences go `batch_size` at a time, right-padded: under causal attention the padding after
    a sequence changes nothing before it, and only answer positions are counted."""
    seqs = []
    for prompt, answer in zip(prompts, answers):
        a = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if a:
            seqs.append((render_prompt(tokenizer, prompt), a))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        width = max(len(p) + len(a) for p, a in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        real = torch.zeros((len(chunk), width), dtype=torch.long)
        keep = torch.zeros((len(chunk), width), dtype=torch.bool)  # positions that predict an answer token
        for i, (p, a) in enumerate(chunk):
            ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            real[i, : len(p) + len(a)] = 1
            keep[i, len(p) - 1 : len(p) + len(a) - 1] = True
        ids, real, keep = ids.to(device), real.to(device), keep.to(device)
        # the output layer runs only where an answer token is predicted (logits_to_keep), and the
        # fp32 log-softmax over the vocabulary a block of those rows at a time
        lp_rows = policy(ids, attention_mask=real, logits_to_keep=keep).logits.flatten(0, -2)
        lq_rows = reference(ids, attention_mask=real, logits_to_keep=keep).logits.flatten(0, -2)
        for a, b in zip(lp_rows.split(256), lq_rows.split(256)):
            lp, lq = a.float().log_softmax(-1), b.float().log_softmax(-1)
            total += (lp.exp() * (lp - lq)).sum().item()
        count += int(keep.sum())
    return total / max(count, 1)

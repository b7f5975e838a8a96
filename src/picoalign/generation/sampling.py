"""Picking the next token for many rows at once, each with its own settings and generator.

The settings live in per-slot tensors (`RowSettings`), so one step is a handful of tensor ops
over the batch whatever the mix of greedy and sampled rows: repetition penalty (CTRL, over the
tokens a row has seen, prompt included), temperature, top-k, top-p, in the order transformers
applies them. A sampled row draws one uniform number from its own `torch.Generator` per token,
and the token is where that number falls in the row's cumulative distribution: the row's
answer depends on its seed and its logits only, not on which rows share the batch.
"""

from __future__ import annotations

import torch

from picoalign.generation.answers import Sampling


class RowSettings:
    """Per-slot sampling settings (and the tokens each slot has seen, for the penalty)."""

    def __init__(self, max_rows: int, vocab: int, device) -> None:
        self.device, self.vocab = device, vocab
        self.greedy = torch.ones(max_rows, dtype=torch.bool, device=device)
        self.temperature = torch.ones(max_rows, device=device)
        self.top_p = torch.ones(max_rows, device=device)
        self.top_k = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.penalty = torch.ones(max_rows, device=device)
        self.seen: torch.Tensor | None = None  # (max_rows, vocab) bool, made when a row needs it
        self.generators: list[torch.Generator | None] = [None] * max_rows

    def set(self, slot: int, s: Sampling, seed: int, prompt_ids: list[int]) -> None:
        greedy = s.greedy or s.temperature == 0
        self.greedy[slot] = greedy
        self.temperature[slot] = 1.0 if greedy else s.temperature
        self.top_p[slot], self.top_k[slot], self.penalty[slot] = s.top_p, s.top_k, s.repetition_penalty
        self.generators[slot] = None if greedy else torch.Generator(self.device).manual_seed(seed)
        if s.repetition_penalty != 1 or self.seen is not None:
            if self.seen is None:
                self.seen = torch.zeros(len(self.greedy), self.vocab, dtype=torch.bool, device=self.device)
            self.seen[slot] = False
            ids = torch.tensor([t for t in prompt_ids if 0 <= t < self.vocab], dtype=torch.long, device=self.device)
            self.seen[slot, ids] = True

    def move(self, src: int, dst: int) -> None:
        for t in (self.greedy, self.temperature, self.top_p, self.top_k, self.penalty):
            t[dst] = t[src]
        if self.seen is not None:
            self.seen[dst] = self.seen[src]
        self.generators[dst] = self.generators[src]

    def saw(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        if self.seen is not None:
            self.seen[slots, tokens] = True

    def pick(self, logits: torch.Tensor, slots: torch.Tensor, slot_list: list[int]) -> torch.Tensor:
        """Next tokens (B,) from the raw logits (B, V) of `slots`."""
        scores = logits.float()
        penalty = self.penalty[slots]
        if self.seen is not None and bool((penalty != 1).any()):
            p = penalty[:, None]
            hit = self.seen[slots, :scores.shape[-1]] & (p != 1)
            scores = torch.where(hit, torch.where(scores < 0, scores * p, scores / p), scores)
        greedy = self.greedy[slots]
        best = scores.argmax(-1)
        if bool(greedy.all()):
            return best
        scores = scores / self.temperature[slots, None]
        scores = _top_k(scores, self.top_k[slots])
        scores = _top_p(scores, self.top_p[slots])
        probs = scores.softmax(-1)
        cdf = probs.cumsum(-1)
        u = torch.tensor([float(torch.rand(1, generator=g, device=self.device)) if g is not None else 0.5
                          for g in (self.generators[s] for s in slot_list)], device=self.device)
        drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp(max=scores.shape[-1] - 1)
        return torch.where(greedy, best, drawn)


def _top_k(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    if not bool((k > 0).any()):
        return scores
    kmax = int(k.max().clamp(max=scores.shape[-1]))
    top = scores.topk(kmax, dim=-1).values
    kth = top.gather(-1, (k.clamp(min=1, max=kmax) - 1)[:, None])
    return scores.masked_fill((k[:, None] > 0) & (scores < kth), -torch.inf)


NUCLEUS_CANDIDATES = 1024  # where top-p looks first: sorting the whole vocabulary costs ~64 ms a step at
# 32 rows of 49k on 2 cores, the top 1024 ~8 ms, and at the temperatures people sample at they
# hold the nucleus; a row whose nucleus reaches past them is sorted whole, so the result is the same


def _top_p(scores: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (the first always):
    a token stays when the tokens more likely than it hold at most p."""
    rows = (p < 1).nonzero()[:, 0]
    if rows.numel() == 0:
        return scores
    sub, p_rows = scores[rows], p[rows, None]
    probs = sub.softmax(-1)
    top = probs.topk(min(NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1).values  # descending
    before = top.cumsum(-1) - top
    inside = (before[:, -1] + top[:, -1] > p_rows[:, 0]) | (top.shape[-1] == probs.shape[-1])
    if not bool(inside.all()):  # the nucleus reaches past the candidates: these rows sorted whole
        wide = (~inside).nonzero()[:, 0]
        ordered = probs[wide].sort(dim=-1, descending=True).values
        before_wide = ordered.cumsum(-1) - ordered
        kept = (before_wide <= p_rows[wide]).sum(-1)
        least = ordered.gather(-1, (kept - 1)[:, None])
    kept = (before <= p_rows).sum(-1)
    least_all = top.gather(-1, (kept.clamp(max=top.shape[-1]) - 1)[:, None])  # the least likely kept
    if not bool(inside.all()):
        least_all[wide] = least
    scores = scores.clone()
    scores[rows] = sub.masked_fill(probs < least_all, -torch.inf)
    return scores

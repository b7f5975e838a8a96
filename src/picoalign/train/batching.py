"""Tokenised examples, loss masks, and packed batches that waste no compute.

Prompt and answer are rendered by `models/chat.py` (chat template, generation prompt, the
end-of-turn token trained) and tokenised separately, then concatenated: the model trains on
exactly the tokens it sees at generation time. Without a chat template the layout is
`prompt + response + eos`.

A batch holds one row per example (per pair in DPO), right-padded; SFT sorts examples by
length so padding stays small. (Packing all examples into one long row wastes no padding but
makes attention quadratic in the total length, which costs more than it saves on a CPU.)
Logits are computed only at the positions whose next token is a target, which skips the
49k-wide output layer on prompts. In a preference row the prompt is stored once and both
answers attend to it (prefix sharing); attention computes that with two causal kernel calls
rather than a dense mask (`train/attention.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from picoalign.models.chat import render_answer, render_prompt, token_ids
from picoalign.train.attention import span_attention
from picoalign.train.losses import token_logps


@dataclass
class Encoded:
    """One example as token ids: `prompt` is context, each of `answers` is scored separately."""

    prompt: list[int]
    answers: list[list[int]]
    truncated: bool = False


@dataclass
class Segmented:
    """A multi-turn example: token segments in order, each a target or context."""

    segments: list[tuple[list[int], bool]]
    truncated: bool = False


def encode(tokenizer, prompt, answers: list[str], max_length: int) -> Encoded | None:
    """Encode a prompt with one or more answers; the answers are cut to fit `max_length`.

    Returns None when the prompt alone leaves no room for an answer.
    """
    p = render_prompt(tokenizer, prompt)
    room = max_length - len(p)
    if room < 2:
        return None
    outs = [render_answer(tokenizer, prompt, a) for a in answers]
    truncated = any(len(a) > room for a in outs)
    return Encoded(p, [a[:room] for a in outs], truncated)


def encode_conversation(tokenizer, messages: list[dict], max_length: int) -> Segmented | None:
    """Encode a chat where every assistant turn is a target (rendered turn by turn)."""
    if not tokenizer.chat_template:
        raise ValueError("multi-turn `messages` data needs a model with a chat template")
    segments: list[tuple[list[int], bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not head.startswith(done) or not upto.startswith(head):
            raise ValueError("the chat template does not render this conversation turn by turn")
        segments += [(token_ids(tokenizer, head[len(done):]), False), (token_ids(tokenizer, upto[len(head):]), True)]
        done = upto
    return _cut_segments(segments, max_length)


def _cut_segments(segments: list[tuple[list[int], bool]], max_length: int) -> Segmented | None:
    out, used = [], 0
    for ids, target in segments:
        take = ids[: max(0, max_length - used)]
        if take:
            out.append((take, target))
            used += len(take)
    if not any(t for ids, t in out):
        return None
    return Segmented(out, truncated=used < sum(len(ids) for ids, _ in segments))


# ---------------------------------------------------------------- packed rows


@dataclass
class PackedBatch:
    """One packed row of sequences and where its targets are.

    input_ids, position_ids: (B, L). group, branch: (B, L) what each position may attend to,
    compactly: an earlier position of its own group on the shared prefix (branch 0) or on its own
    branch; padding has a group of its own. `dense_mask()` expands that into the (B, 1, L, L) mask
    on the batch's device, only for the forwards that read one (the span path below does not).
    keep: (B, L) bool, the positions whose logits are computed (they predict a target).
    rows: (N,) for each target token, its row among the kept logits; labels: (N,) the token;
    seq_index: (N,) which scored sequence it belongs to (0 .. n_seqs-1).
    spans: (B, 3) lengths of each row's prefix and up to two answers, where every row is one
    example laid out [prefix, answer, answer] (or one sequence: (n, 0, 0)); then attention runs
    on causal kernels (`train/attention.py`) instead of the dense mask. None otherwise.
    """

    input_ids: Tensor
    position_ids: Tensor
    group: Tensor | None
    branch: Tensor | None
    keep: Tensor
    rows: Tensor
    labels: Tensor
    seq_index: Tensor
    n_seqs: int
    n_tokens: int
    n_truncated: int = 0
    ref_logps: Tensor | None = None  # DPO: the frozen reference's log-prob of each sequence
    desirable: Tensor | None = None  # KTO: (examples,) bool, the label of each example's answer
    spans: Tensor | None = None

    def dense_mask(self) -> Tensor | None:
        """(B, 1, L, L) bool, True = may attend: causal, within a group, never into a sibling
        answer. None for plain causal rows (the model's own causal mask is exact for them)."""
        if self.group is None:
            return None
        g, br = self.group, self.branch
        idx = torch.arange(g.shape[1], device=g.device)
        causal = idx[None, :] <= idx[:, None]
        same_group = g[:, None, :] == g[:, :, None]
        same_branch = (br[:, None, :] == 0) | (br[:, None, :] == br[:, :, None])
        return (causal & same_group & same_branch)[:, None]

    def token_counts(self) -> Tensor:
        """Target tokens of each scored sequence (n_seqs,)."""
        return torch.bincount(self.seq_index, minlength=self.n_seqs).clamp(min=1)

    def to(self, device) -> PackedBatch:
        moved = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in self.__dict__.items()}
        return PackedBatch(**moved)


class RowBuilder:
    """Lays out token segments in one row: positions, what sees what, and the targets."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.pos: list[int] = []
        self.group: list[int] = []  # tokens of one example share a group; groups never see each other
        self.branch: list[int] = []  # 0 = shared prefix; answers of one prompt get 1, 2, ...
        self.targets: list[tuple[int, int, int]] = []  # (position predicting it, token, seq)
        self.n_seqs = 0

    def add(self, prompt: list[int], answers: list[list[int]], group: int) -> None:
        """A prompt once, then each answer branching from its end (its own scored sequence)."""
        start = len(self.ids)
        self._put(prompt, list(range(len(prompt))), group, 0)
        last_prompt = start + len(prompt) - 1
        for b, answer in enumerate(answers, start=1):
            first = len(self.ids)
            self._put(answer, list(range(len(prompt), len(prompt) + len(answer))), group, b)
            previous = [last_prompt] + list(range(first, first + len(answer) - 1))
            self.targets += [(p, t, self.n_seqs) for p, t in zip(previous, answer)]
            self.n_seqs += 1

    def add_segments(self, segments: list[tuple[list[int], bool]], group: int) -> None:
        """A multi-turn example: all its target segments together form one scored sequence."""
        start = len(self.ids)
        for ids, target in segments:
            first = len(self.ids)
            self._put(ids, list(range(first - start, first - start + len(ids))), group, 0)
            if target:  # token k is predicted at the position before it (none for the very first)
                self.targets += [(first + k - 1, t, self.n_seqs) for k, t in enumerate(ids) if first + k > start]
        self.n_seqs += 1

    def _put(self, ids: list[int], pos: list[int], group: int, branch: int) -> None:
        self.ids += ids
        self.pos += pos
        self.group += [group] * len(ids)
        self.branch += [branch] * len(ids)

    def spans(self) -> tuple[int, int, int] | None:
        """(prefix, first answer, second answer) lengths when the row is one example of at most
        two branches in order; None when it needs the mask (several examples in one row)."""
        if len(set(self.group)) > 1 or self.branch != sorted(self.branch) or max(self.branch, default=0) > 2:
            return None
        return self.branch.count(0), self.branch.count(1), self.branch.count(2)

    def mask(self) -> Tensor:
        """(L, L) bool: causal, within one group, and never into a sibling answer."""
        return stack_rows([self], 0).dense_mask()[0, 0]


def stack_rows(rows: list[RowBuilder], pad_id: int, n_truncated: int = 0) -> PackedBatch:
    """Right-pad the rows to one length and stack them; targets are numbered across rows."""
    L = max(len(r.ids) for r in rows)
    B = len(rows)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    position_ids = torch.zeros((B, L), dtype=torch.long)
    # Padding is a group of its own per position, so it attends only to itself: a query with no
    # key at all would give NaN in softmax.
    group = -1 - torch.arange(L, dtype=torch.int32).repeat(B, 1)
    branch = torch.zeros((B, L), dtype=torch.int32)
    keep = torch.zeros((B, L), dtype=torch.bool)
    targets, seq_offset = [], 0
    for b, r in enumerate(rows):
        n = len(r.ids)
        input_ids[b, :n] = torch.tensor(r.ids)
        position_ids[b, :n] = torch.tensor(r.pos)
        group[b, :n] = torch.tensor(r.group, dtype=torch.int32)
        branch[b, :n] = torch.tensor(r.branch, dtype=torch.int32)
        keep[b, [p for p, _, _ in r.targets]] = True
        targets += [(b * L + p, t, seq_offset + s) for p, t, s in r.targets]
        seq_offset += r.n_seqs
    flat_positions = keep.flatten().nonzero().squeeze(1).tolist()  # the order logits come out in
    row_of = {p: i for i, p in enumerate(flat_positions)}
    spans = [r.spans() for r in rows]
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        group=group,
        branch=branch,
        keep=keep,
        rows=torch.tensor([row_of[p] for p, _, _ in targets]),
        labels=torch.tensor([t for _, t, _ in targets]),
        seq_index=torch.tensor([s for _, _, s in targets]),
        n_seqs=seq_offset,
        n_tokens=sum(len(r.ids) for r in rows),
        n_truncated=n_truncated,
        spans=None if None in spans else torch.tensor(spans),
    )


def pack_examples(examples: list[Encoded | Segmented], pad_id: int = 0) -> PackedBatch:
    """SFT/LM batch: one row per example, each one scored sequence (its answer, or all its
    assistant turns). Sort examples by length before batching to keep padding small."""
    rows = []
    for ex in examples:
        row = RowBuilder()
        if isinstance(ex, Segmented):
            row.add_segments(ex.segments, 0)
        else:
            row.add(ex.prompt, ex.answers, 0)
        rows.append(row)
    return stack_rows(rows, pad_id, sum(ex.truncated for ex in examples))


def pack_pairs(pairs: list[Encoded], share_prefix: bool = True, pad_id: int = 0) -> PackedBatch:
    """Preference batch: sequences 2i and 2i+1 are the chosen and rejected answers of pair i.

    With `share_prefix` a pair is one row, [prompt, chosen, rejected], where both answers
    attend to the one copy of the prompt and never to each other; otherwise each answer is a
    row of its own with a copy of the prompt. The log-probs are the same either way.
    """
    rows = []
    for pair in pairs:
        if share_prefix:
            row = RowBuilder()
            row.add(pair.prompt, pair.answers, 0)
            rows.append(row)
        else:
            for answer in pair.answers:
                row = RowBuilder()
                row.add(pair.prompt, [answer], 0)
                rows.append(row)
    return stack_rows(rows, pad_id, sum(p.truncated for p in pairs))


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def encode_sft_rows(tokenizer, rows: list[dict], max_length: int) -> tuple[list, int]:
    """Tokenise SFT records; returns (examples, number dropped because the prompt fills max_length)."""
    examples, dropped = [], 0
    for row in rows:
        if row.get("messages"):
            ex = encode_conversation(tokenizer, row["messages"], max_length)
        else:
            ex = encode(tokenizer, row["prompt"], [row["response"]], max_length)
        if ex is None:
            dropped += 1
        else:
            examples.append(ex)
    return examples, dropped


def _length(ex) -> int:
    return sum(len(ids) for ids, _ in ex.segments) if hasattr(ex, "segments") else len(ex.prompt) + sum(map(len, ex.answers))


def sft_batches(tokenizer, rows: list[dict], cfg) -> list[PackedBatch]:
    """Micro-batches of `batch_size` examples of similar length (the loop shuffles their order)."""
    examples, dropped = encode_sft_rows(tokenizer, rows, cfg.max_length)
    if dropped:
        print(f"sft: {dropped} examples dropped: their prompt alone fills max_length={cfg.max_length}")
    examples.sort(key=_length)
    return [pack_examples(group, tokenizer.pad_token_id) for group in chunks(examples, cfg.batch_size)]


def pair_batches(tokenizer, rows: list[dict], cfg, share_prefix: bool = True, sort: bool = True) -> list[PackedBatch]:
    """Preference pairs, `batch_size` per micro-batch (chosen = even sequences, rejected = odd).

    Without `sort` the pairs keep their file order (for scoring that is matched to rows)."""
    pairs = [encode(tokenizer, r["prompt"], [r["chosen"], r["rejected"]], cfg.max_length) for r in rows]
    pairs = [p for p in pairs if p is not None]
    if sort:
        pairs.sort(key=_length)
    return [pack_pairs(group, share_prefix, tokenizer.pad_token_id) for group in chunks(pairs, cfg.batch_size)]


def model_mask(model, batch: PackedBatch) -> Tensor | None:
    """The mask for a forward on the model's own attention. A model whose attention ours cannot
    honour (train/attention.py:own_attention_needed: a sliding window, soft-capping) builds its
    masks itself from the padding alone, since transformers applies a (B, 1, L, L) mask as given
    to every layer, window or not: so its rows must be one sequence each (no shared prefix)."""
    from picoalign.models.load import unwrapped
    from picoalign.train.attention import own_attention_needed

    why = own_attention_needed(getattr(unwrapped(model), "config", None), batch.input_ids.shape[1])
    if why is None:
        return batch.dense_mask()
    if batch.spans is None or bool((batch.spans[:, 2] > 0).any()):
        raise ValueError(f"this model needs its own attention ({why}), which cannot keep a shared prompt's two "
                         "answers apart: train it with prefix_sharing=false")
    return (batch.group >= 0).long()  # padding has negative groups


def forward_logps(model, batch: PackedBatch) -> Tensor:
    """Per-target-token log-probs (N,) in fp32: one forward over the packed row."""
    with span_attention(model, batch.spans, batch.input_ids.shape[1]) as on_spans:
        out = model(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            attention_mask=None if on_spans else model_mask(model, batch),
            logits_to_keep=batch.keep,
            use_cache=False,
        )
    logits = out.logits.reshape(-1, out.logits.shape[-1])  # (kept positions, V)
    return token_logps(logits, batch.labels, batch.rows)

"""Attention over packed rows on causal kernels (train/attention.py) against the dense mask."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from picoalign.train.attention import SpanLayout, spans_attention
from picoalign.train.batching import (
    PackedBatch,
    RowBuilder,
    encode,
    forward_logps,
    pack_examples,
    pack_pairs,
)
from picoalign.train.losses import sequence_logps

PROMPT = "Write a horror story about a lighthouse."


def dense_mask(spans: list[tuple[int, int, int]], L: int) -> torch.Tensor:
    """(B, 1, L, L) the mask RowBuilder writes: causal, prefix shared, answers blind to each other."""
    masks = []
    for p, a, b in spans:
        row = RowBuilder()
        row.add(list(range(p)), [list(range(a))] + ([list(range(b))] if b else []), 0)
        m = torch.eye(L, dtype=torch.bool)
        n = p + a + b
        m[:n, :n] = row.mask()
        masks.append(m)
    return torch.stack(masks)[:, None]


def test_spans_attention_equals_the_masked_one_with_gradients():
    """Rows of unequal prefix/answer lengths, one with a single answer, padding at the ends,
    grouped-query heads (8 query heads on 2 key/value heads): outputs and the gradients of q, k, v
    at real positions equal dense-mask SDPA's."""
    torch.manual_seed(0)
    spans = [(5, 7, 3), (2, 4, 9), (6, 3, 0), (1, 1, 1)]
    B, H, Hkv, L, d = len(spans), 8, 2, 16, 4
    q = torch.randn(B, H, L, d, requires_grad=True)
    k = torch.randn(B, Hkv, L, d, requires_grad=True)
    v = torch.randn(B, Hkv, L, d, requires_grad=True)
    real = torch.zeros(B, 1, L, 1)
    for i, (p, a, b) in enumerate(spans):
        real[i, :, : p + a + b] = 1
    upstream = torch.randn(B, H, L, d) * real  # what the rest of the model reads: real positions only

    got = spans_attention(q, k, v, SpanLayout.of(torch.tensor(spans), L), scaling=0.3)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(spans, L), scale=0.3, enable_gqa=True)
    torch.testing.assert_close(got * real, want * real, atol=1e-6, rtol=0)
    grads_got = torch.autograd.grad((got * upstream).sum(), (q, k, v))
    grads_want = torch.autograd.grad((want * upstream).sum(), (q, k, v))
    for g, w in zip(grads_got, grads_want):
        # fp32 round-off of gradients summed in another order: |g| reaches ~4 here, and on AVX-512
        # kernels one element differed by 1.9e-6 (4.6e-7 relative); torch's own fp32 rtol is 1.3e-6
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1.3e-6)
    assert torch.isfinite(got).all()


def record_sdpa(monkeypatch) -> list[tuple[bool, bool]]:
    """Patch torch's SDPA to record (had a mask, is_causal) for each call."""
    calls: list[tuple[bool, bool]] = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        calls.append((mask is not None, bool(kwargs.get("is_causal", False))))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


def test_pair_batch_runs_causal_kernels_with_the_same_logps_and_grads(chat_tokenizer, chat_model, monkeypatch):
    """A DPO batch (prefix sharing) through the tiny Llama: two causal SDPA calls per layer and no
    mask; the sequence log-probs and every weight's gradient equal the dense-mask forward's."""
    from transformers import AutoModelForCausalLM

    tok = chat_tokenizer
    model = AutoModelForCausalLM.from_pretrained(str(chat_model), dtype=torch.float32, attn_implementation="sdpa")
    pairs = [encode(tok, PROMPT, ["It knocked. Nobody was there, and then it knocked again.", "A nice day."], 128),
             encode(tok, "Hi", ["Hello.", "The door opened by itself at midnight and the lamp went out."], 128)]
    batch = pack_pairs(pairs, share_prefix=True, pad_id=tok.pad_token_id)
    assert batch.spans.tolist() == [[len(p.prompt), len(p.answers[0]), len(p.answers[1])] for p in pairs]

    def logps_and_grads(b):
        model.zero_grad()
        seq = sequence_logps(forward_logps(model, b), b.seq_index, b.n_seqs)
        (seq * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum().backward()
        return seq.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    calls = record_sdpa(monkeypatch)
    built = []  # the dense (B, 1, L, L) mask is made only for a forward that reads it
    real_mask = PackedBatch.dense_mask
    monkeypatch.setattr(PackedBatch, "dense_mask", lambda self: built.append(1) or real_mask(self))
    got, got_grads = logps_and_grads(batch)
    assert calls == [(False, True)] * (2 * model.config.num_hidden_layers)
    assert built == []
    calls.clear()
    want, want_grads = logps_and_grads(dataclasses.replace(batch, spans=None))
    assert calls == [(True, False)] * model.config.num_hidden_layers
    assert built == [1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for name, g in got_grads.items():
        # fp32 sums in another order: the error scales with the gradient's size (up to ~54 here,
        # where one k_proj element differed by 3e-5), so the absolute slack is relative to it
        scale = max(1.0, want_grads[name].abs().max().item())
        torch.testing.assert_close(g, want_grads[name], atol=1e-6 * scale + 1e-5, rtol=1e-4, msg=name)
    assert model.config._attn_implementation == "sdpa"  # put back after the forward


def test_sft_rows_use_one_causal_call_and_packed_rows_keep_the_mask(chat_tokenizer):
    tok = chat_tokenizer
    short, long = encode(tok, "Hi", ["Yes."], 64), encode(tok, PROMPT, ["It knocked twice."], 64)
    batch = pack_examples([short, long], pad_id=tok.pad_token_id)
    assert batch.spans.tolist() == [[len(short.prompt), len(short.answers[0]), 0],
                                    [len(long.prompt), len(long.answers[0]), 0]]
    row = RowBuilder()
    row.add([1, 2], [[3]], group=0)
    row.add([4, 5], [[6]], group=1)  # two examples in one row: only the mask keeps them apart
    assert row.spans() is None


def test_causal_rows_equal_sdpa_in_fp32_and_stay_as_close_as_flash_in_bf16():
    """`CausalRows` (blocks of queries against the keys up to their end, grouped heads laid end to
    end, scores a few rows at a time) against torch's causal SDPA: in fp32 the same numbers and
    gradients up to round-off; in bf16 no further from the fp32 result than torch's own bf16
    kernel is."""
    from picoalign.train import attention
    from picoalign.train.attention import CausalRows

    torch.manual_seed(0)
    B, H, Hkv, L, d = 3, 6, 2, 37, 16
    q = torch.randn(B, L, H, d).transpose(1, 2)  # the layout attention layers hand over
    k, v = torch.randn(B, L, Hkv, d).transpose(1, 2), torch.randn(B, L, Hkv, d).transpose(1, 2)
    upstream = torch.randn(B, H, L, d)

    def run(fn, dtype):
        x = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*x)
        return [out.float(), *(g.float() for g in torch.autograd.grad((out.float() * upstream).sum(), x))]

    def sdpa(a, b, c):
        return F.scaled_dot_product_attention(a, b, c, is_causal=True, scale=0.3, enable_gqa=True)

    old = attention.CHUNK_BYTES, attention.QUERY_BLOCK
    attention.QUERY_BLOCK = 10  # blocks 0-9, 9-18, 18-27, 27-37: uneven, the last one longest
    attention.CHUNK_BYTES = 2 * (H // Hkv) * 9 * 18 * 4  # two (row, key/value head) pairs per chunk at most
    assert attention.query_blocks(L) == [(0, 9), (9, 18), (18, 27), (27, 37)]
    try:
        want = run(sdpa, torch.float32)
        for got, w in zip(run(lambda a, b, c: CausalRows.apply(a, b, c, 0.3), torch.float32), want):
            torch.testing.assert_close(got, w, atol=2e-6, rtol=1e-5)
        ours = run(lambda a, b, c: CausalRows.apply(a, b, c, 0.3), torch.bfloat16)
        torchs = run(sdpa, torch.bfloat16)
    finally:
        attention.CHUNK_BYTES, attention.QUERY_BLOCK = old
    for name, o, t, w in zip("out dq dk dv".split(), ours, torchs, want):
        err_ours, err_torch = (o - w).abs().max().item(), (t - w).abs().max().item()
        assert err_ours <= 2 * err_torch + 1e-3, (name, err_ours, err_torch)


def test_bf16_training_attention_takes_whole_row_matmuls_and_the_rest_keeps_sdpa(monkeypatch):
    from picoalign.train import attention

    used = []
    monkeypatch.setattr(attention.CausalRows, "apply", lambda *a: used.append("rows") or torch.zeros(()))
    calls = record_sdpa(monkeypatch)
    q, k = torch.randn(1, 4, 8, 16, dtype=torch.bfloat16), torch.randn(1, 2, 8, 16, dtype=torch.bfloat16)
    attention._causal(q.requires_grad_(), k, k, 0.0, None)
    with torch.no_grad():  # eval and generation
        attention._causal(q, k, k, 0.0, None)
    attention._causal(q.float(), k.float(), k.float(), 0.0, None)  # fp32: the flash kernel was as fast
    attention._causal(q, k, k, 0.1, None)  # attention dropout: SDPA's
    monkeypatch.setattr(attention, "PROBS_MAX_BYTES", attention.CausalRows.kept_bytes(q) - 1)
    attention._causal(q, k, k, 0.0, None)  # a softmax to keep past the memory bound: flash keeps none
    assert used == ["rows"] and calls == [(False, True)] * 4

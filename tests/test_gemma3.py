"""A second family, Gemma 3, through our training forward: where our attention (span attention,
CausalRows) can honour its attention (a query scale of its own, final-logit soft-capping, a
sliding window longer than the rows) it runs and agrees with transformers' own forward in loss
and gradients; where it cannot (a window shorter than the rows, soft-capped attention logits)
it steps aside for the model's own attention, decided from the config, and still agrees."""

from __future__ import annotations

import pytest
import torch

from picoalign.train import attention
from picoalign.train.attention import own_attention_needed
from picoalign.train.batching import Encoded, Segmented, forward_logps, pack_examples, pack_pairs

transformers = pytest.importorskip("transformers")

PROMPT = [5, 17, 3, 44, 9, 12, 30, 7]
CHOSEN, REJECTED = [21, 8, 63, 2, 40, 1], [11, 59, 4, 1]


def tiny_gemma3(window: int = 64, **over):
    """A randomly initialised 2-layer Gemma 3 (one sliding, one full layer), its own query scale
    (query_pre_attn_scalar 8 for head_dim 16) and final-logit soft-capping, on SDPA."""
    cfg = transformers.Gemma3TextConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=8, sliding_window=window,
        layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=3.0,
        max_position_embeddings=128, pad_token_id=0, **over)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg)
    with torch.no_grad():  # the init leaves norms at 1 and embeddings small: make every layer matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.train()


def reference(model, seqs: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """transformers' own forward (eager attention), one sequence at a time: the answer tokens'
    log-probs laid end to end."""
    model.set_attn_implementation("eager")
    out = []
    for prompt, answer in seqs:
        ids = torch.tensor([prompt + answer])
        logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1:-1].float()
        out.append(logits.log_softmax(-1).gather(1, torch.tensor(answer)[:, None])[:, 0])
    model.set_attn_implementation("sdpa")
    return torch.cat(out)


def loss_and_grads(model, fn):
    model.zero_grad()
    logps = fn()
    loss = (logps * torch.linspace(0.5, 1.5, len(logps))).sum()  # every token counts, differently
    loss.backward()
    return logps.detach(), {n: p.grad.float().clone() for n, p in model.named_parameters()}


def assert_close_grads(ours, theirs, rtol):
    for name, g in theirs.items():
        scale = g.abs().max().clamp(min=1e-6)
        assert (ours[name] - g).abs().max() <= rtol * scale, name


def pair_batch(share: bool = True):
    return pack_pairs([Encoded(PROMPT, [CHOSEN, REJECTED])], share_prefix=share)


def test_the_check_reads_the_config_not_the_name():
    cfg = tiny_gemma3(window=64).config
    assert own_attention_needed(cfg, 64) is None  # a query scale of its own is honoured (passed as `scaling`)
    assert own_attention_needed(cfg, 65) == "its sliding window (64 tokens) is shorter than the rows (65)"
    cfg.layer_types = ["full_attention", "full_attention"]
    assert own_attention_needed(cfg, 1000) is None  # a window no layer uses changes nothing
    cfg.attn_logit_softcapping = 50.0
    assert own_attention_needed(cfg, 10) == "its attention logits are soft-capped (50.0)"


def test_span_attention_agrees_with_transformers_in_fp32(monkeypatch):
    model = tiny_gemma3(window=64)
    calls = []
    monkeypatch.setattr(attention, "spans_attention", lambda *a, **k: calls.append(1) or spans_spy(*a, **k))
    ours = loss_and_grads(model, lambda: forward_logps(model, pair_batch()))
    assert calls, "the span path should have run"
    theirs = loss_and_grads(model, lambda: reference(model, [(PROMPT, CHOSEN), (PROMPT, REJECTED)]))
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    assert_close_grads(ours[1], theirs[1], rtol=1e-4)


spans_spy = attention.spans_attention


def test_causal_rows_in_bf16_agree_with_transformers_within_bf16(monkeypatch):
    model = tiny_gemma3(window=64)
    theirs = loss_and_grads(model, lambda: reference(model, [(PROMPT, CHOSEN), (PROMPT, REJECTED)]))
    used = []
    monkeypatch.setattr(attention.CausalRows, "apply", lambda *a, _f=attention.CausalRows.apply: used.append(1) or _f(*a))
    model.to(torch.bfloat16)
    ours = loss_and_grads(model, lambda: forward_logps(model, pair_batch()))
    assert used, "bf16 training on a CPU should run CausalRows"
    torch.testing.assert_close(ours[0].float(), theirs[0], rtol=0.05, atol=0.05)
    assert_close_grads(ours[1], theirs[1], rtol=0.1)


def test_a_short_window_steps_aside_and_keeps_the_window():
    """Rows longer than the window: the model's own attention (and masks) run; the shared-prefix
    row, which its masks cannot express, is refused; the result is transformers' own."""
    model = tiny_gemma3(window=4)
    seqs = [(PROMPT, CHOSEN), (PROMPT, REJECTED)]
    with pytest.raises(ValueError, match=r"sliding window \(4 tokens\).*prefix_sharing=false"):
        forward_logps(model, pair_batch(share=True))
    ours = loss_and_grads(model, lambda: forward_logps(model, pair_batch(share=False)))
    theirs = loss_and_grads(model, lambda: reference(model, seqs))
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    assert_close_grads(ours[1], theirs[1], rtol=1e-4)
    # the window bites: without it (our causal kernels over whole rows) the numbers differ
    wide = reference(tiny_gemma3(window=64), seqs)
    assert (wide - ours[0]).abs().max() > 1e-3


def test_sft_rows_step_aside_too():
    model = tiny_gemma3(window=4)
    turns = Segmented([(PROMPT[:4], False), (CHOSEN[:3], True), (PROMPT[4:], False), (REJECTED, True)])
    ours = forward_logps(model, pack_examples([turns, Encoded(PROMPT, [CHOSEN])]))
    first = reference(model, [(PROMPT[:4], CHOSEN[:3]), (PROMPT[:4] + CHOSEN[:3] + PROMPT[4:], REJECTED)])
    second = reference(model, [(PROMPT, CHOSEN)])
    torch.testing.assert_close(ours, torch.cat([first, second]), rtol=1e-5, atol=1e-5)


def test_pairs_are_scored_unshared_where_the_model_needs_its_own_attention(capsys):
    from picoalign.config import DPOConfig
    from picoalign.train.attention import fit_prefix_sharing, shared_prefix_why_not

    cfg = DPOConfig(max_length=32, max_steps=1)
    assert shared_prefix_why_not(tiny_gemma3(window=64), 32) is None
    assert fit_prefix_sharing(tiny_gemma3(window=64), cfg) is cfg
    short = tiny_gemma3(window=40)  # rows of one answer fit (32), shared rows (up to 64) do not
    assert shared_prefix_why_not(short, 32) == "its sliding window (40 tokens) is shorter than the rows (64)"
    assert fit_prefix_sharing(short, cfg).prefix_sharing is False
    assert "prefix_sharing off" in capsys.readouterr().out

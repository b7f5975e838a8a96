"""Attention over packed rows with causal kernels instead of a dense mask.

A preference row is [prompt, chosen, rejected]: both answers attend to the prompt, never to each
other. A dense (L, L) mask says so exactly, but SDPA then scores every query against every key
(the CPU flash kernel skips no masked block), about 2.5x the work the row needs. The same numbers
come from two causal calls, which skip everything above the diagonal:

    [prompt, chosen]    one causal pass over the front of the row
    [prompt, rejected]  the prompt's queries, keys and values gathered in front of the rejected
                        answer's, one causal pass; its answer outputs go back to their places

SFT rows (one sequence, right-padded) need only the first call. Rows are described by `spans`,
(B, 3) lengths of prefix, first answer and second answer (`PackedBatch.spans`); batches that are
not of that shape (several documents per row) keep the mask. Positions were already applied to
the queries and keys (RoPE), so gathering them changes nothing. Padding at the end of a row
attends causally to real tokens and is never read, which keeps every value finite.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from picoalign.models.load import unwrapped

NAME = "picoalign_spans"
_layout: ContextVar[SpanLayout | None] = ContextVar("picoalign_spans", default=None)
_registered = False


@dataclass(frozen=True)
class SpanLayout:
    """Where the two causal calls read and write, worked out once per batch (not per layer).

    rows, length: the batch's shape; front: length of the [prefix, a] call; source (B, n): the row positions gathered for the
    [prefix, b] call (None when no row has a b); pick (B, L): for each row position, its output
    among the two calls' outputs laid end to end.
    """

    rows: int
    length: int
    front: int
    source: Tensor | None = None
    pick: Tensor | None = None

    @classmethod
    def of(cls, spans: Tensor, length: int, device=None) -> SpanLayout:
        p, a, b = spans.cpu().unbind(1)
        front = int((p + a).max())
        if int(b.max()) == 0:
            return cls(len(p), length, front)
        # [prefix, b]: position j of the gathered row is j in the prefix, then the b answer's tokens.
        j = torch.arange(int((p + b).max()))[None, :]
        source = torch.where(j < p[:, None], j, j + a[:, None]).clamp(max=length - 1)
        # Row position t reads the front call up to the end of a, then the b outputs of the back call.
        t = torch.arange(length)[None, :]
        in_b = (t >= (p + a)[:, None]) & (t < (p + a + b)[:, None])
        pick = torch.where(in_b, front + t - a[:, None], t.clamp(max=front - 1))
        return cls(len(p), length, front, source.to(device), pick.to(device))


# Training in bf16 on a CPU, torch's flash kernel runs attention at ~55 GFLOP/s (no faster than in
# fp32): it works in 64-row tiles of small matmuls. Batched matmuls over blocks of ~128 queries
# against the keys up to the block's end run at ~300 GFLOP/s. On the AVX-512-BF16 box, forward +
# backward of one layer (4 rows, 9 heads on 3) took 7.5 vs 16.6 ms at 150 tokens, 26 vs 55 at 410
# and 100 vs 179 at 1,024 (`python bench/attention.py`). In fp32 it gained little or nothing, and
# without gradients (eval, generation) nothing: those keep the flash kernel.
QUERY_BLOCK = 128
CHUNK_BYTES = 2 << 20  # scores of this many bytes at a time (a core's L2 here): in cache from matmul to softmax
PROBS_MAX_BYTES = 64 << 20  # the softmax one layer keeps for backward; past it, the flash kernel (it keeps none)


def _causal(q: Tensor, k: Tensor, v: Tensor, dropout: float, scaling: float | None) -> Tensor:
    if (q.device.type == "cpu" and q.dtype == torch.bfloat16 and dropout == 0.0
            and CausalRows.kept_bytes(q) <= PROBS_MAX_BYTES
            and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return CausalRows.apply(q, k, v, q.shape[-1] ** -0.5 if scaling is None else scaling)
    gqa = q.shape[1] != k.shape[1]  # grouped-query attention: fewer key/value heads than query heads
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa)


def query_blocks(length: int) -> list[tuple[int, int]]:
    """[start, stop) of each block of about QUERY_BLOCK queries; a block reads the keys [0, stop)."""
    parts = max(1, round(length / QUERY_BLOCK))
    edges = [length * i // parts for i in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:]))


@lru_cache(maxsize=64)  # the blocks of the few lengths a forward and its backward use
def causal_bias(start: int, stop: int, groups: int, dtype: torch.dtype) -> Tensor:
    """(groups * (stop - start), stop): queries start..stop-1 against keys 0..stop-1, 0 where the
    key is not after the query, -inf where it is; once per query head of a key/value head (a
    group's queries laid end to end, as `CausalRows` lays them)."""
    return torch.full((stop - start, stop), float("-inf"), dtype=dtype).triu(start + 1).repeat(groups, 1)


class CausalRows(torch.autograd.Function):
    """Causal attention of (B, H, L, d) queries on (B, Hkv, L, d) keys and values by batched
    matmuls: each block of queries against the keys up to its end (the masked corner above the
    diagonal is skipped block by block), softmax kept for backward. The query heads that share a
    key/value head are laid end to end, (G·Lq, d) against (Lk, d), so grouped-query attention
    needs no copies of k and v, and the matmul itself sums the key/value gradients over the
    group; across query blocks they add up in fp32."""

    @staticmethod
    def kept_bytes(q: Tensor) -> int:
        B, H, L, _ = q.shape
        return B * H * sum((b - a) * b for a, b in query_blocks(L)) * q.element_size()

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        B, H, L, d = q.shape
        n, G = B * k.shape[1], H // k.shape[1]
        q4 = q.reshape(n, G, L, d)
        kf, vf = k.reshape(n, L, d), v.reshape(n, L, d)
        out = q.new_empty(n, G, L, d)
        kept = []
        for a, b in query_blocks(L):
            qb = q4[:, :, a:b].reshape(n, G * (b - a), d)
            bias = causal_bias(a, b, G, q.dtype)
            probs, ob = q.new_empty(n, G * (b - a), b), q.new_empty(n, G * (b - a), d)
            for j in _chunks(n, G * (b - a) * b * q.element_size()):
                scores = torch.baddbmm(bias, qb[j], kf[j, :b].transpose(1, 2), alpha=scale)
                torch._softmax(scores, -1, False, out=probs[j])  # aten's softmax, written in place
                torch.bmm(probs[j], vf[j, :b], out=ob[j])
            out[:, :, a:b] = ob.view(n, G, b - a, d)
            kept += [qb, probs]
        ctx.save_for_backward(kf, vf, *kept)
        ctx.scale, ctx.shapes = scale, (q.shape, k.shape)
        return out.view(B, H, L, d)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        kf, vf, *kept = ctx.saved_tensors
        q_shape, kv_shape = ctx.shapes
        n, L, d = kf.shape
        G = q_shape[0] * q_shape[1] // n
        go = grad_out.reshape(n, G, L, d)
        dq = grad_out.new_empty(n, G, L, d)
        dk, dv = torch.zeros(kf.shape, device=kf.device), torch.zeros(vf.shape, device=vf.device)
        for (a, b), qb, probs in zip(query_blocks(L), kept[0::2], kept[1::2]):
            gb = go[:, :, a:b].reshape(qb.shape)
            dqb = torch.empty_like(qb)
            for j in _chunks(n, probs[0].numel() * probs.element_size()):
                dv[j, :b] += torch.bmm(probs[j].transpose(1, 2), gb[j])
                d_probs = torch.bmm(gb[j], vf[j, :b].transpose(1, 2))
                d_scores = torch._softmax_backward_data(d_probs, probs[j], -1, probs.dtype)  # one fused pass
                torch.bmm(d_scores, kf[j, :b], out=dqb[j])
                dk[j, :b] += torch.bmm(d_scores.transpose(1, 2), qb[j])
            dq[:, :, a:b] = dqb.view(n, G, b - a, d)
        dq, dk = dq.mul_(ctx.scale), dk.mul_(ctx.scale)
        return dq.view(q_shape), dk.to(kf.dtype).view(kv_shape), dv.to(vf.dtype).view(kv_shape), None


def _chunks(n: int, bytes_each: int) -> list[slice]:
    """Slices of range(n), each of about CHUNK_BYTES of scores."""
    step = max(1, CHUNK_BYTES // bytes_each)
    return [slice(i, i + step) for i in range(0, n, step)]


def _gather(x: Tensor, index: Tensor) -> Tensor:
    """x (B, H, L, d) at positions index (B, n) of each row -> (B, H, n, d)."""
    return x.gather(2, index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


def spans_attention(q: Tensor, k: Tensor, v: Tensor, layout: SpanLayout, dropout: float = 0.0,
                    scaling: float | None = None) -> Tensor:
    """Attention output (B, H, L, d) for rows [prefix, a, b] laid out as `layout` says."""
    f = layout.front
    out = _causal(q[:, :, :f], k[:, :, :f], v[:, :, :f], dropout, scaling)
    if layout.source is None:
        return F.pad(out, (0, 0, 0, layout.length - f))
    src = layout.source
    back = _causal(_gather(q, src), _gather(k, src), _gather(v, src), dropout, scaling)
    return _gather(torch.cat([out, back], dim=2), layout.pick)


def _attention_interface(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention-function signature; without a layout (generation, a recompute
    under activation checkpointing) it is plain SDPA with the mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layout = _layout.get()
    if layout is None or query.shape[0] != layout.rows or not query.shape[2] == key.shape[2] == layout.length:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = spans_attention(query, key, value, layout, dropout, scaling)
    return out.transpose(1, 2).contiguous(), None


def own_attention_needed(config, length: int) -> str | None:
    """Why our attention cannot stand in for the model's on rows of `length` tokens; None when it
    can. Decided from the config, not the model's name: soft-capped attention logits (Gemma 2) and
    a sliding window shorter than the rows (Gemma 3, Mistral) change the scores our kernels
    compute; a query scale of the model's own (Gemma's query_pre_attn_scalar) does not, as the
    attention module passes it as `scaling`, which both paths apply."""
    cap = getattr(config, "attn_logit_softcapping", None)
    if cap:
        return f"its attention logits are soft-capped ({cap})"
    if getattr(config, "use_bidirectional_attention", False):
        return "its attention is bidirectional"
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or ()
    if window and length > window and (not layer_types or "sliding_attention" in layer_types):
        return f"its sliding window ({window} tokens) is shorter than the rows ({length})"
    return None


def shared_prefix_why_not(model, max_length: int) -> str | None:
    """Why `model` cannot score pairs as shared-prefix rows (up to 2 x max_length tokens: the
    prompt and both answers): it needs its own attention there, whose masks cannot keep the two
    answers apart. None when it can."""
    return own_attention_needed(getattr(unwrapped(model), "config", None), 2 * max_length)


def fit_prefix_sharing(model, cfg):
    """`cfg` with prefix_sharing off where `shared_prefix_why_not` says so."""
    why = shared_prefix_why_not(model, cfg.max_length)
    if not (cfg.prefix_sharing and why):
        return cfg
    print(f"dpo: prefix_sharing off: the model needs its own attention ({why})")
    return dataclasses.replace(cfg, prefix_sharing=False)


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(NAME, _attention_interface)
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _registered = True


@contextmanager
def span_attention(model, spans: Tensor | None, length: int):
    """Run `model`'s forwards inside with `spans_attention` (models on SDPA only; others as they are).

    Yields whether it did: when not, the forward needs the batch's dense mask."""
    hf = unwrapped(model)
    config = getattr(hf, "config", None)
    # Under activation checkpointing backward reruns the blocks after this context has closed;
    # the rerun must take the same path as the forward, so those models keep the mask.
    recomputes = getattr(hf, "is_activation_checkpointing", False) and hf.training
    if (spans is None or recomputes or getattr(config, "_attn_implementation", None) != "sdpa"
            or own_attention_needed(config, length)):
        yield False
        return
    _register()
    device = next(model.parameters()).device
    token = _layout.set(SpanLayout.of(spans, length, device))
    hf.set_attn_implementation(NAME)
    try:
        yield True
    finally:
        hf.set_attn_implementation("sdpa")
        _layout.reset(token)

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
# fp32): it works in 64-row tiles of small matmuls. Scoring whole rows with batched matmuls wastes
# the masked upper triangle but runs them at ~300 GFLOP/s; on the AVX-512-BF16 box, forward +
# backward of one layer (4 rows, 9 heads on 3) took 7 vs 18 ms at 200 tokens, 27 vs 57 at 400, 59
# vs 104 at 600, and tied at 1,024 (where the scores outgrow the caches). In fp32 it gained
# nothing, and without gradients (eval, generation) neither: those keep the flash kernel.
ROWS_MAX_LENGTH = 768
CHUNK_BYTES = 2 << 20  # scores of this many bytes at a time (a core's L2 here): in cache from matmul to softmax


def _causal(q: Tensor, k: Tensor, v: Tensor, dropout: float, scaling: float | None) -> Tensor:
    if (q.device.type == "cpu" and q.dtype == torch.bfloat16 and dropout == 0.0 and q.shape[2] <= ROWS_MAX_LENGTH
            and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return CausalRows.apply(q, k, v, q.shape[-1] ** -0.5 if scaling is None else scaling)
    gqa = q.shape[1] != k.shape[1]  # grouped-query attention: fewer key/value heads than query heads
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa)


@lru_cache(maxsize=4)  # every layer of a forward asks for the same one
def causal_bias(length: int, groups: int, dtype: torch.dtype) -> Tensor:
    """(groups * length, length): 0 on and below the diagonal, -inf above, once per query head
    of a key/value head (queries of a group laid end to end, as `CausalRows` lays them)."""
    return torch.full((length, length), float("-inf"), dtype=dtype).triu(1).repeat(groups, 1)


class CausalRows(torch.autograd.Function):
    """Causal attention of (B, H, L, d) queries on (B, Hkv, L, d) keys and values by batched
    matmuls over whole rows, softmax kept for backward (B·H·L² values: bounded by
    ROWS_MAX_LENGTH). The query heads that share a key/value head are laid end to end, (G·L, d)
    against (L, d), so grouped-query attention needs no copies of k and v, and the key/value
    gradients come out summed over their group by the matmul itself."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        B, H, L, d = q.shape
        n, G = B * k.shape[1], H // k.shape[1]
        qf, kf, vf = q.reshape(n, G * L, d), k.reshape(n, L, d), v.reshape(n, L, d)
        bias = causal_bias(L, G, q.dtype)
        probs, out = q.new_empty(n, G * L, L), q.new_empty(n, G * L, d)
        step = max(1, CHUNK_BYTES // (G * L * L * q.element_size()))
        for i in range(0, n, step):
            j = slice(i, i + step)
            scores = torch.baddbmm(bias, qf[j], kf[j].transpose(1, 2), alpha=scale)
            torch._softmax(scores, -1, False, out=probs[j])
            torch.bmm(probs[j], vf[j], out=out[j])
        ctx.save_for_backward(qf, kf, vf, probs)
        ctx.scale, ctx.shapes, ctx.step = scale, (q.shape, k.shape), step
        return out.view(B, H, L, d)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        qf, kf, vf, probs = ctx.saved_tensors
        q_shape, kv_shape = ctx.shapes
        go = grad_out.reshape(qf.shape)
        dq, dk, dv = torch.empty_like(qf), torch.empty_like(kf), torch.empty_like(vf)
        for i in range(0, len(qf), ctx.step):
            j = slice(i, i + ctx.step)
            torch.bmm(probs[j].transpose(1, 2), go[j], out=dv[j])
            d_probs = torch.bmm(go[j], vf[j].transpose(1, 2))
            d_scores = torch._softmax_backward_data(d_probs, probs[j], -1, probs.dtype)
            torch.bmm(d_scores, kf[j], out=dq[j])
            torch.bmm(d_scores.transpose(1, 2), qf[j], out=dk[j])
        return dq.mul_(ctx.scale).view(q_shape), dk.mul_(ctx.scale).view(kv_shape), dv.view(kv_shape), None


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
    if spans is None or recomputes or getattr(config, "_attn_implementation", None) != "sdpa":
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

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


def _causal(q: Tensor, k: Tensor, v: Tensor, dropout: float, scaling: float | None) -> Tensor:
    gqa = q.shape[1] != k.shape[1]  # grouped-query attention: fewer key/value heads than query heads
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa)


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

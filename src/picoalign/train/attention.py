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

import torch
import torch.nn.functional as F
from torch import Tensor

NAME = "picoalign_spans"
_spans: ContextVar[Tensor | None] = ContextVar("picoalign_spans", default=None)
_registered = False


def _causal(q: Tensor, k: Tensor, v: Tensor, dropout: float, scaling: float | None) -> Tensor:
    gqa = q.shape[1] != k.shape[1]  # grouped-query attention: fewer key/value heads than query heads
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa)


def _gather(x: Tensor, index: Tensor) -> Tensor:
    """x (B, H, L, d) at positions index (B, n) of each row -> (B, H, n, d)."""
    return x.gather(2, index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


def spans_attention(q: Tensor, k: Tensor, v: Tensor, spans: Tensor, dropout: float = 0.0,
                    scaling: float | None = None) -> Tensor:
    """Attention output (B, H, L, d) for rows [prefix, a, b] of lengths `spans` (B, 3)."""
    B, _, L, _ = q.shape
    p, a, b = spans.to(q.device).unbind(1)
    front = int((p + a).max())
    out = _causal(q[:, :, :front], k[:, :, :front], v[:, :, :front], dropout, scaling)
    if int(b.max()) == 0:
        return F.pad(out, (0, 0, 0, L - front))
    # [prefix, b]: position j of the gathered row is j in the prefix, then the b answer's tokens.
    n = int((p + b).max())
    j = torch.arange(n, device=q.device)[None, :]
    source = torch.where(j < p[:, None], j, j + a[:, None]).clamp(max=L - 1)
    back = _causal(_gather(q, source), _gather(k, source), _gather(v, source), dropout, scaling)
    # Row position t reads `front` outputs up to the end of a, then the b outputs of `back`.
    t = torch.arange(L, device=q.device)[None, :]
    in_b = (t >= (p + a)[:, None]) & (t < (p + a + b)[:, None])
    pick = torch.where(in_b, front + t - a[:, None], t.clamp(max=front - 1))
    return _gather(torch.cat([out, back], dim=2), pick)


def _attention_interface(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention-function signature; without spans (generation, a recompute under
    activation checkpointing) it is plain SDPA with the mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    spans = _spans.get()
    if spans is None or query.shape[2] != key.shape[2] or spans.shape[0] != query.shape[0]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = spans_attention(query, key, value, spans, dropout, scaling)
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
def span_attention(model, spans: Tensor | None):
    """Run `model`'s forwards inside with `spans_attention` (models on SDPA only; others as they are)."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(hf, "config", None)
    # Under activation checkpointing backward reruns the blocks after this context has closed;
    # the rerun must take the same path as the forward, so those models keep the mask.
    recomputes = getattr(hf, "is_activation_checkpointing", False) and hf.training
    if spans is None or recomputes or getattr(config, "_attn_implementation", None) != "sdpa":
        yield
        return
    _register()
    token = _spans.set(spans)
    hf.set_attn_implementation(NAME)
    try:
        yield
    finally:
        hf.set_attn_implementation("sdpa")
        _spans.reset(token)

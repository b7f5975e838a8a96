"""The model side of the decode engine: a preallocated KV cache with one slot per row, and the
forward passes over it (a prompt chunk for one slot, one token for every slot).

`LlamaKV` runs Llama-style decoder layers itself (embedding -> [norm, q/k/v with rotary
positions, attention over the cache, o, add, norm, MLP, add] -> norm -> LM head), calling the
model's own modules, so LoRA layers that peft put in place stay live. Its cache is one
(rows, kv_heads, capacity, head_dim) tensor per layer and per K/V: a row's token is written in
place at its own position, a row that leaves is replaced by the last row (one row copied, the
others untouched), attention reads the cache up to the longest row with a (rows, 1, 1, length)
key mask (none when all rows have the same length), grouped-query heads without repeating K/V.

`ModelKV` is the fallback for any other model: the model's own forward with one
`DynamicCache` per slot, a row at a time. `backend_for` picks `LlamaKV` only where the model has
the Llama layout and its logits agree with the model's own forward on a short input: the check
decides, not the model's name.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch

LAYER_PARTS = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
ATTENTION_PARTS = {"q_proj", "k_proj", "v_proj", "o_proj"}
CHECK_IDS = [1, 5, 9, 2, 7, 3]  # the agreement check's input (ids below any vocabulary's size)


def causal_lm(model):
    """The transformers model under a peft wrapper (its LoRA layers in place), or `model`."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def has_llama_layout(lm) -> bool:
    base = getattr(lm, "model", None)
    if base is None or not all(hasattr(base, a) for a in ("layers", "embed_tokens", "norm", "rotary_emb")):
        return False
    if not hasattr(lm, "lm_head") or len(base.layers) == 0:
        return False
    cfg = lm.config
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return False
    if getattr(cfg, "attn_logit_softcapping", None) or getattr(cfg, "final_logit_softcapping", None):
        return False
    for layer in base.layers:
        if {n for n, _ in layer.named_children()} != LAYER_PARTS:
            return False
        if {n for n, _ in layer.self_attn.named_children()} != ATTENTION_PARTS:
            return False
    return True


@contextmanager
def sampling_mode(model):
    """The model in eval mode (no dropout) for the while, its mode given back after. A caller
    that runs many steps (`generate_full`) switches once: a transformers model's `train()` and
    `eval()` walk every module and re-apply its kernels, ~27 ms a call for the built-in model
    under LoRA, which done at every step was 1.7 s of a 7 s RL rollout of 32 steps."""
    was_training = model.training
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def backend_for(model, max_rows: int):
    """`LlamaKV` where it computes what the model computes, else `ModelKV`. The decision is kept
    on the model (its layout does not change; its LoRA weights may, which the check does not read)."""
    fast = getattr(model, "_picoalign_fast_decode", None)
    if fast is None:
        with sampling_mode(model):  # no dropout in the check (RL hands over a model in training mode)
            fast = has_llama_layout(causal_lm(model)) and _agrees(model)
        model._picoalign_fast_decode = fast
    return LlamaKV(model, max_rows) if fast else ModelKV(model, max_rows)


@torch.inference_mode()
def _agrees(model) -> bool:
    """Logits of a short input, 4 tokens prefilled then 2 decoded, against the model's forward."""
    vocab = causal_lm(model).config.vocab_size
    ids = [i % vocab for i in CHECK_IDS]
    device = next(model.parameters()).device
    ref = model(input_ids=torch.tensor([ids], device=device)).logits[0].float()
    kv = LlamaKV(model, 1)
    try:
        kv.reserve(len(ids))
        first = kv.prefill(0, ids[:4], all_logits=True)
        steps = [kv.decode(torch.tensor([t], device=device), 1) for t in ids[4:]]
    except Exception:  # a layout that only looked like Llama's
        return False
    ours = torch.cat([first.float(), *[s.float() for s in steps]])
    tol = 1e-3 if ours.dtype == torch.float32 and kv.dtype == torch.float32 else 5e-2
    return bool((ours - ref).abs().max() <= tol * (1 + ref.abs().max()))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaKV:
    """Llama-style layers over a preallocated cache; see the module's docstring."""

    def __init__(self, model, max_rows: int) -> None:
        lm = causal_lm(model)
        self.lm, self.base, self.max_rows = lm, lm.model, max_rows
        attn = self.base.layers[0].self_attn
        cfg = lm.config
        self.head_dim = attn.head_dim
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.scale = attn.scaling
        self.device = next(lm.parameters()).device
        self.dtype = None  # of K/V, known at the first write (autocast may differ from the weights)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.capacity = 0
        self.pos = torch.zeros(max_rows, dtype=torch.long, device=self.device)  # next position per slot
        self.filled = torch.zeros(max_rows, 0, dtype=torch.bool, device=self.device)  # cache column in use
        self.lengths = [0] * max_rows  # host copy of `pos` (the attention's length without a sync)

    # ------------------------------------------------------------ slots

    def reserve(self, length: int) -> None:
        """Room for `length` positions per slot; grows (one copy of the cache) when short."""
        if length <= self.capacity:
            return
        new = max(length, 2 * self.capacity)
        if self.keys:
            self.keys = [self._grown(t, new) for t in self.keys]
            self.values = [self._grown(t, new) for t in self.values]
        grown = torch.zeros(self.max_rows, new, dtype=torch.bool, device=self.device)
        grown[:, :self.capacity] = self.filled
        self.filled, self.capacity = grown, new

    def _grown(self, t: torch.Tensor, length: int) -> torch.Tensor:
        out = t.new_zeros(t.shape[0], t.shape[1], length, t.shape[3])
        out[:, :, :t.shape[2]] = t
        return out

    def reset(self, slot: int) -> None:
        self.pos[slot], self.lengths[slot] = 0, 0
        self.filled[slot] = False

    def copy(self, src: int, dst: int, length: int) -> None:
        """Slot `dst` starts with the first `length` positions of `src` (a shared prompt)."""
        for t in (*self.keys, *self.values):
            t[dst, :, :length] = t[src, :, :length]
        self.filled[dst] = False
        self.filled[dst, :length] = True
        self.pos[dst], self.lengths[dst] = length, length

    def move(self, src: int, dst: int) -> None:
        """Slot `src`'s row now lives in `dst` (the last row filling a hole)."""
        n = self.lengths[src]
        for t in (*self.keys, *self.values):
            t[dst, :, :n] = t[src, :, :n]
        self.filled[dst] = self.filled[src]
        self.pos[dst], self.lengths[dst] = self.pos[src], n

    # ------------------------------------------------------------ forwards

    def prefill(self, slot: int, ids: list[int], all_logits: bool = False) -> torch.Tensor:
        """Run `ids` after what slot `slot` holds; logits of the last token (1, V), or of all."""
        return self.prefill_many([(slot, ids, all_logits)])[0]

    def prefill_many(self, chunks: list[tuple[int, list[int], bool]]) -> list[torch.Tensor]:
        """Several slots' prompt chunks `(slot, ids, all_logits)` in one forward: their tokens lie
        end to end in one sequence, so each projection is one matrix product over all of them
        (a prompt at a time left the two cores waiting on per-layer overhead), and attention runs
        per chunk over its own slot's cache. Logits per chunk as `prefill` gives them."""
        spans, at = [], 0
        for slot, ids, _ in chunks:
            start = self.lengths[slot]
            self.reserve(start + len(ids))
            causal = torch.ones(len(ids), start + len(ids), dtype=torch.bool, device=self.device).tril(start)
            spans.append((slot, start, at, at + len(ids), causal))
            at += len(ids)
        positions = torch.cat([torch.arange(start, start + b - a, device=self.device)
                               for _, start, a, b, _ in spans])[None]

        def attend(i, q, k, v):
            self._store(i, k)
            outs = []
            for slot, start, a, b, causal in spans:
                end = start + b - a
                self.keys[i][slot, :, start:end] = k[0, :, a:b]
                self.values[i][slot, :, start:end] = v[0, :, a:b]
                outs.append(self._attention(q[:, :, a:b], self.keys[i][slot:slot + 1, :, :end],
                                            self.values[i][slot:slot + 1, :, :end], causal))
            return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

        ids_t = torch.tensor([[t for _, ids, _ in chunks for t in ids]], device=self.device)
        hidden = self._layers(ids_t, positions, attend)[0]
        wanted = []
        for (slot, start, a, b, _), (_, _, all_logits) in zip(spans, chunks):
            self.filled[slot, start:start + b - a] = True
            self.pos[slot] += b - a
            self.lengths[slot] += b - a
            wanted.append(hidden[a:b] if all_logits else hidden[b - 1:b])
        logits = self._logits(torch.cat(wanted))
        return list(logits.split([len(w) for w in wanted]))

    def decode(self, tokens: torch.Tensor, rows: int, active: list[bool] | None = None) -> torch.Tensor:
        """One token for each of slots 0..rows-1 (`tokens` (rows,)); logits (rows, V). Slots not
        `active` (still prefilling) compute a throw-away token and do not advance."""
        self.reserve(max(self.lengths[:rows]) + 1)
        pos = self.pos[:rows]
        slots = torch.arange(rows, device=self.device)
        length = max(self.lengths[:rows]) + 1
        self.filled[slots, pos] = True
        same = all(n == self.lengths[0] for n in self.lengths[1:rows])
        mask = None if same else self.filled[:rows, None, None, :length]

        def attend(i, q, k, v):
            self._store(i, k)
            self.keys[i][slots, :, pos] = k[:, :, 0]
            self.values[i][slots, :, pos] = v[:, :, 0]
            return self._attention(q, self.keys[i][:rows, :, :length], self.values[i][:rows, :, :length], mask)

        hidden = self._layers(tokens[:rows, None], pos[:, None], attend)
        if active is None or all(active):
            self.pos[:rows] += 1
            self.lengths[:rows] = [n + 1 for n in self.lengths[:rows]]
        else:
            for s, on in enumerate(active):
                if on:
                    self.pos[s] += 1
                    self.lengths[s] += 1
                else:
                    self.filled[s, self.lengths[s]] = False
        return self._logits(hidden[:, -1])

    def _store(self, layer: int, k: torch.Tensor) -> None:
        if self.dtype is None:
            self.dtype = k.dtype
        if len(self.keys) <= layer:
            shape = (self.max_rows, self.kv_heads, self.capacity, self.head_dim)
            self.keys.append(torch.zeros(shape, dtype=k.dtype, device=self.device))
            self.values.append(torch.zeros(shape, dtype=k.dtype, device=self.device))

    def _layers(self, ids: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        x = self.base.embed_tokens(ids)
        cos, sin = self.base.rotary_emb(x, positions)
        cos, sin = cos[:, None], sin[:, None]
        b, t = ids.shape
        for i, layer in enumerate(self.base.layers):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = a.q_proj(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
            k = a.k_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            v = a.v_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            out = attend(i, q, k.to(self.dtype or k.dtype), v.to(self.dtype or v.dtype))
            x = x + a.o_proj(out.transpose(1, 2).reshape(b, t, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.base.norm(x)

    def _attention(self, q, k, v, mask) -> torch.Tensor:
        """softmax(q k^T) v, `mask` True where a query may look. The G query heads that share a
        K/V head are one matrix of G x T rows against that head's cache: two batched matmuls over
        the cache as it lies (a strided view), K/V never repeated (SDPA's GQA copies them, and was
        ~1.3x slower here at batch 32)."""
        b, h, t, d = q.shape
        g = h // self.kv_heads
        qg = q.reshape(b, self.kv_heads, g * t, d)
        scores = (qg @ k.to(q.dtype).transpose(-1, -2)).float() * self.scale
        if mask is not None:
            scores = scores.masked_fill(~(mask.repeat(g, 1) if mask.dim() == 2 else mask), -torch.inf)
        out = scores.softmax(-1).to(q.dtype) @ v.to(q.dtype)
        return out.reshape(b, h, t, d)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm.lm_head(hidden)


class ModelKV:
    """The fallback: the model's own forward, one `DynamicCache` per slot, one row at a time."""

    def __init__(self, model, max_rows: int) -> None:
        self.model, self.max_rows = model, max_rows
        self.device = next(model.parameters()).device
        self.caches: list = [None] * max_rows
        self.lengths = [0] * max_rows

    def reserve(self, length: int) -> None:
        pass

    def reset(self, slot: int) -> None:
        from transformers import DynamicCache

        self.caches[slot], self.lengths[slot] = DynamicCache(), 0

    def copy(self, src: int, dst: int, length: int) -> None:
        if self.lengths[src] != length:  # the source went on decoding: run the prompt again
            raise ValueError("ModelKV copies only a cache that holds just the prompt")
        self.caches[dst], self.lengths[dst] = copy.deepcopy(self.caches[src]), length

    def move(self, src: int, dst: int) -> None:
        self.caches[dst], self.lengths[dst] = self.caches[src], self.lengths[src]

    def prefill(self, slot: int, ids: list[int], all_logits: bool = False) -> torch.Tensor:
        out = self.model(input_ids=torch.tensor([ids], device=self.device), cache=self.caches[slot], use_cache=True)
        self.caches[slot] = out.cache
        self.lengths[slot] += len(ids)
        return out.logits[0] if all_logits else out.logits[0, -1:]

    def prefill_many(self, chunks: list[tuple[int, list[int], bool]]) -> list[torch.Tensor]:
        return [self.prefill(slot, ids, all_logits) for slot, ids, all_logits in chunks]

    def decode(self, tokens: torch.Tensor, rows: int, active: list[bool] | None = None) -> torch.Tensor:
        out = []
        for s in range(rows):
            if active is not None and not active[s]:
                out.append(None)
                continue
            out.append(self.prefill(s, [int(tokens[s])])[0])
        like = next(o for o in out if o is not None)
        return torch.stack([like if o is None else o for o in out])

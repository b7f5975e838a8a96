"""One attention layer's forward + backward: torch's causal SDPA (the flash kernel on CPU) against
picoalign's `CausalRows` (batched matmuls over blocks of queries), at the built-in model's heads.

    python bench/attention.py                          # 150, 410, 1024, 1536 tokens, bf16, 4 rows
    python bench/attention.py --lengths 256 512 --rows 8 --dtype fp32

Prints, per length, the best of `--repeats` wall times of each (ms), their ratio, and how far
each lands from the fp32 result (the largest error over output and q/k/v gradients, relative to
that tensor's largest value). Only the kernels run: no model, nothing else in the process.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from picoalign.train.attention import CausalRows


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def measure(L: int, args, dtype: torch.dtype) -> str:
    """One table row: both kernels at L tokens."""
    B, H, Hkv, d = args.rows, args.heads, args.kv_heads, args.head_dim
    scale = d ** -0.5
    # the layout attention layers hand over: (B, L, heads, d) transposed
    q = torch.randn(B, L, H, d).transpose(1, 2)
    k, v = torch.randn(B, L, Hkv, d).transpose(1, 2), torch.randn(B, L, Hkv, d).transpose(1, 2)
    upstream = torch.randn(B, H, L, d)

    def sdpa(a, b, c):
        return F.scaled_dot_product_attention(a, b, c, is_causal=True, scale=scale, enable_gqa=True)

    def rows(a, b, c):
        return CausalRows.apply(a, b, c, scale)

    def values(fn, dt):
        x = [t.to(dt).requires_grad_() for t in (q, k, v)]
        out = fn(*x)
        return [out.float(), *(g.float() for g in torch.autograd.grad(out, x, upstream.to(dt)))]

    want = values(sdpa, torch.float32)

    def error(fn):
        return max(((g - w).abs().max() / w.abs().max()).item() for g, w in zip(values(fn, dtype), want))

    x = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    g = upstream.to(dtype)
    t_sdpa = best_ms(lambda: sdpa(*x).backward(g), args.repeats)
    t_rows = best_ms(lambda: rows(*x).backward(g), args.repeats)
    kept = CausalRows.kept_bytes(x[0]) / 2**20
    return (f"| {L} | {t_sdpa:.1f} | {t_rows:.1f} | {t_sdpa / t_rows:.2f}x | {error(sdpa):.4f} | {error(rows):.4f} "
            f"| {kept:.0f} MiB |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[150, 410, 1024, 1536])
    ap.add_argument("--rows", type=int, default=4, help="sequences per batch")
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--repeats", type=int, default=8)
    args = ap.parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, {args.rows} rows, "
          f"{args.heads} query heads on {args.kv_heads} key/value heads of {args.head_dim}")
    print("| tokens | SDPA (flash) ms | CausalRows ms | speed-up | error SDPA | error CausalRows | softmax kept |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for L in args.lengths:
        print(measure(L, args, dtype), flush=True)


if __name__ == "__main__":
    main()

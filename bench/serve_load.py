"""Load on `picoalign serve`: N chat clients at once, continuous batching against one at a time.

    python bench/serve_load.py                                   # the built-in model, 1 4 16 32 clients
    python bench/serve_load.py --clients 1 16 --rounds 3 --json serve.json
    python bench/serve_load.py --model runs/demo/checkpoints/dpo --modes batched
    python bench/serve_load.py --clients 1 2 --new-tokens 4      # a quick smoke run

For each mode (`batched`: `--max-batch 32`; `one`: `--max-batch 1`, the one-at-a-time server)
a `picoalign serve` process starts on a free loopback port (`--queue-size 64`, so no client
is refused for the queue alone), answers one warm-up request, then, for each client count N,
N requests from the real `openai` async client at once (each a different story prompt,
`max_tokens` = --new-tokens, greedy), `--rounds` times. Both modes run in the same invocation,
one after the other, so compare ratios from one run, on idle cores.

Per mode and N: refused (HTTP 503), generated tokens, wall time of the round, aggregate
tokens/s (generated tokens / wall), and request latency p50 / p95 over all requests of all
rounds. Then, as the baseline for one client, the same request (the first client's chat prompt,
greedy, --new-tokens) as one `generate_full` call in a process of its own (the model loaded and
warmed up first), --rounds + 1 times: the median call. The issue's targets, checked at the end
for `batched`: at 16 clients none refused, aggregate tokens/s >= 8x one client's alone, p95
latency <= 2x one client's (p50 at N = 1); one client's p50 <= 1.1x the `generate_full` call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

from picoalign.config import BUILTIN_MODEL

MODES = {"batched": 32, "one": 1}  # mode -> --max-batch
TOPICS = ["a lighthouse keeper", "a lost dog", "a clockmaker", "a night train", "a snowed-in village",
          "a robot gardener", "a haunted library", "a ship's cat"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, max_batch: int, port: int, new_tokens: int, dtype: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "picoalign", "serve", "--model", model, "--port", str(port),
           "--max-batch", str(max_batch), "--queue-size", "64", "--max-new-tokens", str(new_tokens),
           "--dtype", dtype, "--log-level", "warning"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the server at {url} did not answer /health within {timeout:.0f} s")


async def one_request(client, i: int, new_tokens: int) -> tuple[float, int, bool]:
    """(latency s, completion tokens, refused) of one chat request."""
    import openai

    messages = [{"role": "user", "content": f"Write a short story about {TOPICS[i % len(TOPICS)]} (#{i})."}]
    t0 = time.perf_counter()
    try:
        r = await client.chat.completions.create(model="served", messages=messages, max_tokens=new_tokens,
                                                 temperature=0)
    except openai.APIStatusError as e:
        if e.status_code == 503:
            return time.perf_counter() - t0, 0, True
        raise
    return time.perf_counter() - t0, r.usage.completion_tokens, False


async def load_round(url: str, clients: int, new_tokens: int, api_key: str = "unused") -> dict:
    """N requests at once: their latencies, tokens, refusals and the round's wall time."""
    import openai

    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=3600) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, i, new_tokens) for i in range(clients)))
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "latencies": [lat for lat, _, refused in results if not refused],
            "tokens": sum(n for _, n, _ in results), "refused": sum(refused for *_, refused in results)}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarise(rounds: list[dict]) -> dict:
    latencies = [x for r in rounds for x in r["latencies"]]
    tokens, wall = sum(r["tokens"] for r in rounds), sum(r["wall_s"] for r in rounds)
    return {"refused": sum(r["refused"] for r in rounds), "tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2) if wall else 0.0,
            "p50_s": round(statistics.median(latencies), 3) if latencies else float("nan"),
            "p95_s": round(percentile(latencies, 0.95), 3)}


def run_mode(mode: str, args) -> dict[int, dict]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args.model, MODES[mode], port, args.new_tokens, args.dtype)
    try:
        wait_healthy(url, proc)
        asyncio.run(load_round(url, 1, args.new_tokens))  # warm-up, untimed
        out = {}
        for n in args.clients:
            out[n] = summarise([asyncio.run(load_round(url, n, args.new_tokens)) for _ in range(args.rounds)])
            print(f"{mode:8s} {n:3d} clients: " + "  ".join(f"{k} {v}" for k, v in out[n].items()), flush=True)
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=30)


GENERATE_BASELINE = """
import statistics, sys, time
from picoalign.generation.batched import Sampling, generate_full
from picoalign.models.load import load_for_inference
model, tokenizer = load_for_inference(sys.argv[1], dtype=sys.argv[2])
prompt = [{"role": "user", "content": sys.argv[3]}]
times = []
for _ in range(int(sys.argv[5]) + 1):  # the first is the warm-up
    t = time.perf_counter()
    generate_full(model, tokenizer, [prompt], Sampling(int(sys.argv[4])), batch_size=1)
    times.append(time.perf_counter() - t)
print(statistics.median(times[1:]))
"""


def generate_baseline(args) -> float:
    """Seconds of one `generate_full` call for the first client's request (median of --rounds)."""
    prompt = f"Write a short story about {TOPICS[0]} (#0)."
    out = subprocess.run([sys.executable, "-c", GENERATE_BASELINE, args.model, args.dtype, prompt,
                          str(args.new_tokens), str(args.rounds)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def targets(results: dict, generate_s: float | None = None) -> list[str]:
    """The issue's targets at 16 clients, against one client alone, for the batched mode."""
    batched = results.get("batched", {})
    if 1 not in batched or 16 not in batched:
        return ["targets: need --clients 1 and 16 with the batched mode"]
    one, many = batched[1], batched[16]
    speedup = many["tokens_per_s"] / one["tokens_per_s"] if one["tokens_per_s"] else float("nan")
    p95_ratio = many["p95_s"] / one["p50_s"] if one["p50_s"] else float("nan")
    lines = [f"16 clients refused: {many['refused']} (target 0) {'ok' if many['refused'] == 0 else 'MISSED'}",
            f"aggregate tokens/s 16 vs 1: {speedup:.2f}x (target >= 8x) {'ok' if speedup >= 8 else 'MISSED'}",
            f"p95 latency 16 / single: {p95_ratio:.2f}x (target <= 2x) {'ok' if p95_ratio <= 2 else 'MISSED'}"]
    if generate_s:
        ratio = one["p50_s"] / generate_s
        lines.append(f"one client {one['p50_s']:.2f} s / generate_full {generate_s:.2f} s: {ratio:.2f}x (target <= 1.1x) "
                     f"{'ok' if ratio <= 1.1 else 'MISSED'}")
    return lines


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=BUILTIN_MODEL, help="what `picoalign serve --model` loads")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 32], help="concurrent clients per level")
    ap.add_argument("--new-tokens", type=int, default=64, help="max_tokens of every request")
    ap.add_argument("--rounds", type=int, default=1, help="rounds per level (latencies pooled)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--dtype", default="auto", help="the server's --dtype (auto: bf16 where the CPU runs it fast)")
    ap.add_argument("--json", default="", help="write all numbers here")
    args = ap.parse_args(argv)
    if min(args.clients) < 1 or args.new_tokens < 1 or args.rounds < 1:
        ap.error("--clients, --new-tokens and --rounds must be >= 1")
    return args


def main(argv=None) -> None:
    args = parse(argv)
    results = {mode: run_mode(mode, args) for mode in args.modes}
    generate_s = generate_baseline(args) if 1 in args.clients else None
    if generate_s:
        print(f"generate_full, one request: {generate_s:.3f} s (median of {args.rounds})")
    lines = targets(results, generate_s)
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "cpu_count": os.cpu_count(), "results": results,
                       "generate_full_s": generate_s, "targets": lines}, f,
                      indent=2)


if __name__ == "__main__":
    main()

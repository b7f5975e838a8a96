"""`picoalign generate`: answers from any model picoalign loads, one prompt or a file of them.

    picoalign generate --model runs/demo/checkpoints/dpo --prompt "Write a two-sentence horror story."
    picoalign generate --model runs/demo/checkpoints/sft --prompt-file prompts.jsonl --out answers.jsonl
    picoalign generate --prompt "Once upon a time" --raw --greedy --max-new-tokens 40

A prompt goes through the chat template (with --system before it) unless --raw. A prompt file
is .jsonl (each row a `prompt` string or message list, or `messages`) or plain text (one prompt
per non-empty line); its answers are generated --batch-size at a time and written as JSONL rows
`{prompt, response, finish_reason, prompt_tokens, completion_tokens}`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from picoalign.config import GenerateConfig
from picoalign.generation.batched import Sampling, generate_full
from picoalign.io import write_jsonl
from picoalign.models.load import load_for_inference


def read_prompts(path: str | Path) -> list:
    """Prompts of a file; a bad row raises ValueError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            prompts.append(line.strip())
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON: {e.msg}") from None
        except RecursionError:  # Python's reader gives up about 1,000 levels down
            raise ValueError(f"{path}:{n}: not valid JSON: nested too deeply") from None
        prompt = row.get("prompt", row.get("messages")) if isinstance(row, dict) else None
        if not (isinstance(prompt, str) and prompt.strip()) and not _is_messages(prompt):
            raise ValueError(f"{path}:{n}: field 'prompt': expected a non-empty string or a list of "
                             "{role, content} messages (or a `messages` field)")
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path}: no prompts in the file")
    return prompts


def _is_messages(value) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)


def sampling_of(cfg) -> Sampling:
    return Sampling(cfg.max_new_tokens, cfg.greedy, cfg.temperature, cfg.top_p, cfg.top_k, cfg.seed)


def with_system(prompt, system: str):
    if not system:
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return [{"role": "system", "content": system}, *messages]


def generate_answers(cfg: GenerateConfig) -> list[dict]:
    """Generate, then print (one prompt: the answer; a file: JSONL) or write --out; returns the rows."""
    prompts = [cfg.prompt] if cfg.prompt else read_prompts(cfg.prompt_file)
    model, tokenizer = load_for_inference(cfg.model, cfg.device, cfg.dtype, cfg.merge_adapter)
    inputs = [with_system(p, cfg.system) for p in prompts]
    answers = generate_full(model, tokenizer, inputs, sampling_of(cfg), cfg.batch_size, cfg.raw)
    rows = [{"prompt": p, "response": a.text.strip(), "finish_reason": a.finish_reason,
             "prompt_tokens": a.prompt_tokens, "completion_tokens": a.completion_tokens}
            for p, a in zip(prompts, answers)]
    if cfg.out:
        write_jsonl(cfg.out, rows)
        print(f"generate: {len(rows)} answers -> {cfg.out}", file=sys.stderr)
    elif cfg.prompt:
        print(rows[0]["response"])
    else:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    return rows

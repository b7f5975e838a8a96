"""lm-evaluation-harness on a run's models: `picoalign eval --run runs/demo --lm-eval [TASKS]`.

    from picoalign.eval.harness import lm_eval_scores
    scores = lm_eval_scores({"sft": "runs/demo/checkpoints/sft"}, "runs/demo/data", ["picoalign"], "runs/demo/lm_eval")

Every model is scored by `lm_eval.simple_evaluate` with the `hf` backend: a plain model by its
folder (`pretrained=`), a LoRA adapter on its base folder through `peft=` (an adapter whose base
is itself an adapter is merged by picoalign first and handed over as a model object).

Offline tasks, written by picoalign over the run's own held-out files (so nothing is downloaded):

* `picoalign_pairs` (and `picoalign_pairs_hard`): multiple choice, "which answer fits this
  prompt", over the test pairs: the context is the prompt rendered with the model's chat
  template and its generation prompt, the choices are the chosen and the rejected answer as the
  assistant's turn (ending in end-of-turn). lm-eval picks the choice of the higher summed
  log-likelihood, which is what picoalign's `dpo_test_pref_acc` compares (log π(chosen) >
  log π(rejected)): the two accuracies are the same number (tests/test_harness.py).
  lm-eval moves the context's trailing newline into each continuation; that adds the same
  log-probability to both choices, so the comparison is unchanged.
* `picoalign_sft_ppl`: rolling log-likelihood of the SFT test responses (word and byte
  perplexity, bits per byte).

`picoalign` names all the offline tasks; any other name is a task registered in lm-eval
(`hellaswag,arc_easy`: those download their data, so they need the network).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from picoalign.data.formats import read_preferences, read_sft
from picoalign.io import atomic_write_text, write_jsonl
from picoalign.models.chat import answer_text, prompt_text
from picoalign.models.load import base_of_adapter, load_model, load_tokenizer, resolve

OFFLINE = ("picoalign_pairs", "picoalign_pairs_hard", "picoalign_sft_ppl")
PAIR_FILES = {"picoalign_pairs": "dpo_test.jsonl", "picoalign_pairs_hard": "dpo_test_hard.jsonl"}


def split_tasks(text: str) -> list[str]:
    """'picoalign,hellaswag' -> ['picoalign', 'hellaswag']."""
    return [t.strip() for t in str(text).split(",") if t.strip()]


def context_and_answer(tokenizer, prompt, answer: str) -> tuple[str, str]:
    """The prompt as the model sees it before answering, and the answer as the text of its turn
    (the same strings picoalign's render_prompt/render_answer tokenise)."""
    if tokenizer.chat_template:
        head, tail = prompt_text(tokenizer, prompt), answer_text(tokenizer, prompt, answer)
    else:
        head, tail = prompt, answer
    if tokenizer.eos_token and not tail.rstrip().endswith(tokenizer.eos_token):
        tail += tokenizer.eos_token
    return head, tail


def _yaml(task: str, docs: Path, kind: str) -> dict:
    base = {"task": task, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(docs)}},
            "test_split": "test", "metadata": {"version": 1.0}}
    if kind == "pairs":
        return base | {"output_type": "multiple_choice", "doc_to_text": "context", "doc_to_choice": "choices",
                       "doc_to_target": "label", "target_delimiter": "",
                       "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    return base | {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "response",
                   "metric_list": [{"metric": m, "aggregation": agg, "higher_is_better": False} for m, agg in (
                       ("word_perplexity", "weighted_perplexity"), ("byte_perplexity", "weighted_perplexity"),
                       ("bits_per_byte", "bits_per_byte"))]}


def write_tasks(data: str | Path, tokenizer, folder: str | Path) -> list[str]:
    """Write the offline tasks' documents and YAMLs into `folder`; returns the tasks written (a
    task whose test file is missing or empty is left out)."""
    data, folder = Path(data), Path(folder)
    written = []
    for task, name in PAIR_FILES.items():
        pairs = read_preferences(data / name, allow_empty=True) if (data / name).exists() else []
        docs = []
        for i, p in enumerate(pairs):
            context, chosen = context_and_answer(tokenizer, p["prompt"], p["chosen"])
            _, rejected = context_and_answer(tokenizer, p["prompt"], p["rejected"])
            # alternate the chosen answer's position, so that a tie is not always scored right
            choices, label = ([chosen, rejected], 0) if i % 2 == 0 else ([rejected, chosen], 1)
            docs.append({"id": p["id"], "context": context, "choices": choices, "label": label})
        if docs:
            write_jsonl(folder / f"{task}.jsonl", docs)
            atomic_write_text(folder / f"{task}.yaml", yaml.safe_dump(_yaml(task, folder / f"{task}.jsonl", "pairs")))
            written.append(task)
    rows = read_sft(data / "sft_test.jsonl", allow_empty=True) if (data / "sft_test.jsonl").exists() else []
    if rows:
        write_jsonl(folder / "picoalign_sft_ppl.jsonl", [{"id": r["id"], "response": r["response"]} for r in rows])
        atomic_write_text(folder / "picoalign_sft_ppl.yaml",
                          yaml.safe_dump(_yaml("picoalign_sft_ppl", folder / "picoalign_sft_ppl.jsonl", "ppl")))
        written.append("picoalign_sft_ppl")
    return written


def hf_model(spec: str, device: str, dtype: str, batch_size: int):
    """lm-eval's HFLM for a model picoalign loads: by folder, adapter through `peft=`."""
    from lm_eval.models.huggingface import HFLM

    common = {"device": device, "dtype": dtype, "batch_size": batch_size}
    tokenizer = load_tokenizer(spec)
    add_bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    common["add_bos_token"] = add_bos
    path = Path(spec)
    if path.is_dir() and (path / "adapter_config.json").exists():
        base = base_of_adapter(path)
        if not (Path(base).is_dir() and (Path(base) / "adapter_config.json").exists()):
            src = resolve(base)
            return HFLM(pretrained=src.path, gguf_file=src.gguf_file, peft=str(path), tokenizer=tokenizer, **common)
        import torch

        model, _ = load_model(spec, device)  # an adapter chain: merged here, handed over whole
        return HFLM(pretrained=model.to(getattr(torch, dtype)).eval(), tokenizer=tokenizer, **common)
    src = resolve(spec)
    return HFLM(pretrained=src.path, gguf_file=src.gguf_file, tokenizer=tokenizer, **common)


def summarise(results: dict) -> dict:
    """lm-eval's results as {task: {metric: value, metric_stderr: value, n: docs}}."""
    out = {}
    for task, values in results["results"].items():
        row = {}
        for key, value in values.items():
            if "," not in key or not isinstance(value, (int, float)):
                continue
            metric = key.split(",", 1)[0]
            row[metric] = None if value == "N/A" else float(value)
        row["n"] = int(results.get("n-samples", {}).get(task, {}).get("effective", 0))
        out[task] = row
    return out


def lm_eval_scores(models: dict[str, str], data: str | Path, tasks: list[str], folder: str | Path,
                   limit: int = 0, device: str = "cpu", dtype: str = "float32", batch_size: int = 8,
                   log_samples: bool = False) -> dict:
    """Run lm-eval on each model; returns {"models": {name: {task: metrics}}, ...} (with
    `samples` per model when `log_samples`)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ValueError("--lm-eval needs lm-evaluation-harness: pip install 'picoalign[lm-eval]'") from e
    folder = Path(folder)
    scores: dict = {"tasks": tasks, "limit": limit or None, "version": getattr(lm_eval, "__version__", ""),
                    "models": {}}
    for name, spec in models.items():
        tokenizer = load_tokenizer(spec)
        offline = write_tasks(data, tokenizer, folder / name)
        wanted = [t for t in tasks if t != "picoalign"] + (list(offline) if "picoalign" in tasks else [])
        missing = [t for t in wanted if t in OFFLINE and t not in offline]
        if missing:
            raise ValueError(f"lm-eval task {', '.join(missing)}: its test file is missing or empty in {data}")
        print(f"eval: lm-eval on {name}: {', '.join(wanted)}", file=sys.stderr, flush=True)
        manager = TaskManager(include_path=str(folder / name))
        results = lm_eval.simple_evaluate(
            model=hf_model(spec, device, dtype, batch_size), tasks=wanted, task_manager=manager,
            limit=limit or None, log_samples=log_samples, random_seed=0, numpy_random_seed=0,
            torch_random_seed=0, fewshot_random_seed=0)
        scores["models"][name] = summarise(results)
        if log_samples:
            scores.setdefault("samples", {})[name] = results.get("samples", {})
        print(f"eval: lm-eval {name}: {json.dumps(scores['models'][name])}", file=sys.stderr, flush=True)
    return scores

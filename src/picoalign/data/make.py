"""`picoalign data`: write the SFT and preference splits plus `dataset_meta.json`.

    picoalign data --out runs/demo/data                 # offline horror-story specs
    picoalign data --source tinystories-instruct --input stories.txt --out data/ts
    DEEPSEEK_API_KEY=... picoalign data --out runs/demo/data      # answers by an LLM (data/llm_rows.py)

Every prompt is unique across all six files, so no prompt is in two splits. The offline story
source also writes `dpo_test_hard.jsonl`: as many test pairs again, from the held-out generator
(data/stories_heldout.py), on new prompts; an LLM provider does not rewrite them. The files are
written only after every row is made, each atomically, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from picoalign.config import DataConfig, save_config
from picoalign.data import stories, stories_heldout
from picoalign.io import write_json, write_jsonl
from picoalign.scrub import scrub

SPLITS = ("train", "val", "test")


def _unique_specs(rng: random.Random, n: int, seen: set[str]) -> list[stories.StorySpec]:
    specs: list[stories.StorySpec] = []
    tries = 0
    while len(specs) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise RuntimeError(f"could not draw {n} distinct story specifications")
        spec = stories.random_spec(rng)
        prompt = stories.format_prompt(spec)
        if prompt not in seen:
            seen.add(prompt)
            specs.append(spec)
    return specs


def story_rows(cfg: DataConfig) -> dict[str, list[dict]]:
    """The six splits of the offline story task, keyed like `sft_train` / `dpo_test`, and the
    held-out hard test pairs `dpo_test_hard`, on prompts none of the six uses."""
    rng = random.Random(cfg.seed)
    seen: set[str] = set()
    files: dict[str, list[dict]] = {}
    for split in SPLITS:
        rows = []
        for i, spec in enumerate(_unique_specs(rng, getattr(cfg, f"n_sft_{split}"), seen)):
            prompt = stories.format_prompt(spec)
            response = stories.write_story(spec, rng)
            rows.append({"id": f"sft-{split}-{i:06d}", "prompt": prompt, "input": prompt, "response": response})
        files[f"sft_{split}"] = rows
    for split in SPLITS:
        rows = []
        for i, spec in enumerate(_unique_specs(rng, getattr(cfg, f"n_dpo_{split}"), seen)):
            prompt = stories.format_prompt(spec)
            chosen, rejected, kind = stories.story_pair(spec, rng)
            rows.append({"id": f"dpo-{split}-{i:06d}", "prompt": prompt, "input": prompt, "chosen": chosen,
                         "rejected": rejected, "rejected_kind": kind})
        files[f"dpo_{split}"] = rows
    files["dpo_test_hard"] = stories_heldout.heldout_pairs(cfg.n_dpo_test, cfg.seed, avoid_prompts=seen)
    return files


def make_data(cfg: DataConfig) -> dict:
    """Make the data set described by `cfg` in `cfg.out`; returns the dataset meta."""
    t0 = time.time()
    from picoalign.data.llm import resolve_provider

    provider = resolve_provider(cfg.provider)
    out = Path(cfg.out)
    if cfg.source == "stories":
        files = story_rows(cfg)
        version = stories.GENERATOR_VERSION
        versions = {"heldout_generator_version": stories_heldout.GENERATOR_VERSION}
    else:
        from picoalign.data import instruct

        if cfg.provider != "auto" and provider != "template" or cfg.judge:
            raise ValueError(f"source={cfg.source} takes its answers from the input file: "
                             "use provider=template (or auto), without judge")
        provider = "template"
        files = instruct.instruct_rows(cfg)
        version = instruct.GENERATOR_VERSION
        versions = {}
    extra: dict = {"provider": "template"}
    if provider != "template" or cfg.judge:
        from picoalign.data.llm_rows import llm_files

        hard = files.pop("dpo_test_hard", None)  # the held-out pairs are what they test: kept as made
        files, extra = llm_files(cfg, files, provider, out)
        if hard is not None:
            files["dpo_test_hard"] = hard
    if cfg.n_arith_sft:  # worked arithmetic answers, shuffled in with the SFT rows (the RL preset)
        from picoalign.data.arith import arith_sft_rows

        files["sft_train"] = files.get("sft_train", []) + arith_sft_rows(cfg.n_arith_sft, cfg.seed)
        random.Random(cfg.seed).shuffle(files["sft_train"])
    if cfg.deid:
        from picoalign.data.deid import deid_rows

        counts: dict[str, int] = {}
        files = {name: deid_rows(rows, counts) for name, rows in files.items()}
        extra["deid"] = counts
        print(f"data: de-identified {sum(counts.values())} spans: {counts}")
    for name, rows in files.items():
        write_jsonl(out / f"{name}.jsonl", rows)
    meta = {
        "source": cfg.source,
        "provider": extra.pop("provider"),
        "generator_version": version,
        **versions,
        "seed": cfg.seed,
        "sizes": {k: getattr(cfg, k) for k in ("n_sft_train", "n_sft_val", "n_sft_test", "n_dpo_train", "n_dpo_val",
                                               "n_dpo_test", "n_arith_sft")},
        "counts": {name: len(rows) for name, rows in files.items()},
        **extra,
        "seconds": round(time.time() - t0, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    meta["rows_from"] = rows_from(meta)
    write_json(out / "dataset_meta.json", meta)
    save_config(cfg, out / "config.yaml")
    print(scrub(origin_line(meta, out)))  # the stage's last line: where the rows came from
    return meta


def rows_from(meta: dict) -> dict:
    """How many rows the LLM wrote, how many the template fallback filled in, how many are missing
    (llm_fallback=stop); without an LLM, every row is the templates'."""
    llm = meta.get("llm")
    if not llm:
        return {"llm": 0, "template": sum(meta["counts"].values()), "missing": 0, "llm_asked": False}
    return {"llm": llm.get("llm_rows", 0), "template": llm.get("template_rows", 0),
            "missing": llm.get("missing_rows", 0), "llm_asked": True, "endpoint": llm.get("endpoint", "")}


def origin_line(meta: dict, out: Path) -> str:
    r = meta["rows_from"]
    if not r["llm_asked"]:
        return f"data: {r['template']} rows from the offline templates in {out}"
    fell_back = r["template"] + r["missing"]
    head = "data: WARNING: " if fell_back else "data: "
    by = f" ({r['endpoint']})" if r.get("endpoint") else ""
    line = (f"{head}{r['llm']} rows from the LLM{by}, {r['template']} from the template fallback"
            + (f", {r['missing']} missing (llm_fallback=stop)" if r["missing"] else "") + f" in {out}")
    if fell_back:
        line += " (why: dataset_meta.json, llm.first_failure)"
    return line

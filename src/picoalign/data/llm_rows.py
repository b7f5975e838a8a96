"""The story rows written by an LLM: batched requests in parallel, fallbacks, a resumable partial file.

    DEEPSEEK_API_KEY=... picoalign data --out runs/x/data
    LLM_BASE_URL=http://127.0.0.1:8000/v1 picoalign data --provider openai-compatible --llm-batch-size 4

The offline generator first makes every row (the same prompts as `provider=template` with the
same seed); the LLM then rewrites the answers: `llm_batch_size` prompts per request, up to
`llm_concurrency` requests in flight. A row the LLM could not make keeps its template answer
(`llm_fallback=template`, marked `"model": "template"`), or, with `llm_fallback=stop`, the first
failure stops the calls and only the rows made so far are written. A budget that runs out or
`llm_max_consec_fails` failed requests in a row end the calls the same way. Each finished row is
appended to `llm_rows.partial.jsonl` at once, so an interrupted run keeps its rows: rerun the
same command and only the missing rows are requested (the file goes when the data is complete).
"""

from __future__ import annotations

import json
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from picoalign.config import DataConfig, split_names
from picoalign.data.judge import judge_jobs
from picoalign.data.llm import (
    BudgetExhausted,
    Limits,
    LLMClient,
    LLMError,
    Meter,
    endpoint,
    parse_endpoint,
    redact,
)
from picoalign.data.llm_requests import Job, Key, batch_jobs
from picoalign.io import read_jsonl_lenient

PARTIAL = "llm_rows.partial.jsonl"


class NoLLMRows(ValueError):
    """An LLM provider was asked for and not one row came from it (llm_required): nothing is written."""

    def __init__(self, why: str) -> None:
        super().__init__(f"no row came from the LLM: {why}. Nothing was written: rerun when the endpoint "
                         "answers, use --provider template for the offline data, or --llm-required false to "
                         "write the template rows in its place")


class RowMaker:
    """Runs jobs in parallel under the failure policy, saving each finished row as it comes."""

    def __init__(self, cfg: DataConfig, partial: Path, meter: Meter, files: dict[str, list[dict]],
                 kinds: tuple[str, ...]) -> None:
        self.cfg, self.partial, self.meter = cfg, partial, meter
        self.done: dict[Key, dict | None] = {}
        self.stopped: str | None = None
        self._prompts = {(n, r["id"]): r["prompt"] for n, rows in files.items() for r in rows}
        self._llm_keys = {k for k in self._prompts if k[0].split("_")[0] in kinds}  # rows the LLM makes
        self._consec = 0
        self._lock = threading.Lock()

    def resume(self) -> int:
        """Take the rows of an earlier run's partial file whose prompts are still the same."""
        for line in read_jsonl_lenient(self.partial):
            key = (line.get("file"), line.get("id"))
            if key in self._llm_keys and line.get("prompt") == self._prompts[key]:
                self.done[key] = line.get("row")
        return len(self.done)

    def run(self, jobs: list[Job]) -> None:
        with ThreadPoolExecutor(max_workers=max(1, self.cfg.llm_concurrency)) as pool:
            futures = [pool.submit(self._do, job) for job in jobs]
            try:
                for f in as_completed(futures):
                    f.result()
            except BaseException:
                self.stopped = self.stopped or "interrupted"  # queued jobs return at once
                raise

    def _do(self, job: Job) -> None:
        if self.stopped:
            return
        try:
            rows = job.run()
        except BudgetExhausted as e:
            self._stop(f"budget: {e}")
            return
        except LLMError as e:
            self._failed(str(e))
            return
        got = {k: rows[k] for k in job.keys if k in rows}
        self._save(got)
        if len(got) < len(job.keys):
            self._failed(f"{len(job.keys) - len(got)} of {len(job.keys)} rows missing or unusable in the reply")
        else:
            with self._lock:
                self._consec = 0

    def _save(self, rows: dict[Key, dict | None]) -> None:
        with self._lock:
            self.partial.parent.mkdir(parents=True, exist_ok=True)
            with self.partial.open("a", encoding="utf-8") as f:
                for (name, rid), row in rows.items():
                    prompt = row["prompt"] if row else self._prompts.get((name, rid))
                    f.write(json.dumps({"file": name, "id": rid, "prompt": prompt, "row": row},
                                       ensure_ascii=False) + "\n")
                f.flush()
            self.done.update(rows)

    def _failed(self, why: str) -> None:
        warnings.warn(f"data: LLM request failed: {redact(why)}", stacklevel=2)
        with self._lock:
            self._consec += 1
            consec = self._consec
        if self.cfg.llm_fallback == "stop":
            self._stop(f"a request failed and llm_fallback=stop ({redact(why)})")
        elif self.cfg.llm_max_consec_fails and consec >= self.cfg.llm_max_consec_fails:
            self._stop(f"{consec} failed requests in a row (last: {redact(why)})")

    def _stop(self, why: str) -> None:
        with self._lock:
            if self.stopped is None:
                self.stopped = why
                warnings.warn(f"data: no more LLM requests: {why}", stacklevel=2)

    def assemble(self, files: dict[str, list[dict]]) -> tuple[dict[str, list[dict]], dict]:
        """The final files: LLM rows, else template rows (policy template) or nothing (stop)."""
        out, counts = {}, {"llm_rows": 0, "template_rows": 0, "judged_out": 0, "missing_rows": 0}
        for name, rows in files.items():
            kept = []
            for row in rows:
                key = (name, row["id"])
                if key in self.done:
                    made = self.done[key]
                    counts["llm_rows" if made else "judged_out"] += 1
                    if made:
                        kept.append(made)
                elif key in self._llm_keys and self.cfg.llm_fallback == "template":
                    kept.append(_template_row(row))
                    counts["template_rows"] += 1
                elif key in self._llm_keys:
                    counts["missing_rows"] += 1
                else:
                    kept.append(row)  # a file the LLM was not asked to make
            out[name] = kept
        self.meter.add(fallbacks=counts["template_rows"])
        return out, counts


def _template_row(row: dict) -> dict:
    if "response" in row:
        return {**row, "model": "template"}
    return {**row, "chosen_model": "template", "rejected_model": "template"}


def llm_files(cfg: DataConfig, files: dict[str, list[dict]], provider: str, out: Path) -> tuple[dict, dict]:
    """Rewrite `files` (the template rows) with the LLM; returns (files, meta entries)."""
    meter = Meter(cfg.llm_max_calls, cfg.llm_max_total_tokens)
    info: dict = {"requested_provider": cfg.provider, "fallback": cfg.llm_fallback,
                  "batch_size": cfg.llm_batch_size, "concurrency": cfg.llm_concurrency}
    try:
        main, answerers, judge = _checked_clients(cfg, provider, meter)
    except (LLMError, BudgetExhausted, ValueError) as e:
        why = redact(str(e))
        if cfg.llm_required:
            raise NoLLMRows(f"the LLM endpoint is not usable ({why})") from None
        warnings.warn(f"data: the LLM endpoint is not usable ({why}); using the offline templates "
                      "(llm_required=false)", stacklevel=2)
        info.update(health_check=f"failed: {why}", health_check_calls=meter.usage.calls, llm_rows=0,
                    template_rows=sum(map(len, files.values())), missing_rows=0, **meter.problems())
        return files, {"provider": "template", "llm": info, "openai_usage": meter.snapshot()}
    # The health checks' calls (retries included) count against LLM_MAX_CALLS: say how many.
    info.update(health_check="ok", health_check_calls=meter.usage.calls,
                endpoint=str(main.endpoint) if main else f"judge {judge.endpoint}")
    if cfg.llm_max_calls:
        print(f"data: the health check used {meter.usage.calls} of LLM_MAX_CALLS={cfg.llm_max_calls} calls")
    kinds = (("sft",) if main else ()) + (("dpo",) if main or judge else ())
    maker = RowMaker(cfg, out / PARTIAL, meter, files, kinds)
    info["resumed_rows"] = maker.resume()
    skip, size, tokens = set(maker.done), cfg.llm_batch_size, cfg.llm_max_output_tokens
    jobs = batch_jobs(main, files, "sft", size, tokens, skip) if main else []
    if judge:
        jobs += judge_jobs(answerers, judge, files, cfg.judge_criteria, skip)
        info["judge"] = {"answer_models": [str(c.endpoint) for c in answerers],
                         "judge_model": str(judge.endpoint), "criteria": cfg.judge_criteria}
    elif main:
        jobs += batch_jobs(main, files, "dpo", size, tokens, skip)
    print(f"data: {len(jobs)} LLM requests to make ({main.endpoint if main else 'judged pairs only'}), "
          f"{info['resumed_rows']} rows resumed")
    maker.run(jobs)
    files, counts = maker.assemble(files)
    info.update(counts, stopped=maker.stopped, **meter.problems())
    asked = counts["llm_rows"] + counts["template_rows"] + counts["missing_rows"]
    if cfg.llm_required and asked and not counts["llm_rows"] + counts["judged_out"]:
        first = info.get("first_failure") or maker.stopped or "every request failed"
        raise NoLLMRows(f"all {asked} rows asked of it failed (first failure: {redact(str(first))})")
    if not counts["missing_rows"]:
        maker.partial.unlink(missing_ok=True)  # complete: a rerun starts afresh
    return files, {"provider": provider if main else "template", "llm": info, "openai_usage": meter.snapshot()}


def _checked_clients(cfg: DataConfig, provider: str, meter: Meter):
    """(data model or None, answer models, judge or None), each endpoint health-checked once."""
    limits = Limits.from_config(cfg)
    main = LLMClient(endpoint(provider, cfg.llm_model, cfg.llm_base_url), limits, meter) \
        if provider != "template" else None
    answerers, judge = [], None
    if cfg.judge:
        def ep(spec: str):  # a bare MODEL is served where the data provider's model is
            if "@" not in spec and main:
                return endpoint(main.endpoint.provider, spec.strip(), main.endpoint.base_url)
            return parse_endpoint(spec)

        answerers = [LLMClient(ep(s), limits, meter) for s in split_names(cfg.answer_models)]
        if not cfg.judge_model and not main:
            raise ValueError("judge needs judge_model=MODEL@PROVIDER when no data provider is set")
        judge = LLMClient(ep(cfg.judge_model), limits, meter) if cfg.judge_model else main
    checked = set()
    for client in (main, *answerers, judge):
        if client is not None and client.endpoint not in checked:
            checked.add(client.endpoint)
            client.health_check()
    return main, answerers, judge

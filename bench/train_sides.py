"""The two sides of bench/compare.py's training modes (sft, dpo), each run in its own worker
process: picoalign through the loop's public step API, TRL's trainer through its own loop.
"""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path

from bench_common import (
    BATCH,
    BETA,
    BUILTIN,
    LORA_ALPHA,
    LORA_R,
    MAX_LENGTH,
    SEED,
    _quiet,
    _worker,
    peak_rss_gib,
    reset_rss_peak,
    rss_peak_since_reset_gib,
)

# ---------------------------------------------------------------- picoalign side


def ours_setup(spec: dict):
    """`picoalign sft/dpo`'s own path: prepare() -> SFTTask/DPOTask -> the loop's `train_step`."""
    import torch

    from picoalign.config import DPOConfig, LoraConfig, SFTConfig
    from picoalign.train import loop
    from picoalign.train.sft import SFTTask
    from picoalign.train.stage import prepare

    common = dict(model=spec.get("model", BUILTIN), data=spec["data"], out=str(Path(spec["tmp"]) / "ours"), dtype=spec["dtype"],
                  seed=SEED, lora=LoraConfig(r=LORA_R, alpha=LORA_ALPHA), batch_size=BATCH,
                  max_length=MAX_LENGTH, max_steps=spec["total_steps"], epochs=0, progress=False,
                  tensorboard=False)
    t0 = time.perf_counter()
    if spec["mode"] == "sft":
        cfg = SFTConfig(**common, monitor_file=None)
        p = prepare(cfg, "sft")
        task = SFTTask(p.model, p.tokenizer, cfg, p.device)
    else:
        cfg = DPOConfig(**common, beta=BETA, reference="precompute", prefix_sharing=True)
        p = prepare(cfg, "dpo")
        task = _timed_dpo_task()(p.model, p.tokenizer, cfg, p.device, p.dtype)
    setup_s = time.perf_counter() - t0
    batches = task.batches()
    params = [q for q in task.model.parameters() if q.requires_grad]
    opt = loop.make_optimizer(params, cfg)
    sched = loop.make_schedule(opt, cfg, loop.planned_steps(cfg, len(batches)))
    state = loop.LoopState()
    loop.seed_everything(cfg.seed)
    device, dtype = p.device, p.dtype

    def step() -> dict:
        epoch, k = divmod(state.micro, len(batches))  # the batch `train_step` is about to take
        batch = batches[loop.batch_order(len(batches), epoch, cfg.seed)[k]]
        t = time.perf_counter()
        metrics, computed = loop.train_step(task, batches, state, cfg, opt, sched, params, device, dtype).read(device)
        dt = time.perf_counter() - t
        tokens, pairs = (computed, 0) if spec["mode"] == "sft" else (logical_pair_tokens(batch), batch.n_seqs // 2)
        return {"s": dt, "tokens": tokens, "computed_tokens": computed, "pairs": pairs, "loss": metrics["loss"]}

    def profile() -> str:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=48)

    from picoalign.train.flops import matmul_parameters

    n_all = sum(q.numel() for q in task.model.parameters())
    info = {"setup_s": setup_s, "n_matmul": matmul_parameters(task.model),
            "padded_tokens": sum(b.input_ids.numel() for b in batches) / len(batches),
            "precompute_s": getattr(task, "precompute_s", None), "n_params": n_all,
            "n_trainable": sum(q.numel() for q in params), "dtype": "bf16" if dtype == torch.bfloat16 else "fp32",
            "threads": torch.get_num_threads(), "n_batches": len(batches),
            "config": ("one row per example, length-sorted batches, logits only at targets" if spec["mode"] == "sft" else
                       "precomputed reference, prefix sharing, logits only at targets")}
    return info, step, profile


def _timed_dpo_task():
    from picoalign.train.dpo import DPOTask

    class TimedDPOTask(DPOTask):
        """DPOTask that records how long its reference precompute took."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.precompute_s = getattr(self, "setup_seconds", None)  # None: nothing to precompute

    return TimedDPOTask


def logical_pair_tokens(batch) -> int:
    """Real tokens of a preference batch counted as TRL feeds them: (prompt+chosen) + (prompt+rejected).

    A prefix-shared row is [prompt, chosen, rejected]; position 0 occurs only at its first token
    (padding has position 0 too), so the row's real length is the count of non-zero positions + 1.
    """
    import torch

    lengths = (batch.position_ids != 0).sum(1) + 1
    rows = batch.input_ids.shape[0]
    if rows == batch.n_seqs:  # no prefix sharing: each row is already prompt + one answer
        return int(lengths.sum())
    targets = torch.bincount(batch.seq_index // 2, minlength=rows)
    return int((2 * lengths - targets).sum())


# ---------------------------------------------------------------- TRL side


def peer_setup(spec: dict):
    """TRL's trainer, driven by its own `train()`; a callback pauses it between blocks."""
    os.environ.setdefault("HF_DATASETS_CACHE", str(Path(spec["tmp"]) / "hf-datasets"))
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from picoalign.data.formats import read_preferences, read_sft

    folder = spec["model_dir"]
    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    gc = True  # TRL 1.16's default, and what `best` asks for SFT
    common = dict(output_dir=str(Path(spec["tmp"]) / "peer"), per_device_train_batch_size=BATCH,
                  max_steps=spec["total_steps"], max_length=MAX_LENGTH, bf16=spec["dtype"] == "bf16",
                  gradient_checkpointing=gc, use_cpu=True, report_to="none", save_strategy="no",
                  disable_tqdm=True, seed=SEED)
    data = Path(spec["data"])
    timer: dict = {}
    counter = {"tokens": 0, "pairs": 0}
    if spec["mode"] == "sft":
        from trl import SFTConfig, SFTTrainer

        rows = read_sft(data / "sft_train.jsonl")
        ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                 "completion": [{"role": "assistant", "content": r["response"]}]} for r in rows])
        args = SFTConfig(**common, completion_only_loss=True)
        trainer_cls, precompute = _counting(SFTTrainer, counter, timer, pairs=False), False
    else:
        from trl import DPOConfig, DPOTrainer

        rows = read_preferences(data / "dpo_train.jsonl")
        ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                 "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                 "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
        precompute = spec["peer_config"] == "best"
        args = DPOConfig(**common, beta=BETA, precompute_ref_log_probs=precompute)
        trainer_cls = _counting(DPOTrainer, counter, timer, pairs=True)
    t0 = time.perf_counter()
    trainer = trainer_cls(model=model, args=args, train_dataset=ds, processing_class=tokenizer, peft_config=lora)
    setup_s = time.perf_counter() - t0
    n_all = sum(q.numel() for q in trainer.model.parameters())
    n_train = sum(q.numel() for q in trainer.model.parameters() if q.requires_grad)
    what = {"sft": "TRL SFTTrainer defaults", "dpo": "TRL DPOTrainer defaults (live reference: adapter off)"}
    config = what[spec["mode"]] if spec["peer_config"] == "default" else (
        "TRL + gradient checkpointing" if spec["mode"] == "sft" else "TRL + precompute_ref_log_probs")
    info = {"setup_s": setup_s, "precompute_s": timer.get("precompute") if precompute else None,
            "n_params": n_all, "n_trainable": n_train, "dtype": spec["dtype"], "threads": torch.get_num_threads(),
            "config": f"{config}, gradient checkpointing {'on' if gc else 'off'}"}
    return info, trainer, counter, TrainerCallback


def _counting(trainer_cls, counter: dict, timer: dict, pairs: bool):
    """A subclass that counts the real tokens of every training batch and times the precompute."""

    class Counting(trainer_cls):
        def training_step(self, model, inputs, *args, **kwargs):
            mask = inputs.get("attention_mask")
            counter["tokens"] += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
            if pairs:  # DPO batches are [chosen rows..., rejected rows...]
                counter["pairs"] += inputs["input_ids"].shape[0] // 2
            return super().training_step(model, inputs, *args, **kwargs)

        def _precompute_ref_logps(self, *args, **kwargs):
            t = time.perf_counter()
            out = super()._precompute_ref_logps(*args, **kwargs)
            timer["precompute"] = timer.get("precompute", 0.0) + time.perf_counter() - t
            return out

    return Counting


def peer_worker(conn, spec: dict) -> None:
    """Like `_worker`, but TRL owns the loop: the pipe is served from inside a callback."""
    try:
        _quiet(spec["threads"])
        info, trainer, counter, TrainerCallback = peer_setup(spec)
        conn.send({"event": "ready", **info})
        state = {"quota": 0, "steps": [], "stopped": False, "t": 0.0, "tokens": 0, "pairs": 0}

        def wait_for_work() -> None:
            while True:
                cmd = conn.recv()
                if cmd[0] == "run":
                    state["quota"] = cmd[1]
                    state["t"], state["tokens"], state["pairs"] = time.perf_counter(), counter["tokens"], counter["pairs"]
                    return
                if cmd[0] == "profile":
                    conn.send({"event": "profile", "table": "not supported"})
                    continue
                state["stopped"] = True
                return

        class Pause(TrainerCallback):
            def on_train_begin(self, args, st, control, **kw):
                reset_rss_peak()
                wait_for_work()

            def on_step_end(self, args, st, control, **kw):
                now = time.perf_counter()
                state["steps"].append({"s": now - state["t"], "tokens": counter["tokens"] - state["tokens"],
                                       "pairs": counter["pairs"] - state["pairs"]})
                state["t"], state["tokens"], state["pairs"] = now, counter["tokens"], counter["pairs"]
                state["quota"] -= 1
                if state["quota"] <= 0:
                    conn.send({"event": "block", "steps": state["steps"]})
                    state["steps"] = []
                    wait_for_work()
                    if state["stopped"]:
                        control.should_training_stop = True
                return control

        trainer.add_callback(Pause())
        trainer.train()
        if not state["stopped"]:
            wait_for_work()
        conn.send({"event": "done", "rss_gib": peak_rss_gib(), "train_rss_gib": rss_peak_since_reset_gib()})
    except Exception:  # noqa: BLE001
        conn.send({"event": "error", "trace": traceback.format_exc()})


def ours_worker(conn, spec: dict) -> None:
    _worker(conn, ours_setup, spec)


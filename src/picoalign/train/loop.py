"""The one training loop, shared by every training stage: eval -> checkpoint -> step -> log.

A stage hands `fit` a `Task` (the protocol below lists all the loop reads from it): the model,
its training micro-batches (made once), a loss for one micro-batch, an evaluation, and a way to
save the model. The loop owns the rest: AdamW, warmup + cosine schedule, gradient accumulation
and clipping, bf16 autocast, the budgets (`max_steps`, `epochs`, `max_seconds`, whichever comes
first), early stopping, checkpoints that resume on the same curve, and the logs. `fit` reads as
its phases: `set_up` (batches, budgets, optimizer), `resume`, `begin` (config, marker, logs, DDP,
the clock), `run_steps` (the cycle), `finish` (a run with fewer than `min_steps` steps fails
unmarked: `require_steps`; else the last eval, the final model, the marker).

Under `torchrun` (see `train/dist.py`) the same loop runs data-parallel: each optimiser step
takes `grad_accum x world_size` micro-batches of the one shuffled order, rank r the r-th of
every `world_size`, so every rank does the same number of steps and 2 processes with
`grad_accum` 1 follow the curve of 1 process with `grad_accum` 2. Rank 0 alone logs and saves.
With `fsdp: true` the model is sharded across the processes instead of replicated (FSDP2).
The phases carry torch.profiler labels (`picoalign/forward`, ...; see bench/profile_step.py).

Checkpoint layout in `out/`:
    config.yaml             the resolved config, written with the first marker
    last/                   the latest checkpoint: model files + trainer_state.pt (optimizer,
                            scheduler, RNG states, step, data position, elapsed time)
    last.old/               only after a crash between the two renames that replace last/:
                            the previous whole checkpoint, which a resume then starts from
    <model files>           the final model (HF folder), written when training ends
    picoalign.json          {"complete": false} once the batches exist and a resumed checkpoint
                            has loaded (nothing is written before); written last, at the end,
                            as {"complete": true, ...}: a finished stage

Ctrl-C and SIGTERM both save `last/` before the exception goes on.
"""

from __future__ import annotations

import math
import random
import shutil
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.autograd import profiler

from picoalign.config import save_config, to_dict
from picoalign.io import write_json
from picoalign.models.load import MARKER, read_marker
from picoalign.train import dist
from picoalign.train.flops import Throughput, cached_peak, flops_per_token, trains_in_full
from picoalign.train.trackers import Trackers

STATE_FILE = "trainer_state.pt"


class Task(Protocol):
    """What a training stage hands `fit`: everything the loop reads from it.

    Under torchrun with DDP, while the loop runs `loss`, `model` is the DDP wrapper (it answers
    every attribute of the model, so task code runs unchanged) and the loss's forward syncs the
    gradients in backward; a forward that must not train or sync (a frozen reference's, a
    rollout's generation) runs on `dist.bare(self.model)`. Everywhere else `model` is the model.
    The attributes after the methods are optional: the loop reads them with these defaults.
    """

    model: torch.nn.Module  # the model being trained

    def batches(self) -> list[Any]:
        """The training micro-batches, made once: each has `.to(device)`, `.n_tokens` (its real
        tokens) and, where it is a padded tensor batch, `.input_ids` (the FLOPs line's size)."""

    def loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """(loss, metrics) of one micro-batch on the device; metrics may stay tensors there (the
        loop reads them on logged steps only)."""

    def evaluate(self) -> dict[str, float]:
        """Validation metrics; "val/loss" (lower is better) drives early stopping."""

    def save(self, folder: Path, state_dict: dict | None = None) -> None:
        """The model as an HF folder; `state_dict`: an FSDP model's weights, gathered by the loop."""

    setup_seconds: float = 0.0  # work done for the steps before step 1 (DPO's reference precompute):
    #                             it counts against max_seconds, once (a resume finds it cached)
    setup_what: str = "set-up"  # what that work was, for the error when no step fits the budget
    budget_advice: str = ""  # the task's own ways to fit a budget (DPO: fewer pairs, reference=live)
    reference_forward: bool = False  # each step also runs a frozen reference's forward (FLOPs count it)


def task_option(task: Task, name: str) -> Any:
    """An optional attribute of `task`, or the protocol's default for it."""
    return getattr(task, name, getattr(Task, name))


@dataclass
class LoopState:
    step: int = 0  # optimiser steps done
    micro: int = 0  # micro-batches consumed (the data position)
    elapsed: float = 0.0  # training seconds across resumes
    best: float = math.inf
    bad_evals: int = 0
    last_eval: dict = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def autocast_for(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_optimizer(params: list[torch.nn.Parameter], cfg) -> torch.optim.Optimizer:
    kwargs = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "betas": (0.9, 0.999)}
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)  # one kernel for all params where supported
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, **kwargs)


def make_schedule(opt, cfg, total_steps: int | None):
    """Linear warmup, then cosine decay to 0 over `total_steps` (constant when unknown)."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant" or not total_steps:
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def planned_steps(cfg, n_batches: int, world_size: int = 1) -> int | None:
    """Optimiser steps the step/epoch budgets allow (None when only time limits the run).

    Only whole steps run (`_budget_reached` stops before a step the epochs cannot fill), so the
    epoch limit is floored: 10 batches at grad_accum 3 are 3 steps, and the cosine ends on the 3rd.
    """
    limits = []
    if cfg.max_steps > 0:
        limits.append(cfg.max_steps)
    if cfg.epochs > 0:
        limits.append(math.ceil(cfg.epochs * n_batches) // (cfg.grad_accum * world_size))
    return min(limits) if limits else None


def batches_used(cfg, n_batches: int, world_size: int = 1) -> list[int] | None:
    """Indices of the training micro-batches the step/epoch budget will take, in the loop's own
    shuffled order (None when only `max_seconds` limits the run: then nobody knows in advance)."""
    total = planned_steps(cfg, n_batches, world_size)
    if total is None:
        return None
    return batch_order(n_batches, 0, cfg.seed)[: total * cfg.grad_accum * world_size]


def batch_order(n: int, epoch: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n, generator=g).tolist()


def phase(name: str):
    """A torch.profiler label for a phase of the loop; nothing at all when no profiler runs."""
    return profiler.record_function(f"picoalign/{name}") if profiler._is_profiler_enabled else nullcontext()


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `kill`, systemd and schedulers send), raised where Ctrl-C raises
    KeyboardInterrupt, so that the loop saves a checkpoint the same way."""

    exit_status = 128 + signal.SIGTERM  # 143, what a shell reports for a process ended by SIGTERM


@contextmanager
def sigterm_as_interrupt():
    """While inside: SIGTERM raises `Terminated`. Outside (a second signal while the checkpoint
    is saved) the previous handler is back. Signals reach the main thread only: elsewhere, nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum, frame):
        raise Terminated("terminated (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class Training:
    """What the phases of one `fit` share: the task, its settings, and the loop's machinery."""

    task: Task
    cfg: Any
    name: str
    device: torch.device
    dtype: torch.dtype
    out: Path
    log_dir: Path
    batches: list
    total: int | None  # optimiser steps the step/epoch budgets allow (None: time alone limits)
    max_micro: float  # micro-batches the epoch budget allows
    params: list
    opt: torch.optim.Optimizer
    sched: Any
    state: LoopState = field(default_factory=LoopState)
    ddp: Any = None  # the DDP wrapper under torchrun (not with fsdp)
    trackers: Any = None
    throughput: Throughput | None = None
    setup: float = 0.0  # the task's work before step 1 that counts against max_seconds
    started: float = 0.0  # the clock's origin: time.time() - started is the training time


def fit(task: Task, cfg, name: str, device: torch.device, dtype: torch.dtype, log_dir: Path | None = None,
        marker: dict | None = None) -> dict:
    """Train `task.model` under `cfg`'s budgets; returns a summary (steps, seconds, last eval).

    `marker` is what `picoalign.json` says while training (`complete: false`); it and the
    config are written only here, once the batches exist and a resumed checkpoint has loaded."""
    run = set_up(task, cfg, name, device, dtype, log_dir)
    if cfg.resume:
        resume(run)
    begin(run, marker)
    stop_reason = run_steps(run)
    return finish(run, stop_reason)


def set_up(task: Task, cfg, name: str, device, dtype, log_dir: Path | None) -> Training:
    """The batches, their budgets, the optimizer and the schedule (FSDP shards the model first)."""
    out = Path(cfg.out)
    dist.init(device)
    world = dist.world()
    batches = task.batches()
    if not batches:
        raise ValueError(f"{name}: no training batches (is the training file empty?)")
    total = planned_steps(cfg, len(batches), world.size)
    max_micro = math.ceil(cfg.epochs * len(batches)) if cfg.epochs > 0 else math.inf
    if cfg.fsdp and world.distributed:
        dist.shard(task.model, device)  # before the optimizer: it must hold the shards
    params = [p for p in task.model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg)
    sched = make_schedule(opt, cfg, total)
    seed_everything(cfg.seed)
    return Training(task, cfg, name, device, dtype, out, Path(log_dir) if log_dir else out / "logs", batches, total,
               max_micro, params, opt, sched)


def resume(run: Training) -> None:
    """Model, optimizer, schedule, RNG and data position from the last checkpoint (every rank)."""
    run.state = load_checkpoint(checkpoint_to_resume(run.out, run.name), run.task.model, run.opt, run.sched)
    print(f"{run.name}: resumed at step {run.state.step} (micro-batch {run.state.micro})")


def begin(run: Training, marker: dict | None) -> None:
    """From here `out` is this run's: config and marker written, the log opened, DDP wrapped, the
    throughput probed, the clock started (the task's set-up time already on it)."""
    cfg, name, world = run.cfg, run.name, dist.world()
    if world.main:
        _record_start(cfg, run.out, marker or {"stage": name, "complete": False})
        if not cfg.resume and (run.log_dir / f"{name}.jsonl").exists():
            (run.log_dir / f"{name}.jsonl").unlink()  # a fresh run starts a fresh log
    sharded = dist.is_sharded(run.task.model)
    run.ddp = dist.wrap(run.task.model, run.device) if world.distributed and not sharded else None
    effective = cfg.batch_size * cfg.grad_accum * world.size
    print(f"{name}: effective batch {effective} per optimiser step = batch_size {cfg.batch_size} x grad_accum "
          f"{cfg.grad_accum} x {world.size} process{'es' if world.distributed else ''}"
          + (" (FSDP: parameters, gradients and optimizer state sharded)" if sharded else ""))
    run_params = {"stage": name, "world_size": world.size, "effective_batch": effective, **to_dict(cfg)}
    run.trackers = Trackers(run.log_dir, name, cfg, run_params) if world.main else _NoTrackers()
    run.trackers.log({"kind": "start", "step": run.state.step, "world_size": world.size,
                      "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "effective_batch": effective})
    run.throughput = _throughput(run.task, run.batches, name, run.device, run.dtype, world)
    run.setup = 0.0 if cfg.resume else task_option(run.task, "setup_seconds")
    run.started = time.time() - run.state.elapsed - run.setup


def run_steps(run: Training) -> str | None:
    """eval -> checkpoint -> budgets -> step -> log until a budget or early stopping says stop;
    returns why. Ctrl-C and SIGTERM save `last/` (unsharded) and go on up."""
    task, cfg, state = run.task, run.cfg, run.state
    bar = _progress(cfg, run.total, state.step, run.name, dist.world().main)
    stop_reason = None
    try:
        with sigterm_as_interrupt():  # kill, systemd, schedulers: saved like Ctrl-C
            while True:
                # -- eval (every rank evaluates its identical model; rank 0's verdict counts)
                due = cfg.eval_every > 0 and state.step % cfg.eval_every == 0
                if due and state.last_eval.get("step") != state.step:
                    if _evaluate(task, state, cfg, run.trackers, run.device, run.dtype):
                        stop_reason = "early stop"
                # -- checkpoint (every rank: a sharded model is gathered first; rank 0 writes)
                if cfg.save_every > 0 and state.step > 0 and state.step % cfg.save_every == 0:
                    save_checkpoint(run.out / "last", task, run.opt, run.sched, state)
                # -- budgets
                state.elapsed = time.time() - run.started
                stop_reason = dist.from_main(stop_reason or _budget_reached(cfg, state, run.total, run.max_micro,
                                                                            dist.world().size))
                if stop_reason:
                    break
                # -- step, then log
                with phase("step"):
                    t0 = time.time()
                    result = train_step(task, run.batches, state, cfg, run.opt, run.sched, run.params, run.device,
                                        run.dtype, run.ddp)
                    state.step += 1
                    _log_step(run, result, time.time() - t0, bar)
                    state.elapsed = time.time() - run.started
    except KeyboardInterrupt:
        bar.close()
        if dist.world().main and not dist.is_sharded(task.model):  # a sharded model needs every rank to gather
            save_checkpoint(run.out / "last", task, run.opt, run.sched, state)
        run.trackers.close()
        raise
    bar.close()
    return stop_reason


def _log_step(run: Training, result: StepResult, dt: float, bar) -> None:
    """The one host read of a logged step (other steps read nothing), the log row and the bar."""
    state, cfg = run.state, run.cfg
    with phase("log"):
        if state.step % cfg.log_every == 0:
            metrics, tokens = result.read(run.device)
            state.elapsed = time.time() - run.started
            speed = run.throughput.of(tokens, dt)
            run.trackers.log({"kind": "train", "step": state.step, "epoch": round(state.micro / len(run.batches), 4),
                              **metrics, "tokens": tokens, **speed, "elapsed": round(state.elapsed, 2)})
            if cfg.compile and state.step == 1 and dist.world().main:
                print(f"{run.name}: step 1 took {dt:.1f}s, torch.compile's compilation included")
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{tokens / dt:.0f}",
                            **({"mfu": f"{speed['mfu']:.0%}"} if "mfu" in speed else {}))
        bar.update(1)


def finish(run: Training, stop_reason: str | None) -> dict:
    """Fail a run with too few steps (unmarked); else the last eval, the final model, the marker."""
    task, cfg, state = run.task, run.cfg, run.state
    if state.step < cfg.min_steps:  # a stage whose budgets left no room to train fails, unmarked
        if state.step > 0:  # kept for `--resume` with a larger budget
            save_checkpoint(run.out / "last", task, run.opt, run.sched, state)
        run.trackers.close()
        require_steps(run.name, state.step, cfg.min_steps, _too_few_steps_why(run, stop_reason))
    if state.last_eval.get("step") != state.step:
        _evaluate(task, state, cfg, run.trackers, run.device, run.dtype)
    summary = {"stage": run.name, "complete": True, "steps": state.step, "stop_reason": stop_reason,
               "seconds": round(state.elapsed, 2), "last_eval": state.last_eval}
    weights = save_checkpoint(run.out / "last", task, run.opt, run.sched, state)  # gathered weights if sharded
    if dist.world().main:
        task.save(run.out, weights)
        write_json(run.out / MARKER, {**read_marker(run.out), **summary})
    run.trackers.close()
    dist.barrier()  # when fit returns, on any rank, the final model is on disk
    print(f"{run.name}: done in {state.step} steps, {state.elapsed:.0f}s ({stop_reason}); saved to {run.out}")
    return summary


def _record_start(cfg, out: Path, marker: dict) -> None:
    """The resolved config and `picoalign.json` (`complete: false`): from here on `out` is this run's."""
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    write_json(out / MARKER, marker)


class TooFewSteps(ValueError):
    """A training stage ended with fewer optimiser steps than its minimum: it failed."""


def require_steps(name: str, steps: int, minimum: int, why: str = "") -> None:
    """Fail a stage that trained fewer than `minimum` optimiser steps (its budgets ran out first),
    so that no one evaluates, ships or reports an untrained model as trained. Every training
    stage's loop calls it before it marks its output complete; `why` says what to change."""
    if steps >= minimum:
        return
    raise TooFewSteps(f"{name}: training stopped after {steps} optimiser step{'' if steps == 1 else 's'}, "
                      f"fewer than min_steps={minimum}, so the output is not marked complete"
                      + (f". {why}" if why else ""))


def _too_few_steps_why(run: Training, stop_reason: str | None) -> str:
    """Which budget ended the run and what to change (the task adds its own ways: fewer pairs, ...)."""
    cfg, n, world_size = run.cfg, len(run.batches), dist.world().size
    advice = task_option(run.task, "budget_advice")
    if stop_reason == "max_seconds":
        spent = (f"; {run.setup:.0f} s of it went to work before step 1 ({task_option(run.task, 'setup_what')})"
                 if run.setup > 0 else "")
        return (f"max_seconds={cfg.max_seconds:g} was spent{spent}. Give it a larger max_seconds"
                + (f", {advice}" if advice else "") + ", or set min_steps=0 to accept an untrained output")
    if stop_reason == "epochs":
        return (f"epochs={cfg.epochs:g} over {n} micro-batch{'es' if n != 1 else ''} fills fewer "
                f"steps of grad_accum {cfg.grad_accum} x {world_size} process{'es' if world_size > 1 else ''}. "
                "Raise epochs or lower grad_accum, or give it more data")
    return f"it stopped on {stop_reason}. Raise max_steps or lower min_steps"


@dataclass
class StepResult:
    """What one optimiser step did. `stats` stay on the device (losses, the task's metrics,
    grad_norm): reading them is a host sync, so the loop reads them only on steps it logs."""

    stats: dict[str, torch.Tensor]
    tokens: int  # real tokens of the step's micro-batches (this rank's)
    lr: float

    def read(self, device) -> tuple[dict[str, float], int]:
        """The step's numbers as floats, averaged over the ranks: one transfer for all of them."""
        values, tokens = dist.mean_metrics(self.stats, self.tokens, device)
        return {k: round(v, 6) if k != "grad_norm" else round(v, 4) for k, v in values.items()} | {"lr": self.lr}, tokens


def train_step(task, batches, state, cfg, opt, sched, params, device, dtype, ddp=None) -> StepResult:
    """One optimiser step over `grad_accum` micro-batches (on each of the `world_size` ranks):
    forward + backward of each, clip, AdamW, schedule. No host sync: the numbers stay on the device."""
    world = dist.world()
    sums: dict[str, torch.Tensor] = {}
    tokens = 0
    with _ddp_forward(task, ddp):
        task.model.train()
        for i in range(cfg.grad_accum):
            with phase("data"):
                epoch, k = divmod(state.micro + i * world.size + world.rank, len(batches))
                batch = batches[batch_order(len(batches), epoch, cfg.seed)[k]].to(device)
            with _gradient_sync(task.model, sync=i == cfg.grad_accum - 1):
                with phase("forward"), autocast_for(device, dtype):
                    loss, metrics = task.loss(batch)
                with phase("backward"):
                    (loss / cfg.grad_accum).backward()
            for key, v in {"loss": loss, **metrics}.items():
                v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v), device=device)
                sums[key] = sums.get(key, 0.0) + v / cfg.grad_accum
            tokens += batch.n_tokens
    with phase("optimizer"):
        clip = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        sums["grad_norm"] = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        lr = sched.get_last_lr()[0]  # the rate this step uses
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    state.micro += cfg.grad_accum * world.size  # only now: an interrupted step is redone whole on resume
    return StepResult(sums, tokens, lr)


@contextmanager
def _ddp_forward(task, ddp):
    """For one training step under DDP: `task.model` is the DDP wrapper, so the task's forward
    syncs gradients in backward (see `Task`); outside steps (eval, checkpoints) the model itself."""
    if ddp is None:
        yield
        return
    bare, task.model = task.model, ddp
    try:
        yield
    finally:
        task.model = bare


def _gradient_sync(model, sync: bool):
    """Gradient sync in this backward (DDP wrapper or FSDP model), or not: an accumulation
    micro-step but the last only accumulates."""
    if dist.is_sharded(model):  # FSDP hooks live on the model itself
        model.set_requires_gradient_sync(sync)
        return nullcontext()
    return model.no_sync() if isinstance(model, dist.DDP) and not sync else nullcontext()


def _throughput(task, batches, name: str, device, dtype, world) -> Throughput:
    """FLOPs per token of this task's step, and the peak its model's matmul shapes reach here."""
    per_token = flops_per_token(task.model, trains_in_full(task.model), task_option(task, "reference_forward"))
    # padded tokens per micro-batch: what the matmuls see
    row_tokens = sum(b.input_ids.numel() if hasattr(b, "input_ids") else b.n_tokens for b in batches) / len(batches)
    t0 = time.time()
    peak = cached_peak(task.model, int(row_tokens), dtype, device) if per_token else None
    if world.main and peak:
        print(f"{name}: {per_token / 1e9:.2f} GFLOP per token; this model's matmuls peak at "
              f"{peak / 1e9:,.0f} GFLOP/s here ({str(dtype).replace('torch.', '')}, "
              f"{'measured in ' + format(time.time() - t0, '.1f') + ' s' if time.time() - t0 > 0.05 else 'cached'})"
              "; MFU = achieved / peak")
    return Throughput(per_token, peak, world.size)


def _evaluate(task, state: LoopState, cfg, trackers, device, dtype) -> bool:
    """Run the task's evaluation and log it; True when early stopping says stop."""
    task.model.eval()
    with phase("eval"), torch.no_grad(), autocast_for(device, dtype):
        metrics = task.evaluate()
    state.last_eval = {"step": state.step, **metrics}
    trackers.log({"kind": "eval", "step": state.step, **metrics})
    val = metrics.get("val/loss")
    if val is None:
        return False
    if val < state.best - 1e-6:
        state.best, state.bad_evals = val, 0
    else:
        state.bad_evals += 1
    return cfg.early_stop > 0 and state.bad_evals >= cfg.early_stop


def _budget_reached(cfg, state: LoopState, total: int | None, max_micro: float, world_size: int = 1) -> str | None:
    if total is not None and state.step >= total:
        return "max_steps" if cfg.max_steps and state.step >= cfg.max_steps else "epochs"
    if state.micro + cfg.grad_accum * world_size > max_micro:
        return "epochs"
    if cfg.max_seconds > 0 and state.elapsed >= cfg.max_seconds:
        return "max_seconds"
    return None


def _progress(cfg, total, initial, name, main: bool = True):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=name, unit="step", disable=not (cfg.progress and main),
                dynamic_ncols=True)


class _NoTrackers:
    """What ranks other than 0 log to."""

    def log(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(folder: Path, task: Task, opt, sched, state: LoopState) -> dict | None:
    """Write the model and the full trainer state to `folder`, replacing it atomically.
    Call it on every rank: a sharded model is gathered (a collective); rank 0 writes. Returns
    the gathered weights of a sharded model (None otherwise), for saving the final model."""
    whole = None
    if dist.is_sharded(task.model):
        whole = (dist.full_state_dict(task.model), dist.full_optimizer_state(task.model, opt))
    if not dist.world().main:
        return whole and whole[0]
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with phase("checkpoint"):
        _write_checkpoint(tmp, task, opt, sched, state, whole)
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return whole and whole[0]


def _write_checkpoint(tmp: Path, task: Task, opt, sched, state: LoopState, whole=None) -> None:
    weights, optim = whole or (None, None)
    task.save(tmp, weights)
    # (the gathered state dict names parameters as the bare model does)
    trainable = {n: p.detach().cpu() if weights is None else weights[n]
                 for n, p in task.model.named_parameters() if p.requires_grad}
    torch.save(
        {
            "trainable": trainable,
            "optimizer": opt.state_dict() if optim is None else optim,
            "sharded": optim is not None,
            "scheduler": sched.state_dict(),
            "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "loop": state.__dict__,
        },
        tmp / STATE_FILE,
    )


def resumable(out: Path) -> Path | None:
    """The checkpoint a resume starts from: `last/`, else `last.old/`, which a crash between the
    two renames of `save_checkpoint`'s swap leaves as the only whole checkpoint (None: neither)."""
    return next((p for p in (Path(out) / "last", Path(out) / "last.old") if (p / STATE_FILE).exists()), None)


def checkpoint_to_resume(out: Path, name: str) -> Path:
    """`out/last`, moved back from `last.old/` first where a crash left only that; no checkpoint
    at all is an error, not a silent start from step 0 that would replace the log."""
    found = resumable(out)
    dist.barrier()  # every rank has looked before rank 0 moves anything
    if found is None:
        raise ValueError(f"{name}: --resume, but {out} holds no checkpoint (last/{STATE_FILE}); "
                         "run without --resume to start again from step 0 (that replaces its log)")
    last = Path(out) / "last"
    if found != last:
        if dist.world().main:
            print(f"{name}: no {last}, but {found} (a crash while a checkpoint was being replaced); "
                  "resuming from it")
            found.rename(last)  # so that the next save's swap finds things as it left them
        dist.barrier()
    return last


def load_checkpoint(folder: Path, model: torch.nn.Module, opt, sched) -> LoopState:
    blob = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)
    if blob.get("sharded", False) != dist.is_sharded(model):
        raise ValueError(f"{folder}: checkpoint written {'with' if blob.get('sharded') else 'without'} fsdp; "
                         "resume it with the same fsdp setting")
    if dist.is_sharded(model):
        dist.load_full_state(model, opt, blob["trainable"], blob["optimizer"])
    else:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in blob["trainable"].items():
                params[name].copy_(value)
        opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    random.setstate(blob["rng"]["python"])
    torch.set_rng_state(blob["rng"]["torch"])
    if blob["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["rng"]["cuda"])
    return LoopState(**blob["loop"])

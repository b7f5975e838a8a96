"""`picoalign rl`: online RL on the model's own samples: GRPO, RLOO and online DPO.

    picoalign rl --model runs/demo/checkpoints/sft --out runs/demo/checkpoints/rl --rewards arith
    picoalign rl ... --method rloo --num_generations 4 --max_steps 30
    picoalign rl ... --method online-dpo --beta 0.1
    picoalign rl ... --prompts sft_train.jsonl --rewards spec,darkness,fluency --reward_weights 1,1,0.5
    picoalign rl ... --rewards mypkg.scores:length_reward        # any f(prompts, completions, **columns)

One training micro-batch is `batch_size` prompts. For each, the policy (the live LoRA weights,
no merge) samples `num_generations` (G) completions through `generation/batched.generate_full`
(one prompt's KV serves its G samples); the rewards score them (rewards/); advantages are
computed within each group; the update is one of the pure losses of train/rl_losses.py. A
rollout is reused for `num_iterations` optimiser steps (then the clipped ratio to its old
log-probs matters). The loop (train/loop.py:fit) does the rest: AdamW, schedule, budgets,
checkpoints, logs, progress bar. Under torchrun each rank samples its own micro-batches' groups,
so a group never splits across ranks.

Logged with TRL's names: reward, reward_std, rewards/<name>/mean|std, frac_reward_zero_std,
completions/mean_length|min_length|max_length|clipped_ratio, kl (β > 0), entropy, clip_ratio/*,
and time/rollout (seconds spent sampling and scoring). Every `sample_every` rollouts a few
prompts with their completions and rewards go to <logs>/rl_samples.jsonl.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from picoalign.config import RLConfig
from picoalign.generation.answers import Generation
from picoalign.generation.batched import Sampling, generate_full
from picoalign.models.chat import render_prompt
from picoalign.rewards import RewardError, RewardSet, parse_names
from picoalign.train import dist
from picoalign.train import rl_losses as L
from picoalign.train.batching import Encoded, chunks, pack_pairs
from picoalign.train.loop import fit
from picoalign.train.losses import dpo_stats, token_logps
from picoalign.train.stage import prepare, save_model


@dataclass
class PromptBatch:
    """One micro-batch: `rows` (each a prompt and its columns), `index` fixes its sampling seed."""

    rows: list[dict]
    index: int
    n_tokens: int = 0  # the rollout's tokens, set once sampled (the loop counts them)

    def to(self, device) -> PromptBatch:
        return self


@dataclass
class Rollout:
    """G completions per prompt, scored: everything the update needs, on the device."""

    prompt_ids: list[list[int]]  # (P) the rendered prompts
    completion_ids: list[list[int]]  # (P·G) the sampled tokens, end-of-turn included where one ended
    texts: list[str]
    finish: list[str]  # stop | length
    per_func: torch.Tensor  # (P·G, K) rewards of each function, NaN where one declined
    rewards: torch.Tensor  # (P·G,) the weighted sum
    mask: torch.Tensor  # (P·G, T) 1 on the completion tokens the loss uses
    advantages: torch.Tensor | None = None
    old_logps: torch.Tensor | None = None  # (P·G, T) at sampling time (num_iterations > 1, RLOO)
    ref_logps: torch.Tensor | None = None  # (P·G, T) under the frozen reference (β > 0, online DPO)
    stats: dict = field(default_factory=dict)
    n_tokens: int = 0


def read_prompt_rows(cfg: RLConfig) -> tuple[list[dict], list[dict]]:
    """(train, val) prompt rows: the arith generator's, or a JSONL file's (`prompt` + columns)."""
    if cfg.prompts == "arith":
        from picoalign.data.arith import arith_rows

        return arith_rows(cfg.n_prompts, cfg.seed, "train"), arith_rows(cfg.val_prompts, cfg.seed, "test")
    from picoalign.data.formats import iter_rows, parse_columns
    from picoalign.data.sources import data_split

    rows = []
    for where, row in iter_rows(data_split(cfg.data, cfg.prompts, main=True), parse_columns(cfg.columns)):
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise where.error("prompt", "each row needs a non-empty string `prompt` (its other fields "
                              "reach the reward functions as columns)")
        rows.append(row)
    rows = rows[: cfg.n_prompts] if cfg.n_prompts else rows
    return rows[cfg.val_prompts:] or rows, rows[: cfg.val_prompts]


def reward_context(cfg: RLConfig, device) -> dict:
    """What the built-in rewards may read: the stage's settings, the device, the rank."""
    from picoalign.config import to_dict
    from picoalign.models.load import read_marker

    base = read_marker(cfg.model).get("base_model") if Path(cfg.model).is_dir() else cfg.model
    return {**to_dict(cfg), "device": str(device), "rank": dist.world().rank, "base_model": base or cfg.model}


def columns_of(rows: list[dict], g: int) -> dict[str, list]:
    """Every field but `prompt`, repeated for each of the G completions of its row."""
    keys = sorted({k for r in rows for k in r} - {"prompt", "response", "chosen", "rejected"})
    return {k: [r.get(k) for r in rows for _ in range(g)] for k in keys}


def score(rewards: RewardSet, rows: list[dict], gens: list[Generation], g: int) -> torch.Tensor:
    """(N, K) rewards of `rows`' G answers each; the functions get what TRL's get besides the
    rows' columns: `completion_ids` (end token included) and, ours, `finish_reason`."""
    prompts = [r["prompt"] for r in rows for _ in range(g)]
    return rewards(prompts, [a.text for a in gens], **columns_of(rows, g),
                   completion_ids=[a.token_ids for a in gens], finish_reason=[a.finish_reason for a in gens])


def padded(flat: torch.Tensor, seq_index: torch.Tensor, n_seqs: int, width: int) -> torch.Tensor:
    """(N,) values of consecutive sequences -> (n_seqs, width), zero after each one's end."""
    counts = torch.bincount(seq_index, minlength=n_seqs)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(flat.numel(), device=flat.device) - starts[seq_index]
    out = flat.new_zeros((n_seqs, width))
    out[seq_index, pos] = flat
    return out


def forward_logps_entropy(model, batch, width: int, entropy: bool = True):
    """Per-token log-probs (B, T) of every completion (fp32, with their graph) and, without a
    graph, the entropy of the policy at each of those positions (B, T)."""
    from picoalign.train.attention import span_attention

    with span_attention(model, batch.spans, batch.input_ids.shape[1]) as on_spans:
        out = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                    attention_mask=None if on_spans else batch.dense_mask(), logits_to_keep=batch.keep,
                    use_cache=False)
    logits = out.logits.reshape(-1, out.logits.shape[-1])
    flat = token_logps(logits, batch.labels, batch.rows)
    logps = padded(flat, batch.seq_index, batch.n_seqs, width)
    if not entropy:
        return logps, None
    with torch.no_grad():
        ent = []
        for start in range(0, logits.shape[0], 64):  # fp32 64 rows at a time: a few MB, not the whole vocab
            lp = logits[start:start + 64].float().log_softmax(-1)
            ent.append(-(lp.exp() * lp).sum(-1))
        ent = torch.cat(ent)[batch.rows]
    return logps, padded(ent, batch.seq_index, batch.n_seqs, width)


class RLTask:
    """The loop's Task for online RL: a micro-batch of prompts in, a rollout and its loss out."""

    def __init__(self, model, tokenizer, cfg: RLConfig, device, dtype, rows: tuple[list[dict], list[dict]],
                 rewards: RewardSet, log_dir: Path) -> None:
        self.model, self.tokenizer, self.cfg, self.device, self.dtype = model, tokenizer, cfg, device, dtype
        self.rewards, self.log_dir = rewards, Path(log_dir)
        train, self.val = rows
        self.train = [PromptBatch(c, i) for i, c in enumerate(chunks(train, cfg.batch_size))]
        for b in self.train:  # an estimate for the loop's FLOPs line, until the first rollout
            b.n_tokens = cfg.batch_size * cfg.num_generations * cfg.max_completion_length
        self.g = cfg.num_generations
        self.needs_ref = cfg.beta > 0 or cfg.method == "online-dpo"
        self.frozen = None
        if self.needs_ref and not cfg.lora.enabled:  # full fine-tuning: a frozen copy of the start
            self.frozen = copy.deepcopy(model).eval().requires_grad_(False)
        self.reference_forward = self.needs_ref  # the FLOPs line counts the reference's forward
        # what the loop's too-few-steps error suggests besides a larger budget (train/loop.py)
        self.budget_advice = "fewer num_generations, batch_size or max_completion_length (a step samples them all)"
        self._slots: dict[int, Rollout] = {}
        self._calls = 0
        self._visits: dict[int, int] = {}
        self.rollouts = 0
        print(f"rl: {sum(len(b.rows) for b in self.train)} training prompts in {len(self.train)} batches of "
              f"{cfg.batch_size} x {self.g} completions, {len(self.val)} val prompts; method={cfg.method}, "
              f"rewards={', '.join(f'{n}x{w:g}' for n, w in zip(rewards.names, rewards.weights))}")

    def batches(self) -> list[PromptBatch]:
        return self.train

    @property
    def bare(self):
        return getattr(self.model, "module", self.model)  # inside a step the model may be DDP's wrapper

    # ------------------------------------------------------------ rollouts

    def _rollout_for(self, batch: PromptBatch) -> Rollout:
        """A fresh rollout of `batch`, or the one this accumulation slot uses for its
        `num_iterations` steps (TRL's reuse of a generation batch)."""
        slot = self._calls % self.cfg.grad_accum
        iteration = (self._calls // self.cfg.grad_accum) % self.cfg.num_iterations
        self._calls += 1
        if iteration == 0 or slot not in self._slots:
            self._slots[slot] = self.rollout(batch)
            return self._slots[slot]
        r = self._slots[slot]  # reused: this step sampled nothing
        batch.n_tokens, r.stats["time/rollout"] = r.n_tokens, torch.zeros((), device=self.device)
        return r

    def _sampling(self, batch: PromptBatch) -> Sampling:
        cfg = self.cfg
        # from the batch and how often it was sampled: the same prompts draw the same on any rank
        visits = self._visits[batch.index] = self._visits.get(batch.index, -1) + 1
        seed = cfg.seed + 100_003 * batch.index + 7919 * visits
        return Sampling(max_new_tokens=cfg.max_completion_length, greedy=False, temperature=cfg.temperature,
                        top_p=cfg.top_p, top_k=cfg.top_k, seed=seed)

    @torch.no_grad()
    def rollout(self, batch: PromptBatch) -> Rollout:
        cfg, t0 = self.cfg, time.time()
        was_training = self.bare.training
        prompts = [r["prompt"] for r in batch.rows]
        gens = generate_full(self.bare, self.tokenizer, prompts, self._sampling(batch),
                             batch_size=cfg.generate_batch_size or len(prompts) * self.g, n=self.g)
        self.bare.train(was_training)
        texts, finish = [g.text for g in gens], [g.finish_reason for g in gens]
        per_func = score(self.rewards, batch.rows, gens, self.g)
        completion_ids = [g.token_ids or [self.tokenizer.eos_token_id] for g in gens]  # an empty answer: score its end
        width = max(map(len, completion_ids))
        mask = torch.zeros(len(gens), width)
        for i, ids in enumerate(completion_ids):
            if not (cfg.mask_truncated_completions and finish[i] == "length"):
                mask[i, : len(ids)] = 1
        r = Rollout([render_prompt(self.tokenizer, p) for p in prompts], completion_ids, texts, finish,
                    per_func, self.rewards.total(per_func), mask.to(self.device))
        batch.n_tokens = r.n_tokens = sum(map(len, completion_ids)) + sum(map(len, r.prompt_ids))
        if cfg.num_iterations > 1 or (cfg.method == "rloo" and cfg.beta > 0):
            r.old_logps = self._logps(r, self.bare)
        if self.needs_ref:  # online DPO reads only each group's best and worst
            r.ref_logps = self._reference_logps(r, self._pair_rows(r) if cfg.method == "online-dpo" else None)
        self._advantages(r)
        r.stats = self._rollout_stats(r, time.time() - t0)
        self.rollouts += 1
        if dist.world().main and cfg.sample_every and (self.rollouts - 1) % cfg.sample_every == 0:
            self._write_samples(batch, r)
        return r

    def _packed(self, r: Rollout, rows: torch.Tensor | None = None):
        """The completions (all, or `rows`, in order) packed under their prompts."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        wanted = set(range(len(r.completion_ids)) if rows is None else rows.tolist())
        groups = [Encoded(p, [r.completion_ids[j] for j in range(i * self.g, (i + 1) * self.g) if j in wanted])
                  for i, p in enumerate(r.prompt_ids)]
        groups = [e for e in groups if e.answers]
        # One row per prompt: the prompt once, its G answers branching from it (G <= 2: the span
        # kernels; more: a dense mask). Measured on the built-in model, 4 prompts x 8 answers of 24
        # tokens: 6.5-7.0 s forward + backward against 17.7-19.0 s with a row (and a prompt copy) each.
        return pack_pairs(groups, share_prefix=True, pad_id=pad).to(self.device)

    def _logps(self, r: Rollout, model, entropy: bool = False, rows: torch.Tensor | None = None):
        """(B, T) log-probs of the completions (with their graph when `entropy`); with `rows`,
        only those run through the model and the others are filled from the rollout's old
        log-probs (zeros without them): the loss must not depend on them. The entropy is of the
        rows run."""
        logps, ent = forward_logps_entropy(model, self._packed(r, rows), r.mask.shape[1], entropy)
        if rows is not None:
            fill = r.old_logps if r.old_logps is not None else torch.zeros_like(r.mask, dtype=logps.dtype)
            logps = fill.index_put((rows,), logps)
        return (logps, ent) if entropy else logps.detach()

    def _reference_logps(self, r: Rollout, rows: torch.Tensor | None = None) -> torch.Tensor:
        if self.frozen is not None:
            return self._logps(r, self.frozen, rows=rows)
        with self.bare.disable_adapter():  # the LoRA base: the starting model
            return self._logps(r, self.bare, rows=rows)

    def _pair_rows(self, r: Rollout) -> torch.Tensor:
        chosen, rejected, _ = L.best_worst_pairs(r.rewards.to(self.device), self.g)
        return torch.unique(torch.cat([chosen, rejected]))  # sorted, as the packed order

    def _trained_rows(self, r: Rollout) -> torch.Tensor | None:
        """The completions whose log-probs can move the loss (None: all). A GRPO or RLOO
        completion with advantage exactly 0 (its group's rewards all equal) adds 0 to the loss
        and to the clip counts, so it skips the forward and backward, unless GRPO's β·KL reaches
        it; online DPO uses each group's best and worst only. The losses still normalise by every
        completion (r.mask), as TRL's do, so the loss and the gradient are unchanged."""
        if self.cfg.method == "online-dpo":
            rows = self._pair_rows(r)
        elif self.cfg.method == "grpo" and self.cfg.beta != 0:
            return None
        else:
            rows = torch.nonzero(r.advantages != 0).squeeze(1)
        if rows.numel() == 0:  # nothing to learn: one short row still gives the graph (and DDP its hooks)
            rows = torch.tensor([min(range(len(r.completion_ids)), key=lambda i: len(r.completion_ids[i]))],
                                device=r.mask.device)
        return None if rows.numel() == len(r.completion_ids) else rows

    def _advantages(self, r: Rollout) -> None:
        cfg = self.cfg
        if cfg.method == "grpo" and cfg.multi_objective_aggregation == "normalize_then_sum":
            weights = torch.tensor(self.rewards.weights, dtype=r.per_func.dtype)
            r.advantages, _ = L.gdpo_advantages(r.per_func.to(self.device), weights, self.g)
        elif cfg.method == "grpo":
            r.advantages, _ = L.grpo_advantages(r.rewards.to(self.device), self.g, cfg.scale_rewards)
        elif cfg.method == "rloo":
            rewards = r.rewards.to(self.device)
            if cfg.beta > 0:
                rewards, r.stats_kl = L.rloo_kl_rewards(rewards, r.old_logps, r.ref_logps, r.mask, cfg.beta)
            r.advantages, _ = L.rloo_advantages(rewards, self.g, cfg.normalize_advantages)

    def _rollout_stats(self, r: Rollout, seconds: float) -> dict:
        lengths = torch.tensor([float(len(ids)) for ids in r.completion_ids])
        _, zero_std = L.grpo_advantages(r.rewards, self.g, "group")
        stats = {"reward": torch.nanmean(r.rewards), "reward_std": L.nanstd(r.rewards),
                 "frac_reward_zero_std": zero_std.float().mean(),
                 "completions/mean_length": lengths.mean(), "completions/min_length": lengths.min(),
                 "completions/max_length": lengths.max(),
                 "completions/clipped_ratio": torch.tensor([f == "length" for f in r.finish]).float().mean(),
                 "time/rollout": seconds}
        for k, name in enumerate(self.rewards.names):
            stats[f"rewards/{name}/mean"] = torch.nanmean(r.per_func[:, k])
            stats[f"rewards/{name}/std"] = L.nanstd(r.per_func[:, k])
        return {k: torch.nan_to_num(torch.as_tensor(v, dtype=torch.float32)).to(self.device) for k, v in stats.items()}

    def _write_samples(self, batch: PromptBatch, r: Rollout) -> None:
        rows = []
        for i, row in enumerate(batch.rows[: self.cfg.sample_prompts]):
            done = slice(i * self.g, (i + 1) * self.g)
            rows.append({"rollout": self.rollouts, "prompt": row["prompt"], "completions": r.texts[done],
                         "finish_reason": r.finish[done], "reward": _floats(r.rewards[done]),
                         "rewards": {n: _floats(r.per_func[done, k]) for k, n in enumerate(self.rewards.names)}})
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with (self.log_dir / "rl_samples.jsonl").open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(x, ensure_ascii=False) + "\n" for x in rows)

    # ------------------------------------------------------------ the update

    def loss(self, batch: PromptBatch):
        r = self._rollout_for(batch)
        rows = self._trained_rows(r)
        logps, entropy = self._logps(r, self.model, entropy=True, rows=rows)
        loss, stats = getattr(self, "_" + self.cfg.method.replace("-", "_"))(r, logps)
        if entropy is not None:  # of the completions trained on
            mask = r.mask if rows is None else r.mask[rows]
            stats["entropy"] = (entropy * mask).sum() / mask.sum().clamp(min=1.0)
        if hasattr(r, "stats_kl"):
            stats["kl"] = r.stats_kl
        return loss, {**r.stats, **stats}

    def _grpo(self, r: Rollout, logps: torch.Tensor):
        cfg = self.cfg
        return L.grpo_loss(logps, r.advantages, r.mask, old_logps=r.old_logps, ref_logps=r.ref_logps,
                           loss_type=cfg.loss_type, epsilon_low=cfg.epsilon,
                           epsilon_high=cfg.epsilon_high or cfg.epsilon, beta=cfg.beta,
                           max_completion_length=cfg.max_completion_length,
                           bias_correction_kl=cfg.bias_correction_kl)

    def _rloo(self, r: Rollout, logps: torch.Tensor):
        cfg = self.cfg
        old = r.old_logps if r.old_logps is not None else logps.detach()
        return L.rloo_loss(logps, r.advantages, r.mask, old, cfg.epsilon, cfg.epsilon_high or cfg.epsilon)

    def _online_dpo(self, r: Rollout, logps: torch.Tensor):
        chosen, rejected, usable = L.best_worst_pairs(r.rewards.to(self.device), self.g)
        summed = (logps * r.mask).sum(-1)
        ref = (r.ref_logps * r.mask).sum(-1)
        pc, pr, rc, rr = summed[chosen], summed[rejected], ref[chosen], ref[rejected]
        loss, _ = L.online_dpo_loss(pc, pr, rc, rr, self.cfg.beta, usable)
        keep = usable if usable.any() else torch.ones_like(usable)
        stats = {k: v.detach() for k, v in dpo_stats(pc[keep], pr[keep], rc[keep], rr[keep], self.cfg.beta).items()}
        pairs = self._pair_rows(r)  # TRL's objective/kl: per sequence, over the completions paired
        stats["kl"] = ((logps.detach()[pairs] - r.ref_logps[pairs]) * r.mask[pairs]).sum(-1).mean()
        stats["pairs/usable"] = usable.float().mean()
        return loss, stats

    # ------------------------------------------------------------ eval and save

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy answers to the val prompts: the mean of each reward (and `val/reward`)."""
        if not self.val:
            return {}
        sampling = Sampling(max_new_tokens=self.cfg.max_completion_length, greedy=True, seed=self.cfg.seed)
        gens = generate_full(self.bare, self.tokenizer, [r["prompt"] for r in self.val], sampling,
                             batch_size=self.cfg.generate_batch_size or 32)
        per_func = score(self.rewards, self.val, gens, 1)
        out = {"val/reward": _mean(self.rewards.total(per_func))}
        out |= {f"val/rewards/{n}": _mean(per_func[:, k]) for k, n in enumerate(self.rewards.names)}
        return out

    def save(self, folder: Path, state_dict: dict | None = None) -> None:
        save_model(self.model, self.tokenizer, folder, state_dict)


def _floats(t: torch.Tensor) -> list:
    return [None if v != v else round(float(v), 4) for v in t.tolist()]


def _mean(t: torch.Tensor) -> float:
    v = torch.nanmean(t).item()
    return round(v, 6) if v == v else float("nan")


def check_rewards(rewards: RewardSet, rows: list[dict]) -> None:
    """Score the first prompt with two made-up answers before any model loads or file is written:
    a reward that raises, returns the wrong length or a non-number stops the run here, naming it.
    (llm-judge is left out: a request costs money and its failures are handled per answer.)"""
    probe = RewardSet([n for n in rewards.names if n != "llm-judge"],
                      [w for n, w in zip(rewards.names, rewards.weights) if n != "llm-judge"],
                      [f for n, f in zip(rewards.names, rewards.functions) if n != "llm-judge"])
    if probe.names:
        score(probe, rows[:1], [Generation("", 0, 0, "stop", []), Generation("0", 0, 1, "length", [15])], 2)


def rl(cfg: RLConfig) -> dict:
    """Train `cfg.model` (normally the run's SFT checkpoint) online on its own samples; returns
    the training summary."""
    rows = read_prompt_rows(cfg)  # bad rows stop here: before the model loads, before --out is touched
    if not rows[0]:
        raise ValueError(f"rl: no training prompts in {cfg.prompts}")
    names, weights = parse_names(cfg.rewards, cfg.reward_weights)
    device_guess = "cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu"
    rewards = RewardSet.build(names, weights, reward_context(cfg, device_guess))  # a user function imports here
    check_rewards(rewards, rows[0])
    p = prepare(cfg, "rl")
    task = RLTask(p.model, p.tokenizer, cfg, p.device, p.dtype, rows, rewards, p.log_dir)
    return fit(task, cfg, "rl", p.device, p.dtype, p.log_dir, p.marker)


__all__ = ["RLTask", "RewardError", "rl"]

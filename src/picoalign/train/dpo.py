"""`picoalign dpo`: preference optimisation (DPO, cDPO, IPO, hinge, robust) against a frozen reference,
and the methods beside it: ORPO and SimPO without a reference, KTO on unpaired examples (train/kto.py).

    picoalign dpo --data runs/demo/data --model runs/demo/checkpoints/sft --out runs/demo/checkpoints/dpo
    picoalign dpo ... --beta 0.1 --label_smoothing 0.1     # cDPO
    picoalign dpo ... --ipo                                # IPO
    picoalign dpo ... --loss simpo --beta 2 --simpo_gamma 1    # SimPO: no reference, no precompute
    picoalign dpo ... --model builtin:smollm2-135m-instruct --loss orpo   # ORPO: from the base, SFT included
    picoalign dpo ... --loss kto --train_file kto_train.jsonl  # KTO: {"prompt", "completion", "label"}

The starting model is the SFT checkpoint (an SFT adapter is merged into its base first); the
policy trains a fresh LoRA adapter on it (or all weights), and the SFT model is the frozen
reference (train/reference.py: `ReferenceCache`). By default the reference's log-probs are computed once before training and stored
with the run (`ref_logps.pt`), so no second model sits in memory (with `max_seconds` the precompute
takes at most half of it: the steps score the batches it left as they reach them, which for full
fine-tuning or a named reference keeps a frozen copy in memory); `reference: live` computes them
each step from the frozen weights (adapter disabled), `reference: PATH` from another checkpoint.
Each pair is one row, [prompt, chosen, rejected], with the prompt run once (prefix sharing).
ORPO and SimPO score answers by their mean log-prob per token and load, compute and store no
reference at all.
"""

from __future__ import annotations

from pathlib import Path

import torch

from picoalign.config import DPOConfig
from picoalign.data.formats import read_preferences
from picoalign.io import append_jsonl, read_jsonl_lenient
from picoalign.methods import METHODS
from picoalign.train import dist
from picoalign.train.attention import fit_prefix_sharing
from picoalign.train.batching import PackedBatch, pair_batches
from picoalign.train.diagnostics import displacement_warning
from picoalign.train.loop import fit
from picoalign.train.losses import dpo_stats, orpo_loss, orpo_odds_ratio_loss, simpo_loss
from picoalign.train.reference import ReferenceCache
from picoalign.train.scoring import batch_sequence_logps
from picoalign.train.stage import prepare, read_splits, save_model


def read_pair_splits(cfg: DPOConfig) -> tuple[list[dict], list[dict]]:
    """(train, val) pairs above `min_confidence`, read and checked (a bad row raises file:line)
    before a model loads."""
    return read_splits(cfg, read_preferences)


class PreferenceTask:
    """What every preference method's task shares (the loop's `Task`): its rows as batches, its
    frozen reference (a `ReferenceCache`; None for a method without one), its loss through
    `pair_loss` (each method's own), its saving. DPOTask and KTOTask differ in their rows, their
    batches and their `pair_loss` / `evaluate`."""

    def __init__(self, model, tokenizer, cfg: DPOConfig, device, dtype, rows: tuple[list[dict], list[dict]],
                 make_batches) -> None:
        cfg = fit_prefix_sharing(model, cfg)
        self.model, self.tokenizer, self.cfg, self.device, self.dtype = model, tokenizer, cfg, device, dtype
        self.method = METHODS[cfg.loss]
        self.loss_fn = self.method.function()  # with a reference: f(Δ, β, ε); without: f(model, batch, cfg)
        self.normalise = self.method.normalise
        self.train = make_batches(tokenizer, rows[0], cfg)
        val = make_batches(tokenizer, rows[1], cfg)
        self.val = val[: cfg.eval_batches] if cfg.eval_batches else val
        self.reference = ReferenceCache(cfg, device, dtype, self.normalise) if self.method.reference else None
        self.reference_forward = cfg.reference == "live" and self.reference is not None  # FLOPs count
        if self.reference is not None:
            self.setup_what = "the reference log-probs"
            self.budget_advice = "fewer pairs, or reference=live (scored as the steps go)"
            self.reference.attach(model, self.train, self.val)
            self.setup_seconds = self.reference.setup_seconds

    def _reference(self, batch: PackedBatch) -> torch.Tensor:
        return self.reference.logps(self.model, batch)

    def batches(self) -> list[PackedBatch]:
        return self.train

    def loss(self, batch: PackedBatch):
        loss, stats, _ = self.pair_loss(batch)
        return loss, stats  # tensors: the loop reads them once per logged step

    def save(self, folder: Path, state_dict: dict | None = None) -> None:
        save_model(self.model, self.tokenizer, folder, state_dict)


class DPOTask(PreferenceTask):
    """Preference pairs: DPO and its variants against the reference, ORPO and SimPO without one."""

    def __init__(self, model, tokenizer, cfg: DPOConfig, device, dtype,
                 rows: tuple[list[dict], list[dict]] | None = None) -> None:
        rows = rows or read_pair_splits(cfg)
        super().__init__(model, tokenizer, cfg, device, dtype, rows,
                         lambda tok, part, c: pair_batches(tok, part, c, c.prefix_sharing))
        cfg = self.cfg
        print(f"dpo: {len(rows[0])} training pairs in {len(self.train)} batches, {len(self.val)} val batches, "
              f"loss={cfg.loss} beta={cfg.beta} reference={cfg.reference if self.method.reference else 'none'}")

    def pair_loss(self, batch: PackedBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """(mean loss, TRL-style stats, Δ per pair) for one preference batch."""
        if not self.method.reference:
            return self.loss_fn(self.model, batch, self.cfg)
        summed, tokens = batch_sequence_logps(self.model, batch)
        policy = summed / batch.token_counts().to(summed.device) if self.normalise else summed
        ref = self._reference(batch).to(policy.device)
        pc, pr, rc, rr = policy[0::2], policy[1::2], ref[0::2], ref[1::2]
        delta = (pc - rc) - (pr - rr)
        loss = preference = self.loss_fn(delta, self.cfg.beta, self.cfg.label_smoothing).mean()
        nll = None
        if self.cfg.sft_weight > 0:  # mean NLL of the chosen answers' tokens
            chosen_tokens = (batch.seq_index % 2) == 0
            nll = -tokens[chosen_tokens].mean()
            loss = loss + self.cfg.sft_weight * nll
        if self.normalise:  # logged rewards and log-probs use summed log-probs, as TRL does
            ref_summed = ref * batch.token_counts().to(ref.device)
            pc, pr, rc, rr = summed[0::2], summed[1::2], ref_summed[0::2], ref_summed[1::2]
        stats = dpo_stats(pc, pr, rc, rr, self.cfg.beta)
        # the reference's log-probs beside the policy's: curves.png draws the pair, and a chosen
        # curve sinking under its reference is the warning of train/diagnostics.py
        stats.update({"logps/ref_chosen": rc.mean(), "logps/ref_rejected": rr.mean()})
        if nll is not None:  # `loss` is then the sum; log its two terms too
            stats.update({"loss/preference": preference.detach(), "loss/sft_nll": nll.detach()})
        return loss, stats, delta

    def evaluate(self) -> dict[str, float]:
        """Validation loss, preference accuracy (reward of chosen > rejected) and mean margin."""
        if not self.val:
            return {}
        loss_sum, margins = 0.0, []
        for batch in self.val:
            loss, _, delta = self.pair_loss(batch.to(self.device))
            loss_sum += loss.item() * len(delta)
            margins.append(self.cfg.beta * delta.float().cpu())
        m = torch.cat(margins)
        return {"val/loss": round(loss_sum / len(m), 6), "val/pref_acc": round((m > 0).float().mean().item(), 4),
                "val/margin": round(m.mean().item(), 4)}


def _mean_logps(model, batch: PackedBatch, beta: float):
    """What ORPO and SimPO score: ℓ, the policy's mean log-prob per answer token, of the chosen and
    the rejected answers; the NLL of all chosen-answer tokens; and TRL's reward metrics on ℓ."""
    summed, tokens = batch_sequence_logps(model, batch)
    mean = summed / batch.token_counts().to(summed.device)
    chosen, rejected = mean[0::2], mean[1::2]
    nll = -tokens[(batch.seq_index % 2) == 0].mean()  # over all chosen-answer tokens of the batch
    stats = dpo_stats(chosen, rejected, torch.zeros_like(chosen), torch.zeros_like(rejected), beta)
    return chosen, rejected, nll, {k: v.detach() for k, v in stats.items()}


def orpo_pair_loss(model, batch: PackedBatch, cfg: DPOConfig) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """ORPO on one pair batch, no reference: (mean loss, TRL's metrics, ℓ_w − ℓ_l per pair). As
    TRL, the logged rewards are β·ℓ and `logps/*` the means ℓ, plus `nll_loss`, `log_odds_ratio`
    (mean log σ of the log odds ratio) and `log_odds_chosen` (mean log odds ratio)."""
    chosen, rejected, nll, stats = _mean_logps(model, batch, cfg.beta)
    loss = orpo_loss(nll, chosen, rejected, cfg.beta)
    _, log_odds = orpo_odds_ratio_loss(chosen.detach(), rejected.detach())
    stats |= {"nll_loss": nll.detach(), "log_odds_ratio": torch.nn.functional.logsigmoid(log_odds).mean(),
              "log_odds_chosen": log_odds.mean()}
    return loss, stats, chosen - rejected


def simpo_pair_loss(model, batch: PackedBatch, cfg: DPOConfig) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """SimPO on one pair batch, no reference (with `sft_weight`, CPO's behaviour-cloning term, TRL's
    `cpo_alpha`): (mean loss, TRL's metrics, ℓ_w − ℓ_l per pair)."""
    chosen, rejected, nll, stats = _mean_logps(model, batch, cfg.beta)
    loss = preference = simpo_loss(chosen, rejected, cfg.beta, cfg.simpo_gamma, cfg.label_smoothing).mean()
    if cfg.sft_weight > 0:
        loss = loss + cfg.sft_weight * nll
        stats |= {"loss/preference": preference.detach(), "loss/sft_nll": nll.detach()}
    return loss, stats, chosen - rejected


def reference_free_loss(model, batch: PackedBatch, cfg: DPOConfig) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """A method without a reference (ORPO, SimPO: `cfg.loss`) on one pair batch."""
    return METHODS[cfg.loss].function()(model, batch, cfg)


def dpo(cfg: DPOConfig) -> dict:
    """Train `cfg.model` (the SFT checkpoint; for ORPO the base) on preference pairs; returns the
    summary. (KTO's unpaired rows: train/kto.py; `picoalign dpo` picks through train/preference.py.)"""
    if METHODS[cfg.loss].rows == "unpaired":
        raise ValueError(f"loss={cfg.loss} trains on unpaired rows: call picoalign.train.preference.train_preferences "
                         "(what `picoalign dpo` runs) or picoalign.train.kto.kto")
    rows = read_pair_splits(cfg)  # a bad row stops here: before the model loads, before --out is touched
    p = prepare(cfg, "dpo")
    task = DPOTask(p.model, p.tokenizer, cfg, p.device, p.dtype, rows)
    summary = fit(task, cfg, "dpo", p.device, p.dtype, p.log_dir, p.marker)
    warn_displacement(p.log_dir, "dpo")
    return summary


def warn_displacement(log_dir: Path | None, name: str) -> str | None:
    """Print (and return) the likelihood-displacement warning when the stage's log shows it."""
    if log_dir is None or not dist.world().main:
        return None
    log = Path(log_dir) / f"{name}.jsonl"
    warning = displacement_warning(read_jsonl_lenient(log))
    if warning:
        print(f"{name}: warning: {warning}")
        append_jsonl(log, {"kind": "warning", "message": warning})
    return warning

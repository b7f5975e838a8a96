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
reference. By default the reference's log-probs are computed once before training and stored
with the run (`ref_logps.pt`), so no second model sits in memory (with `max_seconds` the precompute
takes at most half of it: the steps score the batches it left as they reach them, which for full
fine-tuning or a named reference keeps a frozen copy in memory); `reference: live` computes them
each step from the frozen weights (adapter disabled), `reference: PATH` from another checkpoint.
Each pair is one row, [prompt, chosen, rejected], with the prompt run once (prefix sharing).
ORPO and SimPO score answers by their mean log-prob per token and load, compute and store no
reference at all.
"""

from __future__ import annotations

import copy
import hashlib
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from picoalign.config import REFERENCE_FREE, DPOConfig
from picoalign.data.formats import parse_columns, read_preferences
from picoalign.data.sources import data_split
from picoalign.io import append_jsonl, read_jsonl_lenient
from picoalign.models.load import load_model, read_marker
from picoalign.train import dist
from picoalign.train.attention import fit_prefix_sharing
from picoalign.train.batching import PackedBatch, forward_logps, pair_batches
from picoalign.train.diagnostics import displacement_warning
from picoalign.train.loop import autocast_for, batch_order, batches_used, fit
from picoalign.train.losses import (
    DPO_LOSSES,
    dpo_stats,
    orpo_loss,
    orpo_odds_ratio_loss,
    sequence_logps,
    simpo_loss,
)
from picoalign.train.stage import prepare, save_model


def batch_sequence_logps(model, batch: PackedBatch, normalise: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs per sequence, token-level log-probs) for one preference batch."""
    tokens = forward_logps(model, batch)
    seq = sequence_logps(tokens, batch.seq_index, batch.n_seqs)
    if normalise:  # IPO works on the mean log-prob per token of each answer
        seq = seq / batch.token_counts().to(seq.device)
    return seq, tokens


PRECOMPUTE_SHARE = 0.5  # of max_seconds: the most the reference precompute may take before step 1


@torch.no_grad()
def reference_logps(model, batches: list[PackedBatch], device, dtype, normalise: bool,
                    progress: bool = False, deadline: float | None = None, budget: float = 0.0) -> list[torch.Tensor]:
    """The reference's per-sequence log-probs for `batches` (the model in eval mode), in order.
    Past `deadline` (a `time.time()`) it stops, so the list may be shorter than `batches`; after
    the first batch it says how much of the time `budget` (max_seconds) the whole would take."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    out = []
    pairs = sum(b.n_seqs // 2 for b in batches)
    bar = tqdm(total=pairs, desc="dpo reference", unit="pair", disable=not progress, dynamic_ncols=True)
    t0 = time.time()
    with autocast_for(device, dtype), bar:
        for batch in batches:
            if deadline is not None and time.time() >= deadline:
                break
            seq, _ = batch_sequence_logps(model, batch.to(device), normalise)
            out.append(seq.float().cpu())
            bar.update(batch.n_seqs // 2)
            if budget > 0 and len(out) == 1 and len(batches) > 1:
                eta = (time.time() - t0) * pairs / (batch.n_seqs // 2)
                bar.write(f"dpo: the reference for {pairs} pairs takes about {eta:.0f}s, {eta / budget:.0%} of "
                          f"max_seconds={budget:g}" + (f"; it stops at {(deadline - t0) / budget:.0%} of it and the "
                                                      "steps score the rest as they reach them"
                                                      if deadline and eta > deadline - t0 else ""))
    model.train(was_training)
    return out


def _weights_stamp(spec: str) -> str:
    """Size and mtime of a local checkpoint's weight files (and its base's): changes when it is redone."""
    folder = Path(spec)
    if not folder.is_dir():
        return spec
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    stamp = "|".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    marker = read_marker(folder)
    return stamp + ("|" + _weights_stamp(marker["base_model"]) if marker.get("base_model") else "")


def _reference_stamp(cfg: DPOConfig, dtype: torch.dtype) -> str:
    """What stored reference log-probs depend on besides the batch: the reference weights and the
    dtype they ran in (a bf16 run keeps its frozen weights in bf16), the loss (IPO normalises)."""
    reference = cfg.model if cfg.reference in ("precompute", "live") else cfg.reference
    return f"{reference}|{_weights_stamp(reference)}|{dtype}|{cfg.loss}"


def batch_key(batch: PackedBatch) -> str:
    """A batch's content: its tokens, their layout and its targets (what its log-probs are of)."""
    h = hashlib.sha256()
    for t in (batch.input_ids, batch.position_ids, batch.labels, batch.seq_index):
        h.update(t.cpu().numpy().tobytes())
    return h.hexdigest()


def read_pair_splits(cfg: DPOConfig) -> tuple[list[dict], list[dict]]:
    """(train, val) pairs above `min_confidence`, read and checked (a bad row raises file:line)
    before a model loads."""
    columns = parse_columns(cfg.columns)
    train = read_preferences(data_split(cfg.data, cfg.train_file, main=True), cfg.min_confidence, columns=columns)
    val_path = data_split(cfg.data, cfg.val_file, main=False)
    val = read_preferences(val_path, cfg.min_confidence, allow_empty=True, columns=columns) if val_path else []
    return train, val


class DPOTask:
    def __init__(self, model, tokenizer, cfg: DPOConfig, device, dtype,
                 rows: tuple[list[dict], list[dict]] | None = None) -> None:
        cfg = fit_prefix_sharing(model, cfg)
        self.model, self.tokenizer, self.cfg, self.device, self.dtype = model, tokenizer, cfg, device, dtype
        self.loss_fn = DPO_LOSSES.get(cfg.loss)  # None for orpo / simpo: `reference_free_loss` instead
        self.normalise = cfg.loss == "ipo"
        train_rows, val_rows = rows or read_pair_splits(cfg)
        self.train = pair_batches(tokenizer, train_rows, cfg, cfg.prefix_sharing)
        val = pair_batches(tokenizer, val_rows, cfg, cfg.prefix_sharing)
        self.val = val[: cfg.eval_batches] if cfg.eval_batches else val
        self.live_ref = None
        self.reference_forward = cfg.reference == "live" and cfg.loss not in REFERENCE_FREE  # FLOPs count
        if cfg.loss not in REFERENCE_FREE:
            self._attach_reference()
        print(f"dpo: {len(train_rows)} training pairs in {len(self.train)} batches, {len(self.val)} val batches, "
              f"loss={cfg.loss} beta={cfg.beta} reference={'none' if cfg.loss in REFERENCE_FREE else cfg.reference}")

    def _attach_reference(self) -> None:
        """Reference log-probs for the batches this run will use: the training batches its step or
        epoch budget takes (in the loop's order) and the val batches, from `ref_logps.pt` where it
        has them (stored per batch content, so a longer run or another β reuses them), the rest
        computed now. With a time budget the precompute stops when its share of it
        (`PRECOMPUTE_SHARE`) is spent; a batch left without them (and every training batch of a
        run limited only by time) is scored when a step first reaches it, inside `max_seconds`."""
        cfg = self.cfg
        self.setup_seconds, self._scored = 0.0, {}
        self.setup_what = "the reference log-probs"
        self.budget_advice = "fewer pairs, or reference=live (scored as the steps go)"
        if cfg.reference == "live":
            if not cfg.lora.enabled:  # full fine-tuning: keep a frozen copy of the start
                self.live_ref = copy.deepcopy(self.model).eval().requires_grad_(False)
            return
        reach = batches_used(cfg, len(self.train), dist.world().size)
        # Only time limits the run: any batch may be reached. LoRA scores a batch on first use for
        # free (its adapter off), rather than precompute batches the run may never reach.
        on_first_use = reach is None and cfg.reference == "precompute" and cfg.lora.enabled
        if reach is None:
            reach = batch_order(len(self.train), 0, cfg.seed)
        needed = ([] if on_first_use else [self.train[i] for i in reach]) + self.val
        cache, stamp = Path(cfg.out) / "ref_logps.pt", _reference_stamp(cfg, self.dtype)
        saved = torch.load(cache, weights_only=False) if cache.exists() else {}
        known = saved.get("logps", {}) if saved.get("stamp") == stamp else {}
        keys = [batch_key(b) for b in needed]
        missing = [b for b, k in zip(needed, keys) if k not in known]
        if missing:
            t0 = time.time()
            self._deadline = t0 + PRECOMPUTE_SHARE * cfg.max_seconds if cfg.max_seconds > 0 and not cfg.resume else None
            logps = dist.gather_shards(self._compute_reference, missing)  # each rank its share (torchrun)
            self.setup_seconds = time.time() - t0
            known |= {batch_key(b): ref for b, ref in zip(missing, logps) if ref is not None}
            if dist.world().main:  # a cache keyed by its inputs: it leaves the folder's marker alone
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_suffix(".tmp")
                torch.save({"stamp": stamp, "logps": known}, tmp)
                tmp.replace(cache)
            self._report_precompute(missing, logps)
        for batch, key in zip(needed, keys):
            batch.ref_logps = known.get(key)
        later = sum(b.ref_logps is None for b in [self.train[i] for i in reach] + self.val)
        if later:
            self._keep_reference_for(later)

    def _report_precompute(self, missing: list[PackedBatch], logps: list) -> None:
        """How long the precompute took, and how much of the time budget that is (before step 1)."""
        pairs = sum(b.n_seqs // 2 for b, ref in zip(missing, logps) if ref is not None)
        took, budget = self.setup_seconds, self.cfg.max_seconds
        share = f", {took / budget:.0%} of max_seconds={budget:g}" if budget > 0 else ""
        print(f"dpo: reference log-probs of {pairs} pairs took {took:.0f}s{share}"
              + ("; the precompute stopped at its share of the budget" if pairs < sum(b.n_seqs // 2 for b in missing)
                 else ""))

    def _keep_reference_for(self, later: int) -> None:
        """A frozen reference for the batches scored when first used: the policy with its adapter
        off (LoRA, free), else a copy of the starting model or the named checkpoint (a second model
        in memory: what a budget too small to precompute costs)."""
        kept = ""
        if self.cfg.reference != "precompute":
            self.live_ref, _ = load_model(self.cfg.reference, self.device)
            self.live_ref.eval().requires_grad_(False)
            kept = f"; {self.cfg.reference} stays loaded to score them"
        elif not self.cfg.lora.enabled:
            self.live_ref = copy.deepcopy(self.model).eval().requires_grad_(False)
            kept = "; a frozen copy of the starting model scores them"
        print(f"dpo: {later} batches without precomputed reference log-probs (the budget may not reach them): "
              f"each is scored when a step first uses it{kept}")

    def _compute_reference(self, batches: list[PackedBatch]) -> list[torch.Tensor | None]:
        """Reference log-probs of `batches`, None for those the precompute's deadline left out."""
        pairs = sum(b.n_seqs // 2 for b in batches)
        deadline = getattr(self, "_deadline", None)
        print(f"dpo: precomputing reference log-probs for {pairs} pairs ({len(batches)} batches)"
              + (f", for at most {PRECOMPUTE_SHARE:.0%} of max_seconds={self.cfg.max_seconds:g}" if deadline else ""))
        show = self.cfg.progress and dist.world().main
        if self.cfg.reference not in ("precompute", "live"):
            ref_model, _ = load_model(self.cfg.reference, self.device)
            logps = reference_logps(ref_model, batches, self.device, self.dtype, self.normalise, show, deadline,
                                    self.cfg.max_seconds)
            del ref_model
        else:
            adapter_off = self.model.disable_adapter() if self.cfg.lora.enabled else nullcontext()
            with adapter_off:  # a fresh adapter changes nothing yet; off makes the intent plain
                logps = reference_logps(self.model, batches, self.device, self.dtype, self.normalise, show,
                                        deadline, self.cfg.max_seconds)
        return logps + [None] * (len(batches) - len(logps))

    def batches(self) -> list[PackedBatch]:
        return self.train

    def _reference(self, batch: PackedBatch) -> torch.Tensor:
        if batch.ref_logps is not None:
            return batch.ref_logps
        key = None if self.cfg.reference == "live" else batch_key(batch)
        if key in self._scored:
            return self._scored[key]
        bare = getattr(self.model, "module", self.model)  # inside a step the model may be DDP's wrapper
        with torch.no_grad():
            if self.live_ref is not None:
                ref = batch_sequence_logps(self.live_ref, batch, self.normalise)[0]
            else:
                with bare.disable_adapter() if self.cfg.lora.enabled else nullcontext():
                    ref = batch_sequence_logps(bare, batch, self.normalise)[0]
        if key is not None:  # the frozen reference scores a batch once
            self._scored[key] = ref.detach()
        return ref

    def pair_loss(self, batch: PackedBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """(mean loss, TRL-style stats, Δ per pair) for one preference batch."""
        if self.cfg.loss in REFERENCE_FREE:
            return reference_free_loss(self.model, batch, self.cfg)
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

    def loss(self, batch: PackedBatch):
        loss, stats, _ = self.pair_loss(batch)
        return loss, stats  # tensors: the loop reads them once per logged step

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

    def save(self, folder: Path, state_dict: dict | None = None) -> None:
        save_model(self.model, self.tokenizer, folder, state_dict)


def reference_free_loss(model, batch: PackedBatch, cfg: DPOConfig) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """ORPO or SimPO on one pair batch: (mean loss, TRL's metrics, ℓ_w − ℓ_l per pair), where ℓ is
    the policy's mean log-prob per answer token; no reference. As TRL, the logged rewards are β·ℓ
    and `logps/*` the means ℓ; ORPO adds `nll_loss`, `log_odds_ratio` (mean log σ of the log odds
    ratio) and `log_odds_chosen` (mean log odds ratio)."""
    summed, tokens = batch_sequence_logps(model, batch)
    mean = summed / batch.token_counts().to(summed.device)
    chosen, rejected = mean[0::2], mean[1::2]
    nll = -tokens[(batch.seq_index % 2) == 0].mean()  # over all chosen-answer tokens of the batch
    stats = dpo_stats(chosen, rejected, torch.zeros_like(chosen), torch.zeros_like(rejected), cfg.beta)
    stats = {k: v.detach() for k, v in stats.items()}
    if cfg.loss == "orpo":
        loss = orpo_loss(nll, chosen, rejected, cfg.beta)
        _, log_odds = orpo_odds_ratio_loss(chosen.detach(), rejected.detach())
        stats |= {"nll_loss": nll.detach(), "log_odds_ratio": torch.nn.functional.logsigmoid(log_odds).mean(),
                  "log_odds_chosen": log_odds.mean()}
        return loss, stats, chosen - rejected
    loss = preference = simpo_loss(chosen, rejected, cfg.beta, cfg.simpo_gamma, cfg.label_smoothing).mean()
    if cfg.sft_weight > 0:  # CPO's behaviour-cloning term (TRL `cpo_alpha`)
        loss = loss + cfg.sft_weight * nll
        stats |= {"loss/preference": preference.detach(), "loss/sft_nll": nll.detach()}
    return loss, stats, chosen - rejected


def dpo(cfg: DPOConfig) -> dict:
    """Train `cfg.model` (the SFT checkpoint; for ORPO the base) on preference pairs; returns the
    summary. (KTO's unpaired rows: train/kto.py; `picoalign dpo` picks through train/preference.py.)"""
    if cfg.loss == "kto":
        raise ValueError("loss=kto trains on unpaired rows: call picoalign.train.preference.train_preferences "
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

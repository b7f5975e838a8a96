"""`picoalign dpo`: preference optimisation (DPO, cDPO, IPO, hinge, robust) against a frozen reference,
and the methods beside it: ORPO and SimPO without a reference, KTO on unpaired examples (`KTOTask`
below; its data and batches in train/kto.py).

    picoalign dpo --data runs/demo/data --model runs/demo/checkpoints/sft --out runs/demo/checkpoints/dpo
    picoalign dpo ... --beta 0.1 --label_smoothing 0.1     # cDPO
    picoalign dpo ... --ipo                                # IPO
    picoalign dpo ... --loss simpo --beta 2 --simpo_gamma 1    # SimPO: no reference, no precompute
    picoalign dpo ... --model builtin:smollm2-135m-instruct --loss orpo   # ORPO: from the base, SFT included
    picoalign dpo ... --loss kto --train_file kto_train.jsonl  # KTO: {"prompt", "completion", "label"}

The starting model is the SFT checkpoint (an SFT adapter is merged into its base first); the
policy trains a fresh LoRA adapter on it (or all weights), and the SFT model is the frozen
reference. By default the reference's log-probs are computed once before training and stored
with the run (`ref_logps.pt`), so no second model sits in memory; `reference: live` computes them
each step from the frozen weights (adapter disabled), `reference: PATH` from another checkpoint.
Each pair is one row, [prompt, chosen, rejected], with the prompt run once (prefix sharing).
ORPO and SimPO score answers by their mean log-prob per token and load, compute and store no
reference at all.
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch

from picoalign.config import REFERENCE_FREE, DPOConfig
from picoalign.data.formats import read_preferences
from picoalign.models.load import load_model, read_marker
from picoalign.train import dist
from picoalign.train.batching import PackedBatch, forward_logps, pair_batches
from picoalign.train.kto import read_unpaired_splits, unpaired_batches
from picoalign.train.loop import autocast_for, fit
from picoalign.train.losses import (
    DPO_LOSSES,
    dpo_stats,
    kto_loss,
    kto_reference_point,
    kto_stats,
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


@torch.no_grad()
def reference_logps(model, batches: list[PackedBatch], device, dtype, normalise: bool,
                    progress: bool = False) -> list[torch.Tensor]:
    """The reference's per-sequence log-probs for every batch (the model in eval mode)."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    out = []
    bar = tqdm(total=sum(b.n_seqs // 2 for b in batches), desc="dpo reference", unit="pair",
               disable=not progress, dynamic_ncols=True)
    with autocast_for(device, dtype), bar:
        for batch in batches:
            seq, _ = batch_sequence_logps(model, batch.to(device), normalise)
            out.append(seq.float().cpu())
            bar.update(batch.n_seqs // 2)
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


def _fingerprint(batches: list[PackedBatch], cfg: DPOConfig, dtype: torch.dtype) -> str:
    """What the stored reference log-probs depend on: reference weights and the dtype they ran in
    (a bf16 run keeps its frozen weights in bf16), loss, the exact batches."""
    reference = cfg.model if cfg.reference in ("precompute", "live") else cfg.reference
    h = hashlib.sha256(f"{reference}|{_weights_stamp(reference)}|{dtype}|{cfg.loss}|{cfg.max_length}|"
                       f"{cfg.batch_size}".encode())
    for b in batches:
        h.update(b.input_ids.numpy().tobytes())
    return h.hexdigest()


def read_pair_splits(cfg: DPOConfig) -> tuple[list[dict], list[dict]]:
    """(train, val) pairs above `min_confidence`, read and checked (a bad row raises file:line)
    before a model loads."""
    data = Path(cfg.data)
    train = read_preferences(data / cfg.train_file, min_confidence=cfg.min_confidence)
    val_path = data / cfg.val_file
    val = read_preferences(val_path, min_confidence=cfg.min_confidence, allow_empty=True) if val_path.exists() else []
    return train, val


class DPOTask:
    def __init__(self, model, tokenizer, cfg: DPOConfig, device, dtype,
                 rows: tuple[list[dict], list[dict]] | None = None) -> None:
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
        cfg, batches = self.cfg, self.train + self.val
        if cfg.reference == "live":
            if not cfg.lora.enabled:  # full fine-tuning: keep a frozen copy of the start
                self.live_ref = copy.deepcopy(self.model).eval().requires_grad_(False)
            return
        cache = Path(cfg.out) / "ref_logps.pt"
        key = _fingerprint(batches, cfg, self.dtype)
        if cache.exists() and (saved := torch.load(cache, weights_only=False)).get("key") == key:
            logps = saved["logps"]
        else:
            logps = dist.gather_shards(self._compute_reference, batches)  # each rank its share (torchrun)
            if dist.world().main:  # a cache keyed by its inputs: it leaves the folder's marker alone
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_suffix(".tmp")
                torch.save({"key": key, "logps": logps}, tmp)
                tmp.replace(cache)
        for batch, ref in zip(batches, logps):
            batch.ref_logps = ref

    def _compute_reference(self, batches: list[PackedBatch]) -> list[torch.Tensor]:
        pairs = sum(b.n_seqs // 2 for b in batches)
        print(f"dpo: precomputing reference log-probs for {pairs} pairs ({len(batches)} batches)")
        if self.cfg.reference not in ("precompute", "live"):
            ref_model, _ = load_model(self.cfg.reference, self.device)
            logps = reference_logps(ref_model, batches, self.device, self.dtype, self.normalise,
                                   self.cfg.progress and dist.world().main)
            del ref_model
            return logps
        adapter_off = self.model.disable_adapter() if self.cfg.lora.enabled else nullcontext()
        with adapter_off:  # a fresh adapter changes nothing yet; off makes the intent plain
            return reference_logps(self.model, batches, self.device, self.dtype, self.normalise,
                                   self.cfg.progress and dist.world().main)

    def batches(self) -> list[PackedBatch]:
        return self.train

    def _reference(self, batch: PackedBatch) -> torch.Tensor:
        if batch.ref_logps is not None:
            return batch.ref_logps
        with torch.no_grad():
            if self.live_ref is not None:
                return batch_sequence_logps(self.live_ref, batch, self.normalise)[0]
            with self.model.disable_adapter():
                return batch_sequence_logps(self.model, batch, self.normalise)[0]

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
    """Train `cfg.model` (the SFT checkpoint; for ORPO the base) on preferences; returns the summary."""
    if cfg.loss == "kto":
        return kto(cfg)
    rows = read_pair_splits(cfg)  # a bad row stops here: before the model loads, before --out is touched
    p = prepare(cfg, "dpo")
    task = DPOTask(p.model, p.tokenizer, cfg, p.device, p.dtype, rows)
    return fit(task, cfg, "dpo", p.device, p.dtype, p.log_dir, p.marker)


# ---------------------------------------------------------------- KTO (its data and batches: train/kto.py)


class KTOTask(DPOTask):
    """DPO's task with unpaired examples: its reference handling, its saving; its own batches and loss."""

    def __init__(self, model, tokenizer, cfg: DPOConfig, device, dtype,
                 rows: tuple[list[dict], list[dict]] | None = None) -> None:
        self.model, self.tokenizer, self.cfg, self.device, self.dtype = model, tokenizer, cfg, device, dtype
        self.loss_fn, self.normalise = None, False
        train_rows, val_rows = rows or read_unpaired_splits(cfg)
        self.train = unpaired_batches(tokenizer, train_rows, cfg)
        val = unpaired_batches(tokenizer, val_rows, cfg)
        self.val = val[: cfg.eval_batches] if cfg.eval_batches else val
        self.live_ref = None
        self._attach_reference()
        good = sum(r["label"] for r in train_rows)
        bad = len(train_rows) - good
        ratio = cfg.desirable_weight * good / max(cfg.undesirable_weight * bad, 1e-9)
        if good and bad and not 1.0 <= ratio <= 4 / 3:  # the range of the KTO paper's eq. 8, as TRL warns
            warnings.warn(f"kto: {good} desirable and {bad} undesirable examples with desirable_weight="
                          f"{cfg.desirable_weight} and undesirable_weight={cfg.undesirable_weight}: "
                          f"λ_D·n_D / (λ_U·n_U) = {ratio:.2f}, the paper recommends 1 to 1.33 "
                          f"(e.g. desirable_weight={bad * cfg.undesirable_weight / good:.2f})", stacklevel=2)
        print(f"kto: {len(train_rows)} training examples ({good} desirable, {len(train_rows) - good} undesirable) "
              f"in {len(self.train)} batches, {len(self.val)} val batches, beta={cfg.beta} "
              f"weights D={cfg.desirable_weight} U={cfg.undesirable_weight} reference={cfg.reference}")

    def pair_loss(self, batch: PackedBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """(mean loss, TRL's KTO metrics, β·r per example) for one unpaired batch."""
        policy, _ = batch_sequence_logps(self.model, batch)
        ref = self._reference(batch).to(policy.device)
        desirable = batch.desirable.to(policy.device)
        kl = kto_reference_point(policy[1::2], ref[1::2])
        losses = kto_loss(policy[0::2], ref[0::2], desirable, kl, self.cfg.beta,
                          self.cfg.desirable_weight, self.cfg.undesirable_weight)
        stats = {k: v.detach() for k, v in kto_stats(policy[0::2], ref[0::2], desirable, kl, self.cfg.beta).items()}
        return losses.mean(), stats, self.cfg.beta * (policy[0::2] - ref[0::2]).detach()

    def evaluate(self) -> dict[str, float]:
        """Validation loss, the share of answers whose reward has their label's sign, and the reward
        margin (mean reward of the desirable answers minus that of the undesirable ones)."""
        if not self.val:
            return {}
        loss_sum, rewards, labels = 0.0, [], []
        for batch in self.val:
            loss, _, reward = self.pair_loss(batch.to(self.device))
            loss_sum += loss.item() * len(reward)
            rewards.append(reward.float().cpu())
            labels.append(batch.desirable.cpu())
        r, good = torch.cat(rewards), torch.cat(labels)
        out = {"val/loss": round(loss_sum / len(r), 6), "val/reward_acc": round(((r > 0) == good).float().mean().item(), 4)}
        if good.any() and (~good).any():
            out["val/margin"] = round((r[good].mean() - r[~good].mean()).item(), 4)
        return out


def kto(cfg: DPOConfig) -> dict:
    """Train `cfg.model` with KTO on unpaired examples (or split pairs); returns the training summary."""
    rows = read_unpaired_splits(cfg)  # a bad row stops here: before the model loads, before --out is touched
    p = prepare(cfg, "dpo")
    task = KTOTask(p.model, p.tokenizer, cfg, p.device, p.dtype, rows)
    return fit(task, cfg, "dpo", p.device, p.dtype, p.log_dir, p.marker)

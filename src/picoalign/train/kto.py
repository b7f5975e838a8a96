"""`picoalign dpo --loss kto`: KTO (Ethayarajh et al. 2024) on unpaired thumbs-up / thumbs-down answers.

    picoalign dpo --loss kto --data runs/demo/data --model runs/demo/checkpoints/sft --train_file kto_train.jsonl
    picoalign dpo --loss kto ...                  # on dpo_train.jsonl: each pair becomes two rows

Rows are `{"prompt", "completion", "label": true|false}` (TRL's unpaired format); a preference
pair is split into its chosen answer (true) and its rejected one (false). Each example is one
row [prompt, its answer, a mismatched answer]: the mismatched answer is another example's of the
same micro-batch (the one before it with a different prompt), and the mean log-ratio of those
mismatched pairs is KTO's reference point z₀, the policy's KL from the reference. The reference
log-probs of both answers are precomputed as in DPO (`reference: live | PATH` work the same).
Under torchrun each process estimates z₀ from its own micro-batch (TRL averages it over them).
"""

from __future__ import annotations

import warnings

import torch

from picoalign.config import DPOConfig
from picoalign.data.formats import read_unpaired
from picoalign.train.batching import Encoded, PackedBatch, chunks, encode, pack_pairs
from picoalign.train.dpo import PreferenceTask
from picoalign.train.loop import fit
from picoalign.train.losses import kto_reference_point, kto_stats
from picoalign.train.scoring import batch_sequence_logps
from picoalign.train.stage import prepare, read_splits


def read_unpaired_splits(cfg: DPOConfig) -> tuple[list[dict], list[dict]]:
    """(train, val) unpaired rows, read and checked (a bad row raises file:line) before a model loads."""
    return read_splits(cfg, read_unpaired)


def mismatched(prompts: list, i: int) -> int:
    """The example whose answer is example i's mismatched answer: the nearest one before it (cyclically)
    with a different prompt, so a split pair's two answers never stand in for each other; i − 1
    when every prompt is the same. By hand: prompts [a, a, b] → 0: 2, 1: 2, 2: 1."""
    n = len(prompts)
    for step in range(1, n):
        if prompts[(i - step) % n] != prompts[i]:
            return (i - step) % n
    return (i - 1) % n


def spread_labels(rows: list[dict], lengths: list[int]) -> list[dict]:
    """The rows in an order whose every stretch holds both kinds in their overall proportion, each
    kind by length: row i of a kind of n sits at (i + ½)/n. So a micro-batch has desirable and
    undesirable answers whenever the data has enough of both (KTO's metrics of a kind a batch
    lacks are NaN), and similar lengths. By hand: desirable lengths [5, 1], undesirable [3] →
    positions ¾, ¼ and ½ → [desirable 1, undesirable 3, desirable 5]."""
    keyed = []
    for label in (False, True):
        kind = sorted((n, i) for i, n in enumerate(lengths) if rows[i]["label"] == label)
        keyed += [((rank + 0.5) / len(kind), label, i) for rank, (_, i) in enumerate(kind)]
    return [rows[i] for _, _, i in sorted(keyed)]


def unpaired_batches(tokenizer, rows: list[dict], cfg) -> list[PackedBatch]:
    """KTO micro-batches of `batch_size` examples (`spread_labels` order): sequence 2i is example i's
    answer, 2i+1 its mismatched answer (`mismatched`); `desirable` holds the labels."""
    alone = [(encode(tokenizer, r["prompt"], [r["completion"]], cfg.max_length), r) for r in rows]
    kept = [(e, r) for e, r in alone if e is not None]
    ordered = spread_labels([r for _, r in kept], [len(e.prompt) + len(e.answers[0]) for e, _ in kept])
    batches = []
    for group in chunks(ordered, cfg.batch_size):
        prompts = [r["prompt"] for r in group]
        encoded = [encode(tokenizer, r["prompt"], [r["completion"], group[mismatched(prompts, i)]["completion"]],
                          cfg.max_length) for i, r in enumerate(group)]
        batches.append(kto_batch(encoded, [r["label"] for r in group], cfg.prefix_sharing, tokenizer.pad_token_id))
    return batches


def kto_batch(encoded: list[Encoded], labels: list[bool], share_prefix: bool, pad_id: int) -> PackedBatch:
    """One KTO micro-batch from encoded [answer, mismatched answer] examples and their labels."""
    batch = pack_pairs(encoded, share_prefix, pad_id)
    batch.desirable = torch.tensor(labels, dtype=torch.bool)
    return batch


class KTOTask(PreferenceTask):
    """Unpaired examples against the reference: KTO's batches, its loss and its validation metrics."""

    def __init__(self, model, tokenizer, cfg: DPOConfig, device, dtype,
                 rows: tuple[list[dict], list[dict]] | None = None) -> None:
        train_rows, val_rows = rows = rows or read_unpaired_splits(cfg)
        super().__init__(model, tokenizer, cfg, device, dtype, rows, unpaired_batches)
        cfg = self.cfg
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
        losses = self.loss_fn(policy[0::2], ref[0::2], desirable, kl, self.cfg.beta,
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

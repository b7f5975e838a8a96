"""A preference method's frozen reference: its per-sequence log-probs, cached by batch content.

    ref = ReferenceCache(cfg, device, dtype, normalise=False)
    ref.attach(policy, train_batches, val_batches)   # from ref_logps.pt, the rest computed now
    ref.logps(policy, batch)                          # a batch's reference log-probs

By default the reference's log-probs are computed once before training and stored with the run
(`ref_logps.pt`, keyed by each batch's content and stamped with the reference's weights, so a
longer run or another β reuses them). With `max_seconds` the precompute takes at most
`PRECOMPUTE_SHARE` of it: the steps score the batches it left as they reach them. `reference:
live` scores each batch every step from the frozen weights (the policy's adapter off, or a
frozen copy under full fine-tuning), `reference: PATH` from another checkpoint. DPO and KTO
(train/dpo.py, train/kto.py) hold one of these; a method without a reference holds none.
"""

from __future__ import annotations

import copy
import hashlib
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from picoalign.config import DPOConfig
from picoalign.models.load import load_model, read_marker
from picoalign.train import dist
from picoalign.train.batching import PackedBatch
from picoalign.train.loop import autocast_for, batch_order, batches_used
from picoalign.train.scoring import batch_sequence_logps

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


class ReferenceCache:
    """The frozen reference of one preference run: where its log-probs come from (the batches'
    stored `ref_logps`, a batch scored once when first used, or a live forward) and what that cost
    before step 1 (`setup_seconds`, which the loop counts against `max_seconds`)."""

    def __init__(self, cfg: DPOConfig, device, dtype, normalise: bool = False) -> None:
        self.cfg, self.device, self.dtype, self.normalise = cfg, device, dtype, normalise
        self.live = None  # a frozen model scoring batches as steps reach them (None: the policy, adapter off)
        self.scored: dict[str, torch.Tensor] = {}  # batches scored when first used, by content
        self.setup_seconds = 0.0
        self._deadline: float | None = None

    def attach(self, policy, train: list[PackedBatch], val: list[PackedBatch]) -> None:
        """Reference log-probs for the batches this run will use: the training batches its step or
        epoch budget takes (in the loop's order) and the val batches, from `ref_logps.pt` where it
        has them, the rest computed now. With a time budget the precompute stops when its share of
        it is spent; a batch left without them (and every training batch of a run limited only by
        time) is scored when a step first reaches it, inside `max_seconds`."""
        cfg = self.cfg
        if cfg.reference == "live":
            if not cfg.lora.enabled:  # full fine-tuning: keep a frozen copy of the start
                self.live = copy.deepcopy(policy).eval().requires_grad_(False)
            return
        reach = batches_used(cfg, len(train), dist.world().size)
        # Only time limits the run: any batch may be reached. LoRA scores a batch on first use for
        # free (its adapter off), rather than precompute batches the run may never reach.
        on_first_use = reach is None and cfg.reference == "precompute" and cfg.lora.enabled
        if reach is None:
            reach = batch_order(len(train), 0, cfg.seed)
        needed = ([] if on_first_use else [train[i] for i in reach]) + val
        known = self._precompute(policy, needed)
        for batch in needed:
            batch.ref_logps = known.get(batch_key(batch))
        later = sum(b.ref_logps is None for b in [train[i] for i in reach] + val)
        if later:
            self._keep_reference_for(policy, later)

    def _precompute(self, policy, needed: list[PackedBatch]) -> dict[str, torch.Tensor]:
        """The stored log-probs of `needed` by batch key, those missing computed (each rank its
        share under torchrun) and the file rewritten; a cache keyed by its inputs, so it leaves
        the folder's marker alone."""
        cache, stamp = Path(self.cfg.out) / "ref_logps.pt", _reference_stamp(self.cfg, self.dtype)
        saved = torch.load(cache, weights_only=False) if cache.exists() else {}
        known = saved.get("logps", {}) if saved.get("stamp") == stamp else {}
        missing = [b for b in needed if batch_key(b) not in known]
        if not missing:
            return known
        t0 = time.time()
        budget = self.cfg.max_seconds
        self._deadline = t0 + PRECOMPUTE_SHARE * budget if budget > 0 and not self.cfg.resume else None
        logps = dist.gather_shards(lambda batches: self.compute(policy, batches), missing)
        self.setup_seconds = time.time() - t0
        known |= {batch_key(b): ref for b, ref in zip(missing, logps) if ref is not None}
        if dist.world().main:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            torch.save({"stamp": stamp, "logps": known}, tmp)
            tmp.replace(cache)
        self._report_precompute(missing, logps)
        return known

    def _report_precompute(self, missing: list[PackedBatch], logps: list) -> None:
        """How long the precompute took, and how much of the time budget that is (before step 1)."""
        pairs = sum(b.n_seqs // 2 for b, ref in zip(missing, logps) if ref is not None)
        took, budget = self.setup_seconds, self.cfg.max_seconds
        share = f", {took / budget:.0%} of max_seconds={budget:g}" if budget > 0 else ""
        print(f"dpo: reference log-probs of {pairs} pairs took {took:.0f}s{share}"
              + ("; the precompute stopped at its share of the budget" if pairs < sum(b.n_seqs // 2 for b in missing)
                 else ""))

    def _keep_reference_for(self, policy, later: int) -> None:
        """A frozen reference for the batches scored when first used: the policy with its adapter
        off (LoRA, free), else a copy of the starting model or the named checkpoint (a second model
        in memory: what a budget too small to precompute costs)."""
        kept = ""
        if self.cfg.reference != "precompute":
            self.live, _ = load_model(self.cfg.reference, self.device)
            self.live.eval().requires_grad_(False)
            kept = f"; {self.cfg.reference} stays loaded to score them"
        elif not self.cfg.lora.enabled:
            self.live = copy.deepcopy(policy).eval().requires_grad_(False)
            kept = "; a frozen copy of the starting model scores them"
        print(f"dpo: {later} batches without precomputed reference log-probs (the budget may not reach them): "
              f"each is scored when a step first uses it{kept}")

    def compute(self, policy, batches: list[PackedBatch]) -> list[torch.Tensor | None]:
        """Reference log-probs of `batches`, None for those the precompute's deadline left out."""
        cfg, deadline = self.cfg, self._deadline
        pairs = sum(b.n_seqs // 2 for b in batches)
        print(f"dpo: precomputing reference log-probs for {pairs} pairs ({len(batches)} batches)"
              + (f", for at most {PRECOMPUTE_SHARE:.0%} of max_seconds={cfg.max_seconds:g}" if deadline else ""))
        show = cfg.progress and dist.world().main
        if cfg.reference not in ("precompute", "live"):
            ref_model, _ = load_model(cfg.reference, self.device)
            logps = reference_logps(ref_model, batches, self.device, self.dtype, self.normalise, show, deadline,
                                    cfg.max_seconds)
            del ref_model
        else:
            adapter_off = policy.disable_adapter() if cfg.lora.enabled else nullcontext()
            with adapter_off:  # a fresh adapter changes nothing yet; off makes the intent plain
                logps = reference_logps(policy, batches, self.device, self.dtype, self.normalise, show,
                                        deadline, cfg.max_seconds)
        return logps + [None] * (len(batches) - len(logps))

    def logps(self, policy, batch: PackedBatch) -> torch.Tensor:
        """`batch`'s reference log-probs: stored, scored before, or scored now (by the frozen
        model, or the policy with its adapter off) and kept unless the reference is live."""
        if batch.ref_logps is not None:
            return batch.ref_logps
        key = None if self.cfg.reference == "live" else batch_key(batch)
        if key in self.scored:
            return self.scored[key]
        bare = dist.bare(policy)  # inside a step, under DDP, the policy is the wrapper: no sync here
        with torch.no_grad():
            if self.live is not None:
                ref = batch_sequence_logps(self.live, batch, self.normalise)[0]
            else:
                with bare.disable_adapter() if self.cfg.lora.enabled else nullcontext():
                    ref = batch_sequence_logps(bare, batch, self.normalise)[0]
        if key is not None:  # the frozen reference scores a batch once
            self.scored[key] = ref.detach()
        return ref

#!/usr/bin/env bash
# ORPO, SimPO and KTO on the built-in model, each a few steps: every run must finish, its
# validation objective (val/loss of the dpo stage) must fall from step 0 to the last eval, and
# the report must name the method. Several minutes per run on 2 idle CPU cores.
#
#   bash bench/methods_check.sh [RUNS_DIR] [orpo] [simpo] [kto] [summary]   # default: all, in turn
#
# The three runs are independent: on a machine with cores to spare, start one per method in
# parallel (same RUNS_DIR), then `bash bench/methods_check.sh RUNS_DIR summary`.
set -euo pipefail
RUNS=${1:-/tmp/picoalign-methods}
shift || true
WHAT=${*:-orpo simpo kto summary}
SMALL=(--set runs_dir="$RUNS"
       --set data.n_sft_train=24 --set data.n_sft_val=4 --set data.n_sft_test=4
       --set data.n_dpo_train=12 --set data.n_dpo_val=4 --set data.n_dpo_test=4
       --set sft.max_steps=3 --set sft.eval_every=0 --set sft.max_seconds=0 --set sft.max_length=256
       --set dpo.max_steps=6 --set dpo.eval_every=3 --set dpo.eval_batches=1 --set dpo.max_seconds=0
       --set dpo.max_length=512 --set sft.mlflow=false --set dpo.mlflow=false
       --set eval.n_samples=2 --set eval.max_new_tokens=8 --set eval.max_pairs=2 --set eval.max_sft_examples=2
       --set eval.max_length=512)  # dpo, eval: 512, or the cut story answers are the same tokens

for what in $WHAT; do
  case $what in
    orpo)   # one stage from the base model in place of SFT + DPO (λ = beta)
      picoalign run --tag orpo "${SMALL[@]}" --set run.method=orpo --set dpo.beta=0.1 ;;
    simpo)  # SFT, then SimPO (no reference): β = 2, γ = 1 as the paper's settings; no extra NLL
      picoalign run --tag simpo "${SMALL[@]}" --set dpo.loss=simpo --set dpo.beta=2 --set dpo.simpo_gamma=1 \
          --set dpo.sft_weight=0 ;;
    kto)    # KTO on unpaired rows: the chosen answers of the even pairs, the rejected of the odd ones
      picoalign run --tag kto "${SMALL[@]}" --set run.stages=data
      python - "$RUNS/kto/data" <<'PY'
import json, sys
from pathlib import Path
data = Path(sys.argv[1])
for split in ("train", "val"):
    pairs = [json.loads(line) for line in (data / f"dpo_{split}.jsonl").read_text().splitlines() if line.strip()]
    rows = [{"prompt": p["prompt"], "completion": p["chosen" if i % 2 == 0 else "rejected"], "label": i % 2 == 0}
            for i, p in enumerate(pairs)]
    (data / f"kto_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
PY
      picoalign check-data "$RUNS/kto/data/kto_train.jsonl"
      picoalign run --tag kto "${SMALL[@]}" --set dpo.loss=kto --set dpo.beta=0.1 --set dpo.sft_weight=0 \
          --set dpo.train_file=kto_train.jsonl --set dpo.val_file=kto_val.jsonl ;;
    summary)  # the validation objective of each preference stage, first and last eval, and the method line
      python - "$RUNS" <<'PY'
import json, sys
from pathlib import Path
for tag in ("orpo", "simpo", "kto"):
    root = Path(sys.argv[1]) / tag
    evals = [r for r in map(json.loads, (root / "logs" / "dpo.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    first, last = evals[0], evals[-1]
    method = next(line for line in (root / "report" / "REPORT.md").read_text().splitlines() if "**Method**" in line)
    print(f"{tag}: val/loss {first['val/loss']:.4f} (step {first['step']}) -> {last['val/loss']:.4f} "
          f"(step {last['step']}): {'improved' if last['val/loss'] < first['val/loss'] else 'NOT improved'}")
    print(f"    {method.strip()}")
PY
      ;;
    *) echo "unknown: $what (orpo, simpo, kto, summary)" >&2; exit 2 ;;
  esac
done

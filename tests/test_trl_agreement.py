"""picoalign's DPO against TRL 1.16's DPOTrainer (the reference implementation) on one batch.

Format. TRL gets conversational pairs (prompt = [{"role": "user", ...}], chosen/rejected =
[{"role": "assistant", ...}]); picoalign gets the same prompt as a string, which it wraps as the
same user message. TRL 1.16 (`_prepare_dataset.tokenize_fn`) tokenises
`apply_chat_template(prompt, add_generation_prompt=True)` and `apply_chat_template(prompt + chosen)`
and takes the completion as everything after their common prefix; picoalign tokenises the
rendered prompt and the rest of the rendered conversation separately. With the ChatML template
both give, token for token (checked below):
    prompt     `<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n`   (no BOS either side)
    completion `{answer}<|im_end|>\\n`
so both score the end-of-turn token *and the newline the template puts after it*: the last
scored token is `\\n`, not eos. Neither adds an extra EOS (TRL's `add_eos` is for
non-conversational data only; picoalign appends eos only when the rendered answer lacks it).
Truncation agrees too: TRL's collator cuts prompt+answer at max_length (`keep_start`), picoalign
cuts each answer to max_length − len(prompt). (They differ only at the edge: a prompt of exactly
max_length − 1 tokens is dropped by picoalign, kept with one answer token by TRL.)

Metrics. The sigmoid, hinge and robust losses, an added SFT term, and every logged metric agree.
IPO's loss agrees (both average the log-ratios per answer token), and the logged `rewards/*` and
`logps/*` come from the summed log-probs on both sides.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from picoalign.config import DPOConfig as PicoDPOConfig  # noqa: E402
from picoalign.config import LoraConfig  # noqa: E402
from picoalign.train.batching import encode, pack_pairs  # noqa: E402
from picoalign.train.dpo import DPOTask  # noqa: E402
from picoalign.train.losses import DPO_LOSSES  # noqa: E402
from picoalign.train.scoring import batch_sequence_logps  # noqa: E402

MAX_LENGTH = 200
BETA = 0.1
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected")


def story_pairs(data_dir: Path, n: int) -> list[tuple[str, str, str]]:
    """Story prompts (~160 tokens) with the two endings from where they diverge (~220 tokens, so
    they are cut at MAX_LENGTH)."""
    out = []
    for line in (data_dir / "dpo_train.jsonl").read_text().splitlines()[:n]:
        r = json.loads(line)
        cut = len(os.path.commonprefix([r["chosen"], r["rejected"]]))
        while cut and not r["chosen"][cut - 1].isspace():
            cut -= 1
        out.append((r["prompt"], r["chosen"][cut:], r["rejected"][cut:]))
    return out


@pytest.fixture(scope="module")
def pairs(data_dir) -> list[tuple[str, str, str]]:
    return [
        ("Tell me a story about the lighthouse.", "The keeper heard the bell at midnight.", "No."),
        ("Hi", "Hello there, friend. What story would you like?", "Go away now."),
        *story_pairs(data_dir, 2),
    ]


def perturbed(model, scale: float = 0.02):
    """The model with every weight moved a little (seeded): a policy that differs from the reference."""
    g = torch.Generator().manual_seed(2)  # margins 0.11, -0.36, 0.53, -0.44: a mixed batch
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)


@pytest.fixture(scope="module")
def trl_side(tmp_path_factory, chat_model, chat_tokenizer, pairs):
    """TRL's trainer (policy = perturbed model, ref = the model) and one collated batch of all pairs."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rows = [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for p, c, r in pairs]
    args = DPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl")), report_to=[], per_device_train_batch_size=len(rows),
        bf16=False, max_length=MAX_LENGTH, beta=BETA, precompute_ref_log_probs=False, use_cpu=True,
        gradient_checkpointing=False, loss_type=["sigmoid"],
    )
    trainer = DPOTrainer(model=perturbed(load(chat_model)), ref_model=load(chat_model), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=chat_tokenizer)
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    assert len(examples) == len(pairs)  # none dropped
    return trainer, examples, trainer.data_collator(examples)


def trl_metrics(trainer, batch, loss_types: list[str], weights: list[float] | None = None,
                eps: float = 0.0) -> dict[str, float]:
    trainer.loss_types, trainer.loss_weights = loss_types, weights or [1.0] * len(loss_types)
    trainer.label_smoothing = eps
    trainer.model.train()
    trainer._metrics["train"].clear()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    return {"loss": loss.item(), **{k: trainer._metrics["train"][k][-1] for k in METRICS}}


@pytest.fixture(scope="module")
def pico_task(tmp_path_factory, chat_model, chat_tokenizer, pairs):
    """picoalign's DPOTask on the same pairs, all in one batch, live frozen reference = the model;
    its policy is then perturbed exactly as TRL's."""
    from picoalign.io import write_jsonl

    data = tmp_path_factory.mktemp("pico_pairs")
    write_jsonl(data / "dpo_train.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in pairs])
    cfg = PicoDPOConfig(data=str(data), model=str(chat_model), out=str(data / "out"), device="cpu",
                        dtype="fp32", max_length=MAX_LENGTH, batch_size=len(pairs), beta=BETA, max_steps=1,
                        reference="live", lora=LoraConfig(enabled=False))
    task = DPOTask(load(chat_model), chat_tokenizer, cfg, torch.device("cpu"), torch.float32)
    perturbed(task.model)
    (batch,) = task.train
    return task, batch


def pico_metrics(task: DPOTask, batch, loss: str, eps: float = 0.0, sft_weight: float = 0.0) -> dict[str, float]:
    task.cfg.loss, task.cfg.label_smoothing, task.cfg.sft_weight = loss, eps, sft_weight
    task.loss_fn, task.normalise = DPO_LOSSES[loss], loss == "ipo"
    task.reference.normalise = task.normalise
    task.model.train()
    with torch.no_grad():
        value, stats, _ = task.pair_loss(batch)
    return {"loss": value.item(), **{k: v.item() for k, v in stats.items()}}


# ---------------------------------------------------------------- tokens and log-probs


def test_same_tokens_as_trl(trl_side, chat_tokenizer, pairs):
    _, examples, _ = trl_side
    for ex, (p, c, r) in zip(examples, pairs):
        ours = encode(chat_tokenizer, p, [c, r], max_length=10_000)
        assert ours.prompt == ex["prompt_ids"]
        assert ours.answers == [ex["chosen_ids"], ex["rejected_ids"]]
        assert chat_tokenizer.decode(ex["chosen_ids"][-2:]) == "<|im_end|>\n"  # TRL scores the newline too


@pytest.mark.parametrize("share_prefix", [True, False])
def test_summed_logps_match_trl(trl_side, chat_tokenizer, chat_model, pairs, share_prefix):
    """TRL's per-sequence summed log-probs (`compute_ref_log_probs` called with the policy) equal
    picoalign's `batch_sequence_logps` on a batch of the same pairs, including the two cut at
    MAX_LENGTH."""
    trainer, _, batch = trl_side
    trl_chosen, trl_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    encoded = [encode(chat_tokenizer, p, [c, r], MAX_LENGTH) for p, c, r in pairs]
    assert [e.truncated for e in encoded] == [False, False, True, True]
    ours, _ = batch_sequence_logps(perturbed(load(chat_model)).eval(),
                                   pack_pairs(encoded, share_prefix, chat_tokenizer.pad_token_id))
    torch.testing.assert_close(ours[0::2].detach(), trl_chosen, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(ours[1::2].detach(), trl_rejected, atol=1e-4, rtol=1e-6)
    # and the policy really differs from the reference, so the metric checks below mean something
    ref_chosen, _ = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    assert (ref_chosen - trl_chosen).abs().min() > 0.05


# ---------------------------------------------------------------- losses and metrics


@pytest.mark.parametrize(("loss", "eps"), [("sigmoid", 0.0), ("hinge", 0.0), ("robust", 0.1)])
def test_loss_and_metrics_match_trl(trl_side, pico_task, loss, eps):
    trainer, _, batch = trl_side
    theirs = trl_metrics(trainer, batch, [loss], eps=eps)
    ours = pico_metrics(*pico_task, loss, eps=eps)
    assert 0.0 < theirs["rewards/accuracies"] < 1.0  # a mixed batch: accuracy is not trivially 0 or 1
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, abs=1e-5, rel=1e-5), key


def test_sft_term_matches_trl(trl_side, pico_task):
    """picoalign's `sft_weight` is TRL's `loss_type=["sigmoid", "sft"]` with weights [1, w]."""
    trainer, _, batch = trl_side
    theirs = trl_metrics(trainer, batch, ["sigmoid", "sft"], [1.0, 0.5])
    ours = pico_metrics(*pico_task, "sigmoid", sft_weight=0.5)
    assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-5)
    # the two terms are logged apart: the preference term alone is TRL's plain sigmoid loss
    assert ours["loss/preference"] == pytest.approx(trl_metrics(trainer, batch, ["sigmoid"])["loss"], abs=1e-5)
    assert ours["loss"] == pytest.approx(ours["loss/preference"] + 0.5 * ours["loss/sft_nll"], abs=1e-6)
    assert "loss/preference" not in pico_metrics(*pico_task, "sigmoid")


def test_ipo_loss_matches_trl(trl_side, pico_task):
    trainer, _, batch = trl_side
    theirs = trl_metrics(trainer, batch, ["ipo"])
    ours = pico_metrics(*pico_task, "ipo")
    assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-4, rel=1e-5)


def test_ipo_metrics_match_trl(trl_side, pico_task):
    trainer, _, batch = trl_side
    theirs = trl_metrics(trainer, batch, ["ipo"])
    ours = pico_metrics(*pico_task, "ipo")
    for key in METRICS:
        assert ours[key] == pytest.approx(theirs[key], abs=1e-5, rel=1e-5), key

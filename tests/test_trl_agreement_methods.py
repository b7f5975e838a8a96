"""picoalign's ORPO, SimPO and KTO against TRL 1.16 (ORPOTrainer and CPOTrainer from
`trl.experimental`, the stable KTOTrainer) on one batch, as tests/test_trl_agreement.py does for DPO.

Tokens. TRL's KTO tokenises conversational rows as its DPO does, so its prompt and completion ids
are ours token for token (checked). TRL's ORPO and CPO render the chat template to text and then
append an EOS token when the answer does not end in one: with ChatML the rendered answer ends in
`<|im_end|>\\n`, so they score one more `<|im_end|>` than picoalign (checked: theirs = ours + [eos]).
The loss comparisons therefore feed picoalign TRL's own token ids (packed into picoalign's rows),
so they compare the losses and metrics, not the two tokenisers.

Where they differ, by design. TRL's ORPO `nll_loss` runs over the prompt *and* the chosen answer
(TRL PR #2527, as the original ORPO code); picoalign's is the paper's L_SFT, the chosen answer only,
as in its SFT. So for ORPO: the odds-ratio part (loss − nll_loss) and every other metric agree, and
picoalign's `nll_loss` equals the cross-entropy of TRL's model on the answer tokens of TRL's batch.
TRL's `logits/*`, `entropy` and `num_tokens` are not logged by picoalign.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

from test_trl_agreement import MAX_LENGTH, load, perturbed, story_pairs  # noqa: E402

from picoalign.config import DPOConfig as PicoDPOConfig  # noqa: E402
from picoalign.config import LoraConfig  # noqa: E402
from picoalign.train.batching import Encoded, encode, pack_pairs  # noqa: E402
from picoalign.train.dpo import reference_free_loss  # noqa: E402
from picoalign.train.kto import KTOTask, kto_batch  # noqa: E402

PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected")


@pytest.fixture(scope="module")
def pairs(data_dir) -> list[tuple[str, str, str]]:
    return [
        ("Tell me a story about the lighthouse.", "The keeper heard the bell at midnight.", "No."),
        ("Hi", "Hello there, friend. What story would you like?", "Go away now."),
        *story_pairs(data_dir, 2),
    ]


@pytest.fixture(scope="module")
def mixed_pairs(pairs) -> list[tuple[str, str, str]]:
    """The pairs and the first one swapped: under any policy some pair's chosen is ahead, some behind."""
    (p, c, r) = pairs[0]
    return [*pairs, (p, r, c)]


def conversational(pairs) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for p, c, r in pairs]


def pico_cfg(tmp_path, chat_model, n: int, **kw) -> PicoDPOConfig:
    return PicoDPOConfig(data=str(tmp_path), model=str(chat_model), out=str(tmp_path / "out"), device="cpu",
                         dtype="fp32", max_length=MAX_LENGTH, batch_size=n, max_steps=1,
                         lora=LoraConfig(enabled=False), **kw)


def answer_ids(example: dict, side: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of one side of a tokenised ORPO/CPO example (labels −100 on the prompt)."""
    ids, labels = example[f"{side}_input_ids"], example[f"{side}_labels"]
    start = next(i for i, label in enumerate(labels) if label != -100)
    return ids[:start], ids[start:]


def same_pairs_as_trl(examples: list[dict], pad_id: int):
    """picoalign's packed batch of TRL's token ids, in TRL's order."""
    encoded = []
    for ex in examples:
        prompt, chosen = answer_ids(ex, "chosen")
        prompt_r, rejected = answer_ids(ex, "rejected")
        assert prompt == prompt_r
        encoded.append(Encoded(prompt, [chosen, rejected]))
    return pack_pairs(encoded, True, pad_id)


def trl_pair_trainer(kind: str, tmp_path, chat_model, chat_tokenizer, pairs, **args):
    from datasets import Dataset

    if kind == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer
    else:
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Trainer
    config = Config(output_dir=str(tmp_path / "trl"), report_to=[], per_device_train_batch_size=len(pairs),
                    bf16=False, max_length=MAX_LENGTH, use_cpu=True, **args)
    trainer = Trainer(model=perturbed(load(chat_model)), args=config, train_dataset=Dataset.from_list(conversational(pairs)),
                      processing_class=chat_tokenizer)
    examples = [trainer.train_dataset[i] for i in range(len(pairs))]
    trainer.model.train()
    with torch.no_grad():
        loss, metrics = trainer.get_batch_loss_metrics(trainer.model, trainer.data_collator(examples))
    return trainer, examples, loss.item(), metrics


def pico_pair_metrics(model, batch, cfg) -> dict[str, float]:
    model.train()
    with torch.no_grad():
        loss, stats, _ = reference_free_loss(model, batch, cfg)
    return {"loss": loss.item(), **{k: v.item() for k, v in stats.items()}}


def test_orpo_and_cpo_tokens_are_ours_plus_an_eos(tmp_path, chat_model, chat_tokenizer, pairs):
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    config = ORPOConfig(output_dir=str(tmp_path), report_to=[], max_length=10_000, use_cpu=True)
    trainer = ORPOTrainer(model=load(chat_model), args=config, train_dataset=Dataset.from_list(conversational(pairs)),
                          processing_class=chat_tokenizer)
    for i, (p, c, r) in enumerate(pairs):
        ours = encode(chat_tokenizer, p, [c, r], max_length=10_000)
        prompt, chosen = answer_ids(trainer.train_dataset[i], "chosen")
        _, rejected = answer_ids(trainer.train_dataset[i], "rejected")
        assert prompt == ours.prompt
        assert [chosen, rejected] == [a + [chat_tokenizer.eos_token_id] for a in ours.answers]


def test_orpo_loss_and_metrics_match_trl(tmp_path, chat_model, chat_tokenizer, mixed_pairs):
    trainer, examples, trl_loss, theirs = trl_pair_trainer("orpo", tmp_path, chat_model, chat_tokenizer, mixed_pairs,
                                                           beta=0.25)
    batch = same_pairs_as_trl(examples, chat_tokenizer.pad_token_id)
    assert batch.n_truncated == 0 and max(len(ex["chosen_input_ids"]) for ex in examples) == MAX_LENGTH  # cut by TRL
    ours = pico_pair_metrics(perturbed(load(chat_model)), batch, pico_cfg(tmp_path, chat_model, 5, loss="orpo", beta=0.25))
    assert 0.0 < theirs["rewards/accuracies"] < 1.0  # a mixed batch
    for key in (*PAIR_METRICS, "log_odds_ratio", "log_odds_chosen"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-5, rel=1e-5), key
    # the odds-ratio term λ·L_OR agrees; the NLL is over the answer here, over prompt + answer in TRL
    assert ours["loss"] - ours["nll_loss"] == pytest.approx(trl_loss - theirs["nll_loss"], abs=1e-6)
    collated = trainer.data_collator(examples)
    with torch.no_grad():
        logits = trainer.model(collated["chosen_input_ids"], attention_mask=collated["chosen_attention_mask"]).logits
    answer_nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), collated["chosen_labels"][:, 1:].flatten())
    assert ours["nll_loss"] == pytest.approx(answer_nll.item(), abs=1e-5)
    assert ours["nll_loss"] != pytest.approx(theirs["nll_loss"], abs=1e-3)  # the prompt tokens do count there


@pytest.mark.parametrize(("sft_weight", "eps"), [(0.0, 0.0), (0.5, 0.1)])
def test_simpo_loss_and_metrics_match_trl_cpo(tmp_path, chat_model, chat_tokenizer, mixed_pairs, sft_weight, eps):
    """SimPO is TRL's CPOTrainer with loss_type="simpo"; its `cpo_alpha` is picoalign's `sft_weight`."""
    _, examples, trl_loss, theirs = trl_pair_trainer(
        "cpo", tmp_path, chat_model, chat_tokenizer, mixed_pairs, loss_type="simpo", beta=2.0, simpo_gamma=0.8,
        cpo_alpha=sft_weight, label_smoothing=eps)
    batch = same_pairs_as_trl(examples, chat_tokenizer.pad_token_id)
    cfg = pico_cfg(tmp_path, chat_model, 5, loss="simpo", beta=2.0, simpo_gamma=0.8, sft_weight=sft_weight,
                   label_smoothing=eps)
    ours = pico_pair_metrics(perturbed(load(chat_model)), batch, cfg)
    assert 0.0 < theirs["rewards/accuracies"] < 1.0
    assert ours["loss"] == pytest.approx(trl_loss, abs=1e-5, rel=1e-5)
    for key in PAIR_METRICS:
        assert ours[key] == pytest.approx(theirs[key], abs=1e-5, rel=1e-5), key
    if sft_weight:
        assert ours["loss/sft_nll"] == pytest.approx(theirs["nll_loss"], abs=1e-5)


# ---------------------------------------------------------------- KTO


@pytest.fixture(scope="module")
def unpaired(pairs) -> list[tuple[str, str, bool]]:
    """Six rows, three desirable: the pairs' answers, with the same prompt never side by side."""
    (p0, c0, r0), (p1, c1, r1), (p2, c2, _), (p3, _, r3) = pairs
    return [(p0, c0, True), (p1, r1, False), (p2, c2, True), (p0, r0, False), (p3, r3, False), (p1, c1, True)]


@pytest.mark.parametrize("policy_moved", [True, False])
def test_kto_loss_and_metrics_match_trl(tmp_path, chat_model, chat_tokenizer, unpaired, policy_moved):
    """The policy is the perturbed model and the reference the model, or the other way round: the
    mismatched pairs' mean log-ratio then changes sign, so one case has the reference point clamped
    to 0 and the other a positive one."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    rows = [{"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": c}],
             "label": label} for p, c, label in unpaired]
    args = KTOConfig(output_dir=str(tmp_path / "trl"), report_to=[], per_device_train_batch_size=len(rows),
                     bf16=False, max_length=MAX_LENGTH, beta=0.3, desirable_weight=1.0, undesirable_weight=1.5,
                     use_cpu=True, precompute_ref_log_probs=False)
    policy, ref = (perturbed(load(chat_model)), load(chat_model))[:: 1 if policy_moved else -1]
    trainer = KTOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=chat_tokenizer)
    examples = [trainer.train_dataset[i] for i in range(len(rows))]
    for ex, (p, c, _) in zip(examples, unpaired):  # the same tokens as picoalign's
        ours = encode(chat_tokenizer, p, [c], max_length=10_000)
        assert ex["prompt_ids"] == ours.prompt and ex["completion_ids"] == ours.answers[0]  # TRL's collator cuts
    trainer.model.train()
    trainer._metrics["train"].clear()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, trainer.data_collator(examples)).item()
    theirs = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    cfg = pico_cfg(tmp_path, chat_model, len(rows), loss="kto", beta=0.3, undesirable_weight=1.5, reference="live")
    task = KTOTask(load(chat_model), chat_tokenizer, cfg, torch.device("cpu"), torch.float32,
                   rows=([{"prompt": p, "completion": c, "label": label} for p, c, label in unpaired], []))
    task.model = perturbed(load(chat_model)) if policy_moved else load(chat_model)
    task.reference.live = (load(chat_model) if policy_moved else perturbed(load(chat_model))).eval()
    # TRL's mismatched answers (each example with the previous one's), truncated as TRL's collator does
    encoded = [Encoded(ex["prompt_ids"], [ex["completion_ids"][: MAX_LENGTH - len(ex["prompt_ids"])],
                                           ex["KL_completion_ids"][: MAX_LENGTH - len(ex["prompt_ids"])]])
               for ex in examples]
    batch = kto_batch(encoded, [ex["label"] for ex in examples], True, chat_tokenizer.pad_token_id)
    task.model.train()
    with torch.no_grad():
        loss, stats, _ = task.pair_loss(batch)
    ours = {"loss": loss.item(), **{k: v.item() for k, v in stats.items()}}
    assert (theirs["kl"] > 0) == (not policy_moved)  # both sides of the clamp at 0 are compared
    assert ours["loss"] == pytest.approx(trl_loss, abs=1e-5, rel=1e-5)
    for key in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-4, rel=1e-5), key

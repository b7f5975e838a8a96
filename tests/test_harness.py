"""`picoalign eval --lm-eval`: lm-evaluation-harness on the tiny random Llama with the offline
tasks picoalign writes; its pair accuracy is picoalign's own preference accuracy."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from picoalign.cli import build_parser, config_from_args, main
from picoalign.config import ConfigError, EvalConfig
from picoalign.data.formats import read_preferences
from picoalign.eval.harness import context_and_answer, lm_eval_scores, write_tasks
from picoalign.io import read_json
from picoalign.models.load import load_model
from picoalign.report.strings import STRINGS
from picoalign.train.sft import pair_batches, pair_logps

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'picoalign[lm-eval]'; dev installs it)")


@pytest.fixture(scope="module")
def adapter_dir(chat_model, tmp_path_factory):
    """A LoRA adapter with random B on the tiny chat Llama (lm-eval loads it through peft=)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("lm_eval_adapter")
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(str(chat_model), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False, task_type="CAUSAL_LM"))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(chat_model)).save_pretrained(folder)
    (folder / "picoalign.json").write_text(json.dumps({"base_model": str(chat_model), "complete": True}))
    return folder


def test_the_pair_task_holds_rendered_prompts_and_answer_turns(chat_tokenizer, data_dir, tmp_path):
    assert write_tasks(data_dir, chat_tokenizer, tmp_path) == ["picoalign_pairs", "picoalign_pairs_hard",
                                                              "picoalign_sft_ppl"]
    spec = yaml.safe_load((tmp_path / "picoalign_pairs.yaml").read_text())
    assert spec["output_type"] == "multiple_choice" and spec["target_delimiter"] == ""
    assert spec["dataset_path"] == "json"
    assert spec["dataset_kwargs"]["data_files"]["test"] == str(tmp_path / "picoalign_pairs.jsonl")
    pairs = read_preferences(data_dir / "dpo_test.jsonl")
    docs = [json.loads(line) for line in (tmp_path / "picoalign_pairs.jsonl").read_text().splitlines()]
    assert [d["label"] for d in docs] == [0, 1, 0, 1]  # chosen first, then second, ...
    first, second = docs[0], docs[1]
    assert first["context"] == f"<|im_start|>user\n{pairs[0]['prompt']}<|im_end|>\n<|im_start|>assistant\n"
    assert first["choices"] == [f"{pairs[0]['chosen']}<|im_end|>\n", f"{pairs[0]['rejected']}<|im_end|>\n"]
    assert second["choices"][1] == f"{pairs[1]['chosen']}<|im_end|>\n"
    ppl = yaml.safe_load((tmp_path / "picoalign_sft_ppl.yaml").read_text())
    assert ppl["output_type"] == "loglikelihood_rolling" and ppl["doc_to_target"] == "response"


def test_a_plain_tokenizer_answer_ends_in_its_eos(plain_tokenizer):
    assert context_and_answer(plain_tokenizer, "Hello there.", "Hi.") == ("Hello there.", "Hi.<|endoftext|>")


@torch.no_grad()
def test_lm_eval_pair_loglikelihoods_are_picoaligns_log_probs(adapter_dir, data_dir, tmp_path):
    """Per pair, lm-eval's log-likelihood difference of the two choices is picoalign's
    log π(chosen) − log π(rejected) (pair_logps, what dpo_test_pref_acc thresholds at 0), for a
    LoRA adapter loaded by lm-eval through peft=."""
    scores = lm_eval_scores({"sft": str(adapter_dir)}, data_dir, ["picoalign_pairs"], tmp_path, log_samples=True)
    model, tokenizer = load_model(str(adapter_dir))
    pairs = read_preferences(data_dir / "dpo_test.jsonl")
    chosen, rejected = pair_logps(model.eval(), pair_batches(tokenizer, pairs, EvalConfig(max_length=4096),
                                                             sort=False), torch.device("cpu"))
    ours = (chosen - rejected).tolist()
    samples = sorted(scores["samples"]["sft"]["picoalign_pairs"], key=lambda s: s["doc_id"])
    theirs = []
    for s in samples:
        (a,), (b,) = s["resps"]
        lls = [a[0], b[0]]
        theirs.append(lls[s["target"]] - lls[1 - s["target"]])
    assert theirs == pytest.approx(ours, abs=2e-3)
    acc = scores["models"]["sft"]["picoalign_pairs"]
    assert acc["n"] == 4 and acc["acc"] == sum(d > 0 for d in ours) / 4
    assert acc["acc_stderr"] >= 0


def test_eval_with_lm_eval_writes_scores_equal_to_preference_accuracy_and_a_report_table(
        chat_model, adapter_dir, data_dir, tmp_path, capsys):
    from picoalign.report.build import build_report

    out = tmp_path / "run"
    assert main(["eval", "--models", f"base={chat_model},sft={adapter_dir}", "--data", str(data_dir),
                 "--out", str(out), "--lm-eval", "--n-samples", "1", "--max-new-tokens", "4", "--device", "cpu",
                 "--dtype", "fp32", "--max-length", "4096", "--decodings", "greedy"]) == 0
    metrics = read_json(out / "metrics.json")
    lm = metrics["lm_eval"]
    assert lm["tasks"] == ["picoalign"] and set(lm["models"]) == {"base", "sft"}
    for name in ("base", "sft"):
        got = lm["models"][name]
        assert got["picoalign_pairs"]["acc"] == metrics["models"][name]["dpo_test_pref_acc"]
        assert got["picoalign_pairs_hard"]["acc"] == metrics["models"][name]["dpo_hard_pref_acc"]
        assert got["picoalign_sft_ppl"]["n"] == 4 and got["picoalign_sft_ppl"]["bits_per_byte"] > 0
    folder = build_report(out)
    acc = lm["models"]["base"]["picoalign_pairs"]
    for lang in STRINGS.values():
        report = (folder / lang["file"]).read_text()
        assert f"| `picoalign_pairs` | acc | {acc['acc']:g} ± {acc['acc_stderr']:g} (n=4) |" in report
        assert lang["lm_eval_intro"].split(" ")[0] in report


def test_the_lm_eval_flag_alone_means_the_offline_tasks_and_a_bad_name_is_refused():
    args = build_parser().parse_args(["eval", "--run", "runs/x", "--lm-eval"])
    assert config_from_args("eval", args).lm_eval == "picoalign"
    args = build_parser().parse_args(["eval", "--lm-eval", "hellaswag,arc_easy", "--lm-eval-limit", "200"])
    cfg = config_from_args("eval", args)
    assert (cfg.lm_eval, cfg.lm_eval_limit) == ("hellaswag,arc_easy", 200)
    with pytest.raises(ConfigError, match="lm_eval: 'hella swag' is not a task name"):
        EvalConfig(lm_eval="hella swag")


@torch.no_grad()
def test_an_adapter_goes_through_peft_and_an_adapter_chain_is_merged_first(adapter_dir, tmp_path):
    """A DPO adapter trained on an SFT adapter (a chain) cannot be one `peft=`: picoalign merges it
    and hands lm-eval the model, which computes what picoalign's own load computes."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from picoalign.eval.harness import hf_model

    single = hf_model(str(adapter_dir), "cpu", "float32", 1)
    assert isinstance(single.model, PeftModel)
    torch.manual_seed(2)
    merged, tokenizer = load_model(str(adapter_dir))
    chain = tmp_path / "dpo"
    get_peft_model(merged, LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj"], init_lora_weights=False,
                                      task_type="CAUSAL_LM")).save_pretrained(chain)
    tokenizer.save_pretrained(chain)
    (chain / "picoalign.json").write_text(json.dumps({"base_model": str(adapter_dir), "complete": True}))
    lm = hf_model(str(chain), "cpu", "float32", 1)
    ids = torch.tensor([tokenizer("Hello there.")["input_ids"]])
    expected = load_model(str(chain))[0].eval()(input_ids=ids).logits
    assert torch.allclose(lm.model(input_ids=ids).logits, expected, atol=1e-5)
    assert not torch.allclose(single.model(input_ids=ids).logits, expected, atol=1e-3)  # the chain's top matters

"""ORPO, SimPO and KTO as stages: unpaired data, KTO's batches, the config checks, `picoalign dpo
--loss orpo|simpo|kto` on the tiny Llama, and `picoalign run --set run.method=orpo`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_dpo
import torch
from test_dpo import dpo_cfg, log_rows
from test_pipeline import run_quiet, settings

from picoalign.config import ConfigError, DPOConfig, LoraConfig, RunConfig
from picoalign.data.check import describe
from picoalign.data.formats import DataError, read_unpaired, split_pairs
from picoalign.io import read_json, write_jsonl
from picoalign.models.load import read_marker
from picoalign.pipeline import resolve_configs
from picoalign.train.dpo import dpo
from picoalign.train.kto import mismatched, spread_labels, unpaired_batches
from picoalign.train.preference import train_preferences

pref_dir, sft_full = test_dpo.pref_dir, test_dpo.sft_full  # test_dpo's fixtures: its pairs, its SFT model

# ---------------------------------------------------------------- unpaired data


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_unpaired_rows_and_split_pairs(tmp_path):
    """TRL's unpaired rows as they are (a conversational completion too); a pair becomes its chosen
    answer, true, and its rejected one, false."""
    path = write(tmp_path / "kto.jsonl", [
        json.dumps({"prompt": "Tell a story.", "completion": "Once upon a time.", "label": True}),
        json.dumps({"id": "p", "prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}),
        json.dumps({"input": "Hi", "completion": [{"role": "assistant", "content": "Hm."}], "label": False}),
    ])
    assert read_unpaired(path) == [
        {"id": "kto-000001", "prompt": "Tell a story.", "completion": "Once upon a time.", "label": True},
        {"id": "p:chosen", "prompt": "Hi", "completion": "Hello!", "label": True},
        {"id": "p:rejected", "prompt": "Hi", "completion": "Go away.", "label": False},
        {"id": "kto-000003", "prompt": "Hi", "completion": "Hm.", "label": False},
    ]
    assert split_pairs([{"id": "q", "prompt": "x", "chosen": "a", "rejected": "b"}]) == [
        {"id": "q:chosen", "prompt": "x", "completion": "a", "label": True},
        {"id": "q:rejected", "prompt": "x", "completion": "b", "label": False}]


def test_unpaired_csv_labels_are_words(tmp_path):
    path = write(tmp_path / "kto.csv", ["prompt,completion,label", "a,b,true", "c,d,FALSE", "e,f,1", "g,h,no"])
    assert [r["label"] for r in read_unpaired(path)] == [True, False, True, False]


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": "a", "completion": "b"}, "kto.jsonl:2: field 'label': missing: true for a desirable answer"),
    ({"prompt": "a", "completion": "b", "label": "maybe"}, "kto.jsonl:2: field 'label': expected true or false, got 'maybe'"),
    ({"prompt": "a", "label": True}, "kto.jsonl:2: field 'completion': missing"),
    ({"completion": "b", "label": True}, "kto.jsonl:2: field 'prompt': missing"),
    ({"prompt": "a", "completion": " ", "label": True}, "kto.jsonl:2: field 'completion': empty text"),
    ({"text": "a"}, "kto.jsonl:2: unknown format: fields seen: text; expected prompt|input + completion"),
    ({"prompt": "a", "chosen": "b", "rejected": "b"}, "kto.jsonl:2: field 'rejected': identical to 'chosen'"),
])
def test_bad_unpaired_rows_name_file_line_and_field(tmp_path, row, message):
    path = write(tmp_path / "kto.jsonl", [json.dumps({"prompt": "x", "completion": "y", "label": True}), json.dumps(row)])
    with pytest.raises(DataError) as e:
        read_unpaired(path)
    assert str(e.value).startswith(str(tmp_path / message.split(":")[0]) + message[len("kto.jsonl"):])


def test_check_data_describes_unpaired_files(tmp_path):
    path = write(tmp_path / "thumbs.jsonl", [
        json.dumps({"prompt": "abcd", "completion": "xy", "label": True}),
        json.dumps({"prompt": "ab", "completion": "wxyz", "label": False}),
        json.dumps({"prompt": "ab", "completion": "w", "label": False})])
    assert describe(path) == [str(path), "  kind: unpaired", "  rows: 3", "  prompt chars: mean 2.7, max 4",
                              "  completion chars: mean 2.3, max 4", "  multi-turn rows: 0",
                              "  desirable (label true): 1, undesirable (label false): 2"]


# ---------------------------------------------------------------- KTO batches


def test_mismatched_answer_is_the_nearest_earlier_one_of_another_prompt():
    """prompts [a, a, b]: 0 → 2 (cyclically the one before), 1 → 2 (0 has the same prompt), 2 → 1;
    all the same prompt: i − 1."""
    assert [mismatched(["a", "a", "b"], i) for i in range(3)] == [2, 2, 1]
    assert [mismatched(["a", "a"], i) for i in range(2)] == [1, 0]


def test_spread_labels_by_hand():
    """desirable lengths [5, 1] sit at ¾ and ¼, undesirable [3] at ½: [d1, u3, d5]."""
    rows = [{"id": "d5", "label": True}, {"id": "d1", "label": True}, {"id": "u3", "label": False}]
    assert [r["id"] for r in spread_labels(rows, [5, 1, 3])] == ["d1", "u3", "d5"]


def test_unpaired_batches_hold_each_answer_and_another_prompts(chat_tokenizer):
    """Sequences 2i / 2i+1: example i's answer and a mismatched one, both rendered after prompt i;
    the labels ride along, each micro-batch has both kinds, and a split pair's two answers never
    stand in for each other when another prompt is in the batch."""
    from picoalign.train.batching import encode, pack_pairs

    rows = split_pairs([{"id": "1", "prompt": "Hi", "chosen": "Hello there.", "rejected": "No."},
                        {"id": "2", "prompt": "Tell me a story.", "chosen": "Once a ghost sang.", "rejected": "Bye."},
                        {"id": "3", "prompt": "Why?", "chosen": "Because the night is long.", "rejected": "..."}])
    cfg = DPOConfig(max_length=200, batch_size=3)
    batches = unpaired_batches(chat_tokenizer, rows, cfg)
    assert [b.desirable.sum().item() for b in batches] == [1, 2] or [b.desirable.sum().item() for b in batches] == [2, 1]
    lengths = [sum(map(len, (e.prompt, e.answers[0]))) for e in
               (encode(chat_tokenizer, r["prompt"], [r["completion"]], 200) for r in rows)]
    order = spread_labels(rows, lengths)
    for batch, group in zip(batches, (order[:3], order[3:])):
        assert batch.desirable.tolist() == [r["label"] for r in group]
        prompts = [r["prompt"] for r in group]
        assert all(group[mismatched(prompts, i)]["prompt"] != r["prompt"] for i, r in enumerate(group))
        expected = [encode(chat_tokenizer, r["prompt"], [r["completion"], group[mismatched(prompts, i)]["completion"]],
                           200) for i, r in enumerate(group)]
        assert torch.equal(batch.input_ids, pack_pairs(expected, True, chat_tokenizer.pad_token_id).input_ids)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(("settings_", "message"), [
    ({"loss": "orpo", "sft_weight": 1.0}, "sft_weight must be >= 0, and 0 with loss=orpo"),
    ({"loss": "kto", "sft_weight": 0.5}, "0 with loss=kto"),
    ({"loss": "kto", "batch_size": 1}, "loss=kto needs batch_size >= 2"),
    ({"loss": "simpo", "simpo_gamma": -1}, "simpo_gamma must be >= 0"),
    ({"loss": "kto", "undesirable_weight": 0}, "undesirable_weight > 0"),
])
def test_method_settings_are_checked_at_load(settings_, message):
    with pytest.raises(ConfigError, match=message):
        DPOConfig(**settings_)


def test_run_method_is_checked_and_orpo_leaves_sft_out():
    with pytest.raises(ConfigError, match="method must be one of sft\\+dpo, orpo, sft\\+rl; got 'kto'"):
        RunConfig(method="kto")
    assert RunConfig(method="orpo").stage_names() == ["data", "dpo", "eval", "report"]
    assert RunConfig().stage_names() == ["data", "sft", "dpo", "eval", "report"]


def test_run_method_orpo_trains_orpo_from_the_base_model(tmp_path):
    c = resolve_configs(None, ["run.method=orpo", "run.model=/base/model", "dpo.sft_weight=1", "tag=x",
                               f"runs_dir={tmp_path}"], environ={})
    assert (c["dpo"].loss, c["dpo"].model, c["dpo"].sft_weight) == ("orpo", "/base/model", 0.0)
    with pytest.raises(ConfigError, match="run.method=orpo trains the dpo stage with loss=orpo; drop dpo.loss=simpo"):
        resolve_configs(None, ["run.method=orpo", "dpo.loss=simpo", "tag=x", f"runs_dir={tmp_path}"], environ={})
    assert resolve_configs(None, ["dpo.loss=simpo", "tag=x", f"runs_dir={tmp_path}"], environ={})["dpo"].model.endswith("sft")


# ---------------------------------------------------------------- the stage on the tiny Llama


@pytest.fixture(scope="module")
def kto_dir(tmp_path_factory, pref_dir) -> Path:
    """Truly unpaired rows: the chosen answers of the even pairs, the rejected of the odd ones."""
    out = tmp_path_factory.mktemp("kto")
    for split in ("train", "val"):
        pairs = [json.loads(line) for line in (pref_dir / f"dpo_{split}.jsonl").read_text().splitlines()]
        write_jsonl(out / f"kto_{split}.jsonl", [
            {"prompt": p["prompt"], "completion": p["chosen"] if i % 2 == 0 else p["rejected"], "label": i % 2 == 0}
            for i, p in enumerate(pairs)])
    return out


@pytest.mark.parametrize(("loss", "extra"), [("orpo", {"nll_loss", "log_odds_ratio", "log_odds_chosen"}),
                                             ("simpo", set())])
def test_reference_free_methods_compute_no_reference(tmp_path, sft_full, pref_dir, monkeypatch, loss, extra):
    """ORPO and SimPO train with no reference: nothing precomputed, no ref_logps.pt; they log TRL's
    names, and the validation loss moves."""
    from picoalign.train.reference import ReferenceCache

    def no_reference(self, policy, batches):
        raise AssertionError("a reference-free method computed reference log-probs")

    monkeypatch.setattr(ReferenceCache, "compute", no_reference)
    out = tmp_path / loss
    summary = dpo(dpo_cfg(out, sft_full, pref_dir, loss=loss, beta=2.0 if loss == "simpo" else 0.1, eval_every=1,
                          lr=1e-2, max_steps=3))
    assert summary["stop_reason"] == "max_steps" and read_marker(out)["complete"]
    assert not (out / "ref_logps.pt").exists()
    train, evals = log_rows(out), log_rows(out, "eval")
    assert {"rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/chosen"} | extra <= set(train[0])
    assert -10 < train[0]["logps/chosen"] < 0  # the mean per token, not the sum
    assert evals[-1]["val/loss"] < evals[0]["val/loss"]


def test_kto_trains_on_unpaired_rows_against_its_reference(tmp_path, sft_full, kto_dir):
    out = tmp_path / "kto"
    summary = train_preferences(dpo_cfg(out, sft_full, kto_dir, loss="kto", train_file="kto_train.jsonl", val_file="kto_val.jsonl",
                          eval_every=1, lr=1e-2, max_steps=3))
    assert summary["stop_reason"] == "max_steps"
    assert (out / "ref_logps.pt").exists()
    train, evals = log_rows(out), log_rows(out, "eval")
    assert train[0]["kl"] == 0.0 and train[0]["rewards/chosen"] == 0.0  # step 1: a fresh adapter is the reference
    assert {"kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"} <= set(train[0])
    assert evals[0]["val/loss"] == pytest.approx(0.5, abs=1e-6)  # 1 − σ(0) for every example at the start
    assert evals[-1]["val/loss"] < evals[0]["val/loss"] and {"val/reward_acc", "val/margin"} <= set(evals[-1])


# ---------------------------------------------------------------- the pipeline


def test_run_method_orpo_replaces_sft_and_dpo_and_eval_compares_it_with_the_base(tmp_path, chat_model):
    root, stdout = run_quiet(None, settings(chat_model, tmp_path / "runs", run={"method": "orpo"}))
    assert not (root / "checkpoints" / "sft").exists()
    marker = read_marker(root / "checkpoints" / "dpo")
    assert marker["complete"] and marker["base_model"] == str(chat_model)
    assert "nll_loss" in log_rows(root)[0]  # the run's logs/dpo.jsonl: ORPO's metrics
    metrics = read_json(root / "metrics.json")
    assert set(metrics["models"]) == {"base", "dpo"}
    assert set(metrics["comparisons"]) == {"dpo_vs_base"}
    report = (root / "report" / "REPORT.md").read_text()
    assert "**Method**: ORPO (`loss=orpo`): one stage from the base model" in report
    assert "stages data,dpo,eval,report; method orpo" in stdout


# ---------------------------------------------------------------- the frontier


def test_frontier_crosses_losses_with_betas(tmp_path):
    """`--losses sigmoid,simpo` plans one point per loss and β; the run's own loss keeps the plain name."""
    from picoalign.config import FrontierConfig
    from picoalign.eval.frontier import _dpo_config

    cfg = FrontierConfig(run=str(tmp_path), losses="sigmoid, simpo", betas="0.1,2")
    assert cfg.loss_names() == ["sigmoid", "simpo"]
    own = {"loss": "sigmoid", "batch_size": 2}
    point = _dpo_config(cfg, tmp_path, own, 2.0, 0.0, "simpo")
    assert (point.loss, point.beta, point.out) == ("simpo", 2.0, str(tmp_path / "frontier" / "simpo-beta-2-sftw-0"))
    assert _dpo_config(cfg, tmp_path, own, 0.1, 0.0, "sigmoid").out == str(tmp_path / "frontier" / "beta-0.1-sftw-0")
    with pytest.raises(ConfigError, match="losses must be one of sigmoid, cdpo, ipo, hinge, robust, simpo, kto; got 'orpo'"):
        FrontierConfig(run=str(tmp_path), losses="orpo")


def test_kto_warns_when_the_weights_do_not_balance_the_labels(chat_model, chat_tokenizer):
    """3 desirable, 1 undesirable, weights 1 and 1: λ_D·n_D / (λ_U·n_U) = 3, outside [1, 4/3];
    desirable_weight 1/3 brings it to 1."""
    from picoalign.train.kto import KTOTask

    rows = [{"prompt": f"Prompt {i}", "completion": f"Answer {i}.", "label": i != 0} for i in range(4)]
    model = torch.nn.Module()
    cfg = DPOConfig(max_length=64, batch_size=2, reference="live", lora=LoraConfig(enabled=False))
    with pytest.warns(UserWarning, match=r"= 3.00, the paper recommends 1 to 1.33 \(e.g. desirable_weight=0.33\)"):
        KTOTask(model, chat_tokenizer, cfg, torch.device("cpu"), torch.float32, rows=(rows, []))


@pytest.mark.parametrize(("config", "en", "zh"), [
    ({"run": {"method": "sft+dpo"}, "dpo": {"loss": "simpo"}},
     "SFT, then SimPO, without a reference model (`loss=simpo`) in the DPO stage", "先 SFT，再在 DPO 阶段训练 SimPO"),
    ({"run": {"method": "sft+dpo"}, "dpo": {"loss": "kto"}}, "SFT, then KTO, on unpaired answers", "KTO，使用非成对回答"),
    ({"dpo": {}}, "SFT, then DPO (`loss=sigmoid`) in the DPO stage", "训练 DPO（`loss=sigmoid`）"),
    ({"run": {"method": "orpo"}, "dpo": {"loss": "orpo"}}, "ORPO (`loss=orpo`): one stage from the base model",
     "ORPO（`loss=orpo`）：从基座模型出发的单一阶段"),
])
def test_report_names_the_method(tmp_path, config, en, zh):
    from picoalign.report.load import Run
    from picoalign.report.sections import _method
    from picoalign.report.strings import EN, ZH

    run = Run(tmp_path, config=config)
    assert en in _method(run, EN) and zh in _method(run, ZH)


def square_loss(delta: torch.Tensor, beta: float, eps: float = 0.0) -> torch.Tensor:
    """A made-up method for the test below: (1 − βΔ)². At Δ = 0 (step 1 of a fresh adapter) it is 1."""
    return (1 - beta * delta) ** 2


def test_a_method_added_in_one_place_reaches_the_config_check_cli_help_trainer_and_report(
        tmp_path, monkeypatch, sft_full, pref_dir):
    """One `Method` entry (and its loss function) is all a new preference method takes: the config
    accepts it and names it among the choices, `picoalign dpo --help` lists it, `picoalign dpo`
    trains it (its loss at step 1 is its value at Δ = 0) and the report names it in both languages."""
    from picoalign import methods
    from picoalign.cli import build_parser
    from picoalign.report.build import build_report

    entry = methods.Method("square", f"{__name__}:square_loss", True, {"en": "squared DPO", "zh": "平方 DPO"})
    monkeypatch.setitem(methods.METHODS, "square", entry)

    assert DPOConfig(loss="square").loss == "square"
    with pytest.raises(ConfigError, match=r"loss must be one of .*robust, orpo, simpo, kto, square; got 'cube'"):
        DPOConfig(loss="cube")
    dpo_help = build_parser()._subparsers._group_actions[0].choices["dpo"].format_help()
    assert "robust | orpo | simpo | kto | square" in " ".join(dpo_help.split())

    out = tmp_path / "dpo"
    summary = train_preferences(dpo_cfg(out, sft_full, pref_dir, loss="square", max_steps=1))
    assert summary["steps"] == 1 and log_rows(out)[0]["loss"] == 1.0
    assert set(entry.metrics) <= set(log_rows(out)[0])  # the metrics its entry names, under TRL's names

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("run:\n  method: sft+dpo\ndpo:\n  loss: square\n")
    report = build_report(run)
    assert "SFT, then squared DPO (`loss=square`) in the DPO stage" in (report / "REPORT.md").read_text()
    assert "平方 DPO" in (report / "REPORT.zh.md").read_text()

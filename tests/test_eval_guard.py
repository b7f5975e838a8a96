"""`picoalign eval` at its edges: pair metrics only (n_samples=0), and test splits with nothing in them."""

from __future__ import annotations

from picoalign.config import EvalConfig
from picoalign.eval.evaluate import evaluate


def cfg_for(chat_model, data, out, **kw) -> EvalConfig:
    settings = dict(models=f"sft={chat_model},dpo={chat_model}", data=str(data), out=str(out), device="cpu",
                    dtype="fp32", max_length=512, batch_size=4, max_new_tokens=4, decodings="greedy")
    return EvalConfig(**(settings | kw))


def test_pair_metrics_only_with_n_samples_0(tmp_path, chat_model, data_dir, capsys):
    """`--set n_samples=0` used to crash with a TypeError in the headline (the style score's mean is
    None without samples); now the headline gives the pair metrics and no sample is made."""
    metrics = evaluate(cfg_for(chat_model, data_dir, tmp_path, n_samples=0))
    out = capsys.readouterr().out
    for name in ("sft", "dpo"):
        m = metrics["models"][name]
        assert m["n_samples"] == 0 and m["vader_darkness"] is None and m["dpo_test_pref_acc"] is not None
        assert "kl_to_ref" not in m  # on no samples it would read 0: "did not move"
        assert f"eval: {name}: dpo_test_pref_acc {m['dpo_test_pref_acc']:.2f}" in out
    assert metrics["comparisons"] == {}
    assert (tmp_path / "samples.jsonl").read_text() == ""
    assert "no samples (n_samples=0" in out
    from picoalign.report.build import build_report

    build_report(tmp_path)  # the report reads the same metrics: a None style score is a dash, not a crash
    assert (tmp_path / "report" / "index.html").is_file()


def test_empty_test_splits_are_skipped_without_loading_a_model(tmp_path, chat_model, monkeypatch, capsys):
    """Empty test splits used to load every model and run for minutes on nothing."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("sft_test.jsonl", "dpo_test.jsonl", "dpo_train.jsonl"):
        (data / name).write_text("")

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded for nothing")

    monkeypatch.setattr("picoalign.eval.evaluate.load_model", no_loading)
    metrics = evaluate(cfg_for(chat_model, data, tmp_path / "out"))
    out = capsys.readouterr().out
    assert "eval: nothing to evaluate: the test splits in" in out and "sft_test.jsonl, dpo_test.jsonl" in out
    assert metrics == {} and not (tmp_path / "out" / "metrics.json").exists()


def test_one_empty_split_is_named_and_skipped(tmp_path, chat_model, data_dir, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("sft_test.jsonl", "dpo_test.jsonl", "dpo_train.jsonl"):
        (data / name).write_text((data_dir / name).read_text())
    (data / "dpo_test_hard.jsonl").write_text("")
    metrics = evaluate(cfg_for(chat_model, data, tmp_path / "out", n_samples=1))
    assert "eval: dpo_test_hard.jsonl has no rows: skipped" in capsys.readouterr().out
    assert "dpo_hard_pref_acc" not in metrics["models"]["sft"]
    assert metrics["models"]["sft"]["n_samples"] == 1


def test_pairs_within_a_budget_by_hand():
    """Pairs per split that n models score in the budget: cost(n) = per_pair * models * sum(min(n, len))."""
    from picoalign.eval.evaluate import pairs_within

    assert pairs_within(100, 1.0, [64, 64], 3, 4) == 16  # 3 * 2 * 16 = 96 <= 100; 17 would be 102
    assert pairs_within(100, 1.0, [64, 10], 3, 4) == 23  # 3 * (23 + 10) = 99; 24: 3 * 34 = 102
    assert pairs_within(1000, 1.0, [64, 64], 3, 4) == 64  # all fit
    assert pairs_within(1, 1.0, [64, 64], 3, 4) == 4  # never below the batch that was timed


def test_pair_seconds_cuts_every_split_alike_for_every_model(tmp_path, chat_model, data_dir, monkeypatch, capsys):
    """The first batch (2 pairs) is timed at 1 s on a fake clock: 0.5 s a pair, so all 8 pairs for
    2 models would take 8 s; a 5 s budget leaves 2 pairs per split (2 models * 2 splits * 2 * 0.5 s),
    and those score exactly what an unbudgeted eval gives the same 2 pairs."""
    ticks = iter([0.0, 1.0])
    monkeypatch.setattr("picoalign.eval.evaluate.perf_counter", lambda: next(ticks))
    cut = evaluate(cfg_for(chat_model, data_dir, tmp_path / "cut", n_samples=0, batch_size=2, pair_seconds=5))
    assert "eval: scoring the first 2 pairs of each split (4, 4 there)" in capsys.readouterr().out
    assert cut["run"]["eval_sizes"]["dpo_test"] == 2 and cut["run"]["eval_sizes"]["dpo_test_hard"] == 2
    assert cut["run"]["pair_budget"] == {"seconds": 5.0, "per_pair_seconds": 0.5, "all_pairs_seconds": 8.0,
                                         "pairs_per_split": 2, "cut": True}
    full = evaluate(cfg_for(chat_model, data_dir, tmp_path / "full", n_samples=0, batch_size=2, max_pairs=2))
    assert "pair_budget" not in full["run"]
    for name in ("sft", "dpo"):
        for key in ("dpo_test_margin", "dpo_hard_margin", "dpo_test_pref_acc"):
            assert cut["models"][name]["intervals"][key]["n"] == 2
            assert cut["models"][name][key] == full["models"][name][key], (name, key)


def test_kl_samples_caps_the_samples_the_kl_is_measured_on(tmp_path, chat_model, data_dir):
    metrics = evaluate(cfg_for(chat_model, data_dir, tmp_path, n_samples=2, kl_samples=1, max_pairs=1))
    dpo = metrics["models"]["dpo"]
    assert dpo["kl_samples"] == 1 and dpo["kl_to_ref"] == 0.0  # the same weights as its reference
    assert "kl_samples" not in metrics["models"]["sft"]

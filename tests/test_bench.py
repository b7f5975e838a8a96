"""bench/compare.py drives picoalign through the loop's public step API: one step of each mode on
the tiny model, so that a refactor of the loop cannot break the benchmark silently."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "compare.py"


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("bench_compare", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_compare"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mode", ["sft", "dpo"])
def test_one_benchmark_step_through_the_public_api(compare, tmp_path, chat_model, data_dir, mode):
    spec = {"mode": mode, "data": str(data_dir), "tmp": str(tmp_path), "dtype": "fp32", "total_steps": 2,
            "threads": 0, "model": str(chat_model)}
    info, step, _ = compare.ours_setup(spec)
    assert info["n_matmul"] > 0 and info["padded_tokens"] > 0
    first, second = step(), step()
    for row in (first, second):
        assert row["s"] > 0 and row["tokens"] > 0 and row["computed_tokens"] > 0
        assert isinstance(row["loss"], float) and row["loss"] > 0
    assert (first["pairs"] > 0) == (mode == "dpo")
    assert first["loss"] != second["loss"]  # the second step trained on what the first changed


def test_the_attention_benchmark_prints_a_row_per_length_with_small_errors(capsys):
    spec = importlib.util.spec_from_file_location("bench_attention", BENCH.parent / "attention.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--lengths", "20", "33", "--rows", "2", "--heads", "4", "--kv-heads", "2", "--head-dim", "8",
                 "--repeats", "1"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert [int(r[0]) for r in rows] == [20, 33]
    for r in rows:
        assert float(r[1]) > 0 and float(r[2]) > 0
        assert float(r[4]) < 0.05 and float(r[5]) < 0.05  # bf16 against fp32, both kernels


def test_the_grpo_benchmark_runs_our_side_on_the_tiny_model(tmp_path, chat_model, capsys):
    """bench/compare.py --mode grpo dispatches to bench/compare_grpo.py; its picoalign side runs
    and reports seconds per step and completions per second (the TRL side needs the real model)."""
    sys.path.insert(0, str(BENCH.parent))
    import compare_grpo

    spec = {"model": str(chat_model), "tmp": str(tmp_path), "threads": 1, "dtype": "fp32", "steps": 2, "warmup": 1,
            "prompts": 2, "generations": 2, "completion_length": 4}
    result = compare_grpo.summarise(compare_grpo.ours_side(spec), 4)
    assert result["s_per_step"] > 0 and result["completions_per_s"] == pytest.approx(4 / result["s_per_step"],
                                                                                        rel=0.02)  # each figure rounded to 3 significant digits
    assert len(result["steps"]) == 2 and 0 < result["mean_completion_tokens"] <= 4

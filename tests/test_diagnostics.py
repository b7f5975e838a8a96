"""DPO's likelihood-displacement warning (train/diagnostics.py): in the stage's output and log,
in the report, and the log-prob curves against the reference in curves.png."""

from __future__ import annotations

import json

from picoalign.io import write_json, write_jsonl
from picoalign.report.build import build_report
from picoalign.report.plots import _draw_panel, panels
from picoalign.train.diagnostics import displacement_warning
from picoalign.train.dpo import warn_displacement


def dpo_rows(chosen: list[float], rejected: list[float]) -> list[dict]:
    """Train rows as the loop logs them; rewards are β·(policy − reference) with β = 0.1 and the
    reference at -100 (chosen) and -110 (rejected)."""
    return [{"kind": "train", "step": i + 1, "loss": 0.6, "rewards/chosen": c, "rewards/rejected": r,
             "rewards/margins": c - r, "rewards/accuracies": float(c > r),
             "logps/chosen": -100 + c / 0.1, "logps/rejected": -110 + r / 0.1,
             "logps/ref_chosen": -100.0, "logps/ref_rejected": -110.0}
            for i, (c, r) in enumerate(zip(chosen, rejected))]


# both answers pushed down, the rejected faster: the margin grows while chosen sinks
DISPLACED = dpo_rows([0.0, -0.1, -0.2, -0.4, -0.5, -0.7], [0.0, -0.3, -0.6, -1.0, -1.3, -1.7])


def test_warning_when_chosen_falls_below_the_reference_while_the_margin_grows():
    """First half (3 steps) vs second: chosen mean (0 − 0.1 − 0.2)/3 = −0.100 -> (−0.4 − 0.5 − 0.7)/3
    = −0.533; margins 0, 0.2, 0.4 -> mean 0.200, then 0.6, 0.8, 1.0 -> 0.800."""
    warning = displacement_warning(DISPLACED)
    assert warning.startswith("the chosen answers' log-probs fell below the reference's "
                              "(reward/chosen -0.100 -> -0.533, means of the first and second half) "
                              "while the margin grew (+0.200 -> +0.800)")
    assert "sft_weight" in warning and "lower lr" in warning and "DPOP" in warning


def test_no_warning_for_healthy_or_short_runs():
    healthy = dpo_rows([0.0, 0.1, 0.2, 0.3, 0.4, 0.5], [0.0, -0.1, -0.2, -0.3, -0.4, -0.5])
    assert displacement_warning(healthy) is None
    # chosen falls, but the margin shrinks: the run is failing differently, not displacing
    shrinking = dpo_rows([0.0, -0.1, -0.2, -0.3, -0.4, -0.5], [-0.5, -0.5, -0.5, -0.5, -0.5, -0.5])
    assert displacement_warning(shrinking) is None
    assert displacement_warning(DISPLACED[:3]) is None  # too few steps to speak of a trend


def test_the_stage_prints_and_logs_it(tmp_path, capsys):
    write_jsonl(tmp_path / "dpo.jsonl", DISPLACED)
    assert warn_displacement(tmp_path, "dpo") == displacement_warning(DISPLACED)
    assert capsys.readouterr().out.startswith("dpo: warning: the chosen answers' log-probs fell below")
    last = json.loads((tmp_path / "dpo.jsonl").read_text().splitlines()[-1])
    assert last["kind"] == "warning" and "sft_weight" in last["message"]


def test_report_warns_and_curves_draw_the_reference(tmp_path):
    from matplotlib.figure import Figure

    run = tmp_path / "run"
    write_jsonl(run / "logs" / "dpo.jsonl", DISPLACED)
    write_json(run / "data" / "dataset_meta.json", {})
    out = build_report(run)
    en, zh = (out / "REPORT.md").read_text(), (out / "REPORT.zh.md").read_text()
    assert "**Warning (DPO):** the chosen answers' log-probs fell below the reference's" in en
    assert "**警告（DPO）：** the chosen answers'" in zh
    assert (out / "curves.png").is_file()
    panel = next(p for _, p in panels() if "against the reference" in p.title)
    ax = Figure().subplots()
    assert _draw_panel(ax, panel, DISPLACED)
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["chosen (reference)"].get_ydata()) == [-100.0] * 6
    assert lines["chosen (reference)"].get_linestyle() == "--"
    assert lines["chosen (policy) (EMA)"].get_ydata()[-1] < -100.0  # sunk under its reference

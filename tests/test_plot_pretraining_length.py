"""benchmarks/plot_pretraining_length.py: the curve must hold each run once, at its recorded pretraining length."""

import importlib
import json
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
curve_tool = importlib.import_module("plot_pretraining_length")  # a plain import: a broken tool must fail, not skip


def _dice(wt: float, tc: float, et: float) -> dict:
    return {"complete": {"whole tumour": wt, "tumour core": tc, "enhancing": et, "edema": 0.5}}


def _results(path: Path, arms: dict, finetune: int = 600, fold: int = 2) -> str:
    steps = {"pretrain": 1600, "finetune": finetune}
    path.write_text(json.dumps({"dataset": "Dataset901_X", "fold": fold, "steps": steps, "arms": arms}))
    return str(path)


def test_runs_grouped_by_pretraining_steps_repeats_counted_once_and_the_table(tmp_path):
    first = _results(tmp_path / "a.json", {
        "csm": {"pretrain_steps": 1600, "dice": _dice(0.90, 0.80, 0.30)},
        "csm@2": {"pretrain_steps": 1600, "dice": _dice(0.92, 0.70, 0.20)},
        "csm~400": {"pretrain_steps": 400, "dice": _dice(0.85, 0.60, 0.10)},
        "scratch": {"dice": _dice(0.91, 0.75, 0.25)},
        "mae": {"pretrain_steps": 1600, "dice": _dice(0.99, 0.99, 0.99)},  # another arm: not on this curve
        "csm@3": {"pretrain_steps": 1600, "error": "failed"},  # not scored: left out, not a zero
    })
    second = _results(tmp_path / "b.json", {
        "csm": {"pretrain_steps": 1600, "dice": _dice(0.90, 0.80, 0.30)},  # the same run, resumed into a copy
        "csm~3200": {"pretrain_steps": 3200, "dice": _dice(0.95, 0.85, 0.35)},
        "scratch": {"dice": _dice(0.93, 0.77, 0.27)},  # a further scratch run (another Dice)
    })
    curve = curve_tool.collect([first, second], "csm", "scratch")
    assert list(curve["steps"]) == [400, 1600, 3200]
    assert curve["steps"][1600]["tumour core"] == [0.80, 0.70]
    assert curve["steps"][3200]["enhancing"] == [0.35]
    assert curve["baseline"]["whole tumour"] == [0.91, 0.93]
    md = curve_tool.table(curve, "csm", "scratch")
    assert f"| csm | 1600 | 2 | 0.910 ± {statistics.stdev([0.90, 0.92]):.3f} |" in md
    assert "| scratch | 0 (none) | 2 | 0.920 ± 0.014 | 0.760 ± 0.014 | 0.260 ± 0.014 |" in md
    png = tmp_path / "curve.png"
    assert curve_tool.main([first, second, "--arm", "csm", "--baseline", "scratch", "--out", str(png)]) == 0
    assert png.stat().st_size > 1000 and not list(tmp_path.glob("tmp*.png"))


def test_refuses_results_of_another_fine_tuning_budget_and_an_arm_without_runs(tmp_path, capsys):
    first = _results(tmp_path / "a.json", {"csm": {"pretrain_steps": 1600, "dice": _dice(0.9, 0.8, 0.3)}})
    other = _results(tmp_path / "b.json", {"csm~400": {"pretrain_steps": 400, "dice": _dice(0.9, 0.8, 0.3)}},
                     finetune=300)
    with pytest.raises(curve_tool.LengthCurveError, match="finetune_steps is 300"):
        curve_tool.collect([first, other], "csm", "scratch")
    with pytest.raises(curve_tool.LengthCurveError, match="no run of arm 'fused'"):
        curve_tool.collect([first], "fused", "scratch")
    assert curve_tool.main([first, other, "--arm", "csm", "--out", str(tmp_path / "x.png")]) == 1
    assert "b.json" in capsys.readouterr().err and not (tmp_path / "x.png").exists()

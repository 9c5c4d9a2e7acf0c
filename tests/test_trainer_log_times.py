"""benchmarks/trainer_log_times.py: the speeds it reports must be those nnU-Net's training log holds."""

import importlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
times = importlib.import_module("trainer_log_times")  # a plain import: a broken tool must fail, not skip


def _log(folder: Path, epoch_s: list[float], gap: float, extra: list[str]) -> None:
    """A log in nnU-Net's format (``print_to_log_file`` stamps), epoch k starting after k cycles."""
    lines = [f"2026-12-04 06:58:51.468717: {e} " for e in extra]
    lines.append("2026-12-04 06:58:51.500000: {'data_identifier': 'p', 'batch_size': 3, 'patch_size': [64, 64, 64]}")
    t = 0.0
    for k, s in enumerate(epoch_s):
        lines.append(f"2026-12-04 06:59:{t:09.6f}: Epoch {k} ")
        lines.append("2026-12-04 06:59:00.000000: train_loss 0.5 ")
        lines.append(f"2026-12-04 06:59:00.000000: Epoch time: {s} s ")
        t += s + gap
    folder.mkdir(parents=True)
    (folder / "training_log_2026_12_4_06_58_51.txt").write_text("\n".join(lines) + "\n")


def test_medians_leave_out_the_first_epoch_and_read_the_iteration_overrides(tmp_path):
    _log(tmp_path / "pre" / "fold_1", [9.0, 2.0, 3.0, 2.5], 1.0,
         ["csm-nnunet: num_iterations_per_epoch = 50 (from environment, default was 250)",
          "csm-nnunet: num_val_iterations_per_epoch = 2 (from environment, default was 50)"])
    r = times.parse_log(times.find_log(str(tmp_path / "pre")))
    assert r["median_epoch_s_after_first"] == 2.5 and r["first_epoch_s"] == 9.0
    assert (r["train_iterations_per_epoch"], r["val_iterations_per_epoch"]) == (50, 2)
    assert r["ms_per_train_iteration"] == 50.0 and r["batch_size"] == 3 and r["patch_size"] == [64, 64, 64]
    assert r["cycle_s"] == [10.0, 3.0, 4.0] and r["between_epochs_s"] == pytest.approx(1.0)


def test_nnunet_defaults_the_classifiers_per_case_validation_and_a_cli_json(tmp_path):
    _log(tmp_path / "unet", [14.0, 6.0, 5.0], 1.0, [])
    _log(tmp_path / "cls", [3.0, 2.0, 2.0], 1.0,
         ["csm-nnunet: the num_val_iterations_per_epoch override is ignored by CSMClassifierTrainer"])
    out = tmp_path / "t.json"
    assert times.main([f"U-Net={tmp_path / 'unet'}", f"cls={tmp_path / 'cls'}", "--out", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert runs["U-Net"]["train_iterations_per_epoch"] == 250 and runs["U-Net"]["val_iterations_per_epoch"] == 50
    assert runs["U-Net"]["ms_per_train_iteration"] == 22.0
    assert runs["cls"]["val_iterations_per_epoch"] is None
    assert "every held-out case" in times.markdown(runs)


def test_too_few_epochs_or_several_logs_are_errors_that_name_the_folder(tmp_path):
    _log(tmp_path / "one" / "fold_0", [5.0], 1.0, [])
    assert times.main([f"a={tmp_path / 'one'}"]) == 1
    with pytest.raises(ValueError, match="at least 2"):
        times.parse_log(times.find_log(str(tmp_path / "one")))
    with pytest.raises(ValueError, match="expected one training_log"):
        times.find_log(str(tmp_path / "missing"))

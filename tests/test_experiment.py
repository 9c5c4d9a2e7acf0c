"""Helpers of ``csm_nnunet experiment``: split, missing-series inputs, Dice per label/region, the table."""

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from csm_nnunet.experiment import (
    ARMS,
    CLS_ARMS,
    _read_probabilities,
    arm_spec,
    markdown,
    region_dice,
    write_splits,
    zero_series_copy,
)


def _write(arr: np.ndarray, path: str, spacing=(1.5, 1.5, 1.5)) -> None:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin((1.0, 2.0, 3.0))
    sitk.WriteImage(img, path)


def test_splits_hold_out_the_same_cases_for_pretraining_and_fine_tuning(tmp_path):
    cases = [f"case_{i:03d}" for i in range(12)]
    split = write_splits(str(tmp_path), cases, n_val=4, n_labelled=3, seed=5)
    folds = json.load(open(tmp_path / "splits_final.json"))
    assert folds[0] == {"train": split["labelled"], "val": split["val"]}
    assert folds[1] == {"train": split["pretraining"], "val": split["val"]}
    assert len(split["val"]) == 4 and len(split["labelled"]) == 3 and len(split["pretraining"]) == 8
    assert not set(split["val"]) & set(split["pretraining"])
    assert set(split["labelled"]) <= set(split["pretraining"])
    assert write_splits(str(tmp_path), cases, 4, 3, seed=5) == split
    assert write_splits(str(tmp_path), cases, 4, 3, seed=6) != split
    with pytest.raises(ValueError, match="must fit the 12 cases"):
        write_splits(str(tmp_path), cases, 10, 3, seed=0)


def test_zero_series_copy_keeps_geometry_and_zeroes_one_channel(tmp_path):
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    rng = np.random.default_rng(0)
    for case in ("a", "b"):
        for c in range(3):
            _write(rng.random((4, 5, 6)).astype(np.float32) + 1, str(src / f"{case}_{c:04d}.nii.gz"))
    zero_series_copy(str(src), str(dst), ["a"], channel=1, file_ending=".nii.gz")
    assert sorted(os.listdir(dst)) == ["a_0000.nii.gz", "a_0001.nii.gz", "a_0002.nii.gz"]
    zero = sitk.ReadImage(str(dst / "a_0001.nii.gz"))
    assert not sitk.GetArrayFromImage(zero).any()
    assert zero.GetSpacing() == (1.5, 1.5, 1.5) and zero.GetOrigin() == (1.0, 2.0, 3.0)
    assert sitk.GetArrayFromImage(zero).shape == (4, 5, 6)
    kept = sitk.GetArrayFromImage(sitk.ReadImage(str(dst / "a_0002.nii.gz")))
    assert np.array_equal(kept, sitk.GetArrayFromImage(sitk.ReadImage(str(src / "a_0002.nii.gz"))))


def test_region_dice_counts_label_unions(tmp_path):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    r = np.zeros((4, 4, 4), np.uint8)
    r[0, :2] = 1
    r[1, :2] = 2
    p = r.copy()
    p[1, :2] = 1  # label 2 predicted as label 1: label Dice 0 for 2, the union (1, 2) is perfect
    _write(r, str(ref / "x.nii.gz"))
    _write(p, str(pred / "x.nii.gz"))
    dice = region_dice(str(ref), str(pred), {"background": 0, "edema": 1, "enhancing": 2},
                       {"whole": (1, 2)}, ".nii.gz")
    assert dice["whole"] == pytest.approx(1.0)
    assert dice["enhancing"] == pytest.approx(0.0)
    assert dice["edema"] == pytest.approx(2 * 8 / (8 + 16))


def test_markdown_lists_every_arm_and_the_missing_series_rows():
    d = {"whole tumour": 0.8, "enhancing": 0.5}
    summary = {"dataset": "D", "split": {"labelled": ["a"] * 8, "val": ["b"] * 8},
               "steps": {"finetune": 300, "pretrain": 1000}, "machine": {"cpu": "x", "cores": 2, "torch_threads": 2,
                                                                        "torch": "2"}, "wall_s": 600,
               "arms": {"scratch": {"trainer": "CSMSegTrainer", "pretrained": None,
                                    "dice": {"complete": d, "without T1": {**d, "whole tumour": 0.7}}}}}
    text = markdown(summary)
    assert "| scratch | CSMSegTrainer | - | 0.800 | 0.500 |" in text
    assert "| scratch | 0.800 | 0.700 |" in text


def test_arm_names_and_repeats():
    assert arm_spec("csm") == ARMS["csm"] == arm_spec("csm@2")
    assert arm_spec("csm@1") is None and arm_spec("csm@x") is None and arm_spec("nope") is None
    assert arm_spec("mae@3", "cls") == CLS_ARMS["mae"] and arm_spec("nnunet", "cls") is None


def test_classification_table_and_probability_csv(tmp_path):
    from csm_nnunet.classification import classification_metrics, predictions_csv

    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    path = tmp_path / "p.csv"
    path.write_text(predictions_csv(["c", "a", "b"], probs, ["benign", "malignant"]))
    cases, read = _read_probabilities(str(path), ["benign", "malignant"])
    assert cases == ["c", "a", "b"] and np.allclose(read, probs)
    m = classification_metrics([0, 1, 1], read, ["benign", "malignant"])
    one_class = classification_metrics([1, 1, 1], read, ["benign", "malignant"])
    summary = {"study": "cls", "dataset": "D", "split": {"labelled": ["x"] * 4, "val": ["y"] * 3},
               "steps": {"finetune": 100}, "machine": {}, "wall_s": 60,
               "arms": {"csm": {"trainer": "CSMClassifierTrainer", "pretrained": "CSMPretrainer",
                                "pretrain_steps": 500, "metrics": {"complete": m, "without ADC": one_class}}}}
    text = markdown(summary)
    assert "| csm | CSMClassifierTrainer | CSMPretrainer (500) | 1.000 | 0.667 | 0.500 | 1.000 |" in text
    assert "| csm | 1.000 | n/a |" in text


def test_repeats_share_the_pretraining_run_unless_asked_otherwise():
    import argparse

    from csm_nnunet.experiment import Context

    def ctx(per_repeat: bool) -> Context:
        return Context(argparse.Namespace(pretrain_per_repeat=per_repeat), "", None, "", 0, {}, "", {}, {}, [], {},
                       {}, 0.0)

    assert ctx(False).pretrained_key("csm@3", "CSMPretrainer", "small8") == ("CSMPretrainer", "small8", 1)
    assert ctx(True).pretrained_key("csm@3", "CSMPretrainer", "small8") == ("CSMPretrainer", "small8", 3)
    assert ctx(True).pretrained_key("csm", "CSMPretrainer", "small8") == ("CSMPretrainer", "small8", 1)


def test_repeat_table_mean_and_sd():
    from csm_nnunet.experiment import repeat_table

    lines = repeat_table({"scratch": {"wt": 0.9}, "scratch@2": {"wt": 0.8}, "csm": {"wt": 0.7},
                          "csm@2": {"wt": None}}, ["wt"])
    assert "| scratch | 2 | 0.850 ± 0.071 |" in lines and "| csm | 2 | 0.700 (1) |" in lines
    assert repeat_table({"scratch": {"wt": 0.9}, "csm": {"wt": 0.7}}, ["wt"]) == []


def test_plot_scores_writes_a_png_from_a_results_summary(tmp_path):
    from csm_nnunet.experiment import plot_scores, summary_scores

    summary = {"study": "seg", "arms": {
        "scratch": {"dice": {"complete": {"whole tumour": 0.9, "core": 0.5}}},
        "scratch@2": {"dice": {"complete": {"whole tumour": 0.8, "core": None}}},
        "csm": {"dice": {"complete": {"whole tumour": 0.95, "core": 0.6}}}}}
    scores, cols = summary_scores(summary)
    assert cols == ["whole tumour", "core"] and scores["scratch@2"]["core"] is None
    png = tmp_path / "results_seg.png"
    plot_scores(scores, cols, str(png), "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results_seg.png"]  # no temporary file left
    cls = {"study": "cls", "arms": {"csm": {"metrics": {"complete": {"auc": 0.7, "accuracy": 0.6, "sensitivity": 1.0,
                                                                     "specificity": 0.0}}}}}
    assert summary_scores(cls) == ({"csm": {"auc": 0.7, "accuracy": 0.6, "sensitivity": 1.0, "specificity": 0.0}},
                                   ["auc", "accuracy", "sensitivity", "specificity"])

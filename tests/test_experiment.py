"""Helpers of ``csm_nnunet experiment``: split, missing-series inputs, Dice per label/region, the table."""

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from csm_nnunet.experiment import (
    ARMS,
    CLS_ARMS,
    Runner,
    _read_probabilities,
    arm_spec,
    class_table,
    compute_total,
    held_out_classes,
    machine_line,
    markdown,
    record_timing,
    region_dice,
    reuse_timing,
    wall_note,
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


def test_region_dice_counts_label_unions_and_keeps_each_case(tmp_path):
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
    clean = np.zeros((4, 4, 4), np.uint8)
    clean[2:, :2] = 1  # no label 2 in the reference, none predicted: skipped in label 2's mean
    _write(clean, str(ref / "y.nii.gz"))
    _write(clean, str(pred / "y.nii.gz"))
    dice, cases = region_dice(str(ref), str(pred), {"background": 0, "edema": 1, "enhancing": 2},
                              {"whole": (1, 2)}, ".nii.gz")
    assert dice["whole"] == pytest.approx(1.0)
    assert dice["enhancing"] == pytest.approx(0.0)
    assert dice["edema"] == pytest.approx((2 * 8 / (8 + 16) + 1.0) / 2)
    assert sorted(cases) == ["x", "y"]
    assert cases["x"]["enhancing"] == {"dice": 0.0, "n_ref": 8, "n_pred": 0}
    assert cases["y"]["enhancing"] == {"dice": None, "n_ref": 0, "n_pred": 0}
    assert cases["y"]["whole"] == {"dice": 1.0, "n_ref": 16, "n_pred": 16}


def test_held_out_classes_need_a_label_for_every_held_out_case():
    ds = {"classification_labels": {"a": 0, "b": 1, "c": 1}, "class_names": ["benign", "malignant"]}
    assert held_out_classes(ds, ["a", "c"]) == {"a": "benign", "c": "malignant"}
    assert held_out_classes(ds, ["a", "d"]) == {}
    assert held_out_classes({}, ["a"]) == {}
    assert held_out_classes({"classification_labels": {"a": 2}}, ["a"]) == {"a": "2"}


def test_class_table_separates_found_labels_from_false_ones():
    def rec(dice, n_ref, n_pred):
        return {"enhancing": {"dice": dice, "n_ref": n_ref, "n_pred": n_pred}}

    runs = {  # m1, m2 malignant (rim in the reference), b1, b2 benign (no rim)
        "csm": {"m1": rec(0.8, 10, 9), "m2": rec(0.6, 10, 7), "b1": rec(0.0, 0, 5), "b2": rec(None, 0, 0)},
        "csm@2": {"m1": rec(0.9, 10, 10), "m2": rec(0.9, 10, 10), "b1": rec(0.0, 0, 3), "b2": rec(0.0, 0, 1)},
        "scratch": {"m1": rec(0.0, 10, 0), "m2": rec(0.5, 10, 5), "b1": rec(None, 0, 0), "b2": rec(None, 0, 0)},
    }
    summary = {"case_classes": {"m1": "malignant", "m2": "malignant", "b1": "benign", "b2": "benign"},
               "arms": {arm: {"cases": {"complete": c}} for arm, c in runs.items()}}
    lines = class_table(summary, ["enhancing"])
    assert "| csm | 2 | malignant (2) | 0.800 ± 0.141 |" in lines  # run means 0.7 and 0.9
    assert "| csm | 2 | benign (2) | false in 3/4 |" in lines
    assert "| scratch | 1 | malignant (2) | 0.250 |" in lines
    assert "| scratch | 1 | benign (2) | false in 0/2 |" in lines
    summary["arms"]["old"] = {"dice": {}}  # written before per-case records: no table rather than a partial one
    assert class_table(summary, ["enhancing"]) == []
    assert class_table({"case_classes": {}, "arms": {}}, ["enhancing"]) == []


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
    assert arm_spec("csm~400") == ARMS["csm"] and arm_spec("csm-mask50~100@3", "cls") == CLS_ARMS["csm-mask50"]
    assert arm_spec("csm~400@2") == ARMS["csm"] and arm_spec("csm-mask50~100") == ARMS["csm-mask50"]
    for bad in ("scratch~400", "csm~", "csm~0", "csm~x", "csm~400@1", "csm@"):
        assert arm_spec(bad) is None, bad
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
        return Context(argparse.Namespace(pretrain_per_repeat=per_repeat, pretrain_epochs=50, iters=20), "", None,
                       "", 0, {}, "", {}, {}, [], {}, {}, 0.0)

    assert ctx(False).pretrained_key("csm@3", "CSMPretrainer", "small8") == ("CSMPretrainer", "small8", 1, 50)
    assert ctx(True).pretrained_key("csm@3", "CSMPretrainer", "small8") == ("CSMPretrainer", "small8", 3, 50)
    assert ctx(True).pretrained_key("csm", "CSMPretrainer", "small8") == ("CSMPretrainer", "small8", 1, 50)
    # ~steps: its own pretraining length, rounded up to whole epochs of --iters iterations
    assert ctx(True).pretrained_key("csm~90@2", "CSMPretrainer", "small8") == ("CSMPretrainer", "small8", 2, 5)


def test_finetunes_per_encoder_groups_consecutive_repeats_on_one_pretraining_run():
    import argparse

    from csm_nnunet.experiment import Context, add_arguments, apply_defaults

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = apply_defaults(parser.parse_args(["seg", "--out", "x", "--finetunes-per-encoder", "3"]))
    assert args.pretrain_per_repeat and args.finetunes_per_encoder == 3
    ctx = Context(args, "", None, "", 0, {}, "", {}, {}, [], {}, {}, 0.0)
    runs = [ctx.pretrained_key(arm, "CSMPretrainer", "tiny8")[2]
            for arm in ["csm", "csm@2", "csm@3", "csm@4", "csm@6", "csm@7"]]
    assert runs == [1, 1, 1, 2, 2, 3]
    with pytest.raises(SystemExit):
        parser.parse_args(["seg", "--out", "x", "--finetunes-per-encoder", "0"])


def test_encoder_table_splits_between_and_within_encoder_spread():
    from csm_nnunet.experiment import encoder_table

    enc1 = "results/pretrain_CSMPretrainer_tiny8/D/x/fold_1/c.pth"
    enc2 = "results/pretrain_CSMPretrainer_tiny8@2/D/c.pth"
    arms = {"csm": {"pretrained_checkpoint": enc1}, "csm@2": {"pretrained_checkpoint": enc1},
            "csm@3": {"pretrained_checkpoint": enc2}, "csm@4": {"pretrained_checkpoint": enc2},
            "scratch": {}, "scratch@2": {}}
    scores = {"csm": {"wt": 0.8}, "csm@2": {"wt": 0.6}, "csm@3": {"wt": 0.5}, "csm@4": {"wt": 0.3},
              "scratch": {"wt": 0.9}, "scratch@2": {"wt": 0.1}}
    lines = encoder_table(arms, scores, ["wt"])
    assert "| csm | pretrain_CSMPretrainer_tiny8 | 2 | 0.700 ± 0.141 |" in lines
    assert "| csm | pretrain_CSMPretrainer_tiny8@2 | 2 | 0.400 ± 0.141 |" in lines
    # encoder means 0.7 and 0.4: sd 0.212; residuals +-0.1 in both: pooled sd sqrt(0.04 / 2) = 0.141
    assert "| csm | between | 2 | 0.212 |" in lines and "| csm | within | 4 | 0.141 |" in lines
    assert not any(line.startswith("| scratch") for line in lines)
    # one fine-tuning per encoder: nothing to split
    assert encoder_table({k: v for k, v in arms.items() if k in ("csm", "csm@3")}, scores, ["wt"]) == []


def test_repeat_table_mean_and_sd():
    from csm_nnunet.experiment import repeat_table

    lines = repeat_table({"scratch": {"wt": 0.9}, "scratch@2": {"wt": 0.8}, "csm": {"wt": 0.7},
                          "csm@2": {"wt": None}}, ["wt"])
    assert "| scratch | 2 | 0.850 ± 0.071 |" in lines and "| csm | 2 | 0.700 (1) |" in lines
    assert repeat_table({"scratch": {"wt": 0.9}, "csm": {"wt": 0.7}}, ["wt"]) == []


def test_training_curve_reads_nnunet_logging_and_learning_table_counts_never_learned_runs(tmp_path):
    import torch

    from csm_nnunet.experiment import first_learned_epoch, foreground_names, learning_table, training_curve

    names = foreground_names({"background": 0, "necrosis": 3, "edema": 1, "enhancing": 2})
    assert names == ["edema", "enhancing", "necrosis"]  # nnU-Net logs foreground labels by value
    assert foreground_names({"background": 0, "lesion": 1, "ignore": 2}) == ["lesion"]  # nnU-Net logs no ignore
    assert foreground_names({"background": 0, "whole": [1, 2], "core": [2]}) == ["whole", "core"]  # regions: as given
    # nnU-Net's logger stores numpy floats and NaN for a label absent from the epoch's validation patches
    f = np.float32
    logging = {"train_losses": [f(0.9), f(-0.2), f(-0.4)],
               "dice_per_class_or_region": [[f(0.3), f("nan"), f(0.0)], [f(0.6), f(0.1), f(0.0)],
                                            [f(0.7), f(0.55), f(0.2)]]}
    torch.save({"network_weights": {}, "logging": logging}, tmp_path / "checkpoint_final.pth")
    curve = training_curve(str(tmp_path / "checkpoint_final.pth"), names)
    assert curve["pseudo_dice"][0][1] is None and curve["train_loss"] == [0.9, -0.2, -0.4]
    assert [first_learned_epoch(curve, n) for n in names] == [2, 3, None]
    # a log whose width does not match the labels is not a curve of this dataset
    assert training_curve(str(tmp_path / "checkpoint_final.pth"), names[:2]) is None

    def run(first):  # one label, learned at epoch ``first`` (None: never) of 10
        return {"training": {"labels": ["core"], "pseudo_dice": [[0.6 if first is not None and e >= first else 0.0]
                                                                 for e in range(1, 11)]}}
    arms = {"csm": run(4), "csm@2": run(None), "csm@3": run(7),
            "scratch": run(2), "scratch@2": run(None), "scratch@3": run(None), "nnunet": {}}
    lines = learning_table(arms)
    # half of 3 runs is 2: csm's second-earliest learner took epoch 7; scratch has one learner, so ">10"
    assert "| csm | 3 | 10 | 2/3, 7 |" in lines and "| scratch | 3 | 10 | 1/3, >10 |" in lines
    assert not any(line.startswith("| nnunet") for line in lines)
    assert learning_table({"nnunet": {}}) == []


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


def test_label_fractions_are_nested_folds_after_the_two_fixed_ones(tmp_path):
    cases = [f"case_{i:03d}" for i in range(24)]
    split = write_splits(str(tmp_path), cases, n_val=4, n_labelled=3, seed=1, fractions=(10, 50, 100))
    folds = json.load(open(tmp_path / "splits_final.json"))
    assert len(folds) == 5 and folds[0]["train"] == split["labelled"] and folds[1]["train"] == split["pretraining"]
    f10, f50, f100 = (split["fractions"][k] for k in ("10", "50", "100"))
    assert [len(f10), len(f50), len(f100)] == [2, 10, 20]
    assert set(f10) < set(f50) < set(f100) == set(split["pretraining"])
    assert [fold["train"] for fold in folds[2:]] == [f10, f50, f100]
    assert all(fold["val"] == split["val"] for fold in folds)
    assert split["fraction_folds"] == {"10": 2, "50": 3, "100": 4}
    # one fraction again (or a new one) keeps the folds the first invocation's results folders refer to
    again = write_splits(str(tmp_path), cases, n_val=4, n_labelled=3, seed=1, fractions=(25, 100))
    assert again["fraction_folds"] == {"25": 5, "100": 4} and again["fractions"]["100"] == f100
    assert json.load(open(tmp_path / "splits_final.json"))[:5] == folds
    # another held-out set starts the folds afresh
    other = write_splits(str(tmp_path), cases, n_val=5, n_labelled=3, seed=1, fractions=(100,))
    assert other["fraction_folds"] == {"100": 2} and len(json.load(open(tmp_path / "splits_final.json"))) == 3
    tiny = write_splits(str(tmp_path), cases[:5], n_val=2, n_labelled=1, seed=1, fractions=(10,))
    assert len(tiny["fractions"]["10"]) == 1  # at least one labelled case
    with pytest.raises(ValueError, match="percentages"):
        write_splits(str(tmp_path), cases, 4, 3, seed=1, fractions=(0,))
    # with class labels the nested subsets take the classes in turn: 2 cases = one of each class
    strata = {c: int(i % 4 == 0) for i, c in enumerate(cases)}  # a quarter malignant
    for seed in range(5):
        strat = write_splits(str(tmp_path), cases, 4, 3, seed=seed, fractions=(10, 50, 100), strata=strata)
        f10, f50 = strat["fractions"]["10"], strat["fractions"]["50"]
        assert sorted(strata[c] for c in f10) == [0, 1] and set(f10) < set(f50)
        assert sorted(strat["fractions"]["100"]) == strat["pretraining"]
        assert strat["labelled"] == write_splits(str(tmp_path), cases, 4, 3, seed=seed)["labelled"]


def test_seeds_expand_every_arm_seed_major_and_ablation_arms_exist():
    import importlib

    from csm_nnunet.experiment import ABLATIONS, GRID_ARMS, _percentages, expand_seeds

    assert expand_seeds(["csm", "scratch"], 3) == ["csm", "scratch", "csm@2", "scratch@2", "csm@3", "scratch@3"]
    assert expand_seeds(["csm", "fused@4"], 2) == ["csm", "csm@2", "fused@4"]
    assert expand_seeds(["csm"], 1) == ["csm"]
    with pytest.raises(ValueError, match="--seeds 0"):
        expand_seeds(["csm"], 0)
    ablations = importlib.import_module("csm_nnunet.trainers.csm_pretrainer_ablations")
    for study, arms in GRID_ARMS.items():
        for arm in arms.split(","):
            trainer, pretrainer, _ = arm_spec(arm, study)
            if arm in ABLATIONS:
                assert pretrainer == ABLATIONS[arm] and hasattr(ablations, pretrainer)
                assert trainer == ("CSMSegTrainer" if study == "seg" else "CSMClassifierTrainer")
    assert arm_spec("nnunet", "cls") is None and "nnunet" not in GRID_ARMS["cls"].split(",")
    assert _percentages("50,10,100") == [10, 50, 100]
    for bad in ("0,50", "10,10", "ten", "101"):
        with pytest.raises(Exception, match="percentages"):
            _percentages(bad)


def _grid_summary(study: str) -> dict:
    def seg(wt, core):
        return {"dice": {"complete": {"whole tumour": wt, "tumour core": core}}}

    def cls(auc):
        return {"metrics": {"complete": {"auc": auc, "accuracy": 0.5, "sensitivity": 1.0, "specificity": 0.0}}}

    make = seg if study == "seg" else (lambda wt, core: cls(wt))
    return {"study": study, "dataset": "D", "grid": True, "preset": "tiny", "seeds": 2, "pretrain_per_repeat": True,
            "split": {"val": ["v"] * 4, "pretraining": ["p"] * 20}, "steps": {"pretrain": 100, "finetune": 50},
            "machine": {"cpu": "x", "cores": 2, "torch_threads": 2, "torch": "2", "device": "cpu"}, "wall_s": 120,
            "regions": {"whole tumour": [1, 2, 3], "tumour core": [2, 3]} if study == "seg" else {},
            "fractions": {"10": {"labelled": 2, "arms": {"csm": make(0.5, 0.2), "csm@2": make(0.7, None),
                                                         "scratch": make(0.4, 0.1)}},
                          "100": {"labelled": 20, "arms": {"csm": make(0.9, 0.6), "csm@2": make(0.8, 0.5)}}}}


def test_grid_table_and_plot_report_mean_sd_per_arm_and_fraction(tmp_path):
    from csm_nnunet.experiment import grid_scores, markdown_grid, plot_grid

    summary = _grid_summary("seg")
    scores = grid_scores(summary)
    assert scores["whole tumour"]["csm"] == {"10": [0.5, 0.7], "100": [0.9, 0.8]}
    assert scores["tumour core"]["csm"]["10"] == [0.2]
    text = markdown_grid(summary)
    assert "| arm | 10 % (2 cases) | 100 % (20 cases) |" in text
    assert "| csm | 0.600 ± 0.141 | 0.850 ± 0.071 |" in text  # whole tumour
    assert "| csm | 0.200 (1 of 2) | 0.550 ± 0.071 |" in text  # tumour core: one seed undefined
    assert "| scratch | 0.400 | n/a |" in text
    # counted from the results (csm, csm@2; scratch once), not taken from "seeds"
    assert "; 1-2 runs per arm, each with its own pretraining run." in text
    plot_grid(summary, str(tmp_path / "grid.png"))
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cls_text = markdown_grid(_grid_summary("cls"))
    assert "**auc**" in cls_text and "| csm | 0.600 ± 0.141 | 0.850 ± 0.071 |" in cls_text


def test_grid_flag_fills_arms_fractions_and_seeds_unless_given():
    import argparse

    from csm_nnunet.experiment import GRID_ARMS, add_arguments, apply_defaults

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    grid = apply_defaults(parser.parse_args(["cls", "--out", "x", "--grid"]))
    assert (grid.arms, grid.fractions, grid.seeds, grid.pretrain_per_repeat) == (GRID_ARMS["cls"], [10, 50, 100], 3,
                                                                                  True)
    assert grid.kind == "prostate" and grid.val == 16
    narrowed = apply_defaults(parser.parse_args(["seg", "--out", "x", "--grid", "--arms", "csm,scratch",
                                                 "--fractions", "100,10", "--seeds", "2"]))
    assert (narrowed.arms, narrowed.fractions, narrowed.seeds) == ("csm,scratch", [10, 100], 2)
    plain = apply_defaults(parser.parse_args(["seg", "--out", "x"]))
    assert (plain.fractions, plain.seeds, plain.pretrain_per_repeat) == (None, 1, False)
    with pytest.raises(SystemExit):
        parser.parse_args(["seg", "--out", "x", "--fractions", "0,10"])


def test_atomically_saved_figures_get_the_usual_file_mode(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from csm_nnunet.visualize import save_figure_atomically

    old = os.umask(0o022)
    try:
        fig, _ = plt.subplots()
        save_figure_atomically(fig, str(tmp_path / "f.png"))
    finally:
        os.umask(old)
    assert (tmp_path / "f.png").stat().st_mode & 0o777 == 0o644  # mkstemp alone gives 0600
    assert os.listdir(tmp_path) == ["f.png"]


def test_run_times_outlive_the_invocation_that_measured_them(tmp_path):
    """A later invocation reuses finished runs; their times come back from <out>/timings.json, so the tables' compute
    total covers every run behind them. A run older than the ledger counts as untimed, not as zero."""
    out = str(tmp_path)
    first: dict = {}
    record_timing(out, first, "train csm_f50", 300.04)
    record_timing(out, first, "pretrain CSMPretrainer_tiny8", 120.0)
    assert first == {"train csm_f50": 300.04, "pretrain CSMPretrainer_tiny8": 120.0}
    later: dict = {}
    reuse_timing(out, later, "train csm_f50")
    reuse_timing(out, later, "train scratch_f50")  # finished before times were kept
    record_timing(out, later, "train csm-layerdecay_f50", 280.0)
    assert later == {"train csm_f50": 300.0, "train scratch_f50": None, "train csm-layerdecay_f50": 280.0}
    assert compute_total(later) == (580.0, 1)
    note = wall_note({"wall_s": 300, "compute_s": 580.0, "untimed_runs": 1})
    assert "5 min (this invocation)" in note and "10 min summed" in note and "1 run(s)" in note
    assert wall_note({"wall_s": 120}) == "wall time 2 min."
    scoped = wall_note({"wall_s": 60, "compute_s": 60.0, "wall_scope": "this label fraction in this invocation"})
    assert "1 min (this label fraction in this invocation)" in scoped
    with open(tmp_path / "timings.json") as f:
        assert json.load(f)["train csm-layerdecay_f50"] == 280.0


def test_the_results_keep_every_invocation_that_added_to_them(tmp_path):
    """A --resume adds arms to a folder's results over several invocations, possibly on other machines; the
    top-level ``machine`` and ``wall_s`` describe only the newest. ``invocations`` keeps each one with the runs it ran
    itself (not those it reused), once however often it rewrote the file, and starts over without --resume."""
    import argparse
    import dataclasses

    from csm_nnunet.experiment import Context, write_grid

    def fake_run(cmd, results, extra=None, log_name="", epochs=None):
        return 30.0

    def fraction(timings: dict) -> dict:
        arms = {"csm": {"metrics": {"complete": {"auc": 0.8, "accuracy": 0.7, "sensitivity": 1.0, "specificity": 0.5}}}}
        return {"split": {"labelled": ["a", "b"]}, "fold": 2, "arms": arms, "timings_s": timings,
                "machine": {"cpu": "x", "cores": 2, "torch_threads": 2, "torch": "2", "device": "cpu"}}

    args = argparse.Namespace(study="cls", preset="tiny", seeds=1, pretrain_per_repeat=False, resume=True, crop=None,
                              finetune_lr=None, epochs=3, iters=2, pretrain_epochs=5, threads=2, device="cpu",
                              arms="csm")
    ckpt = {("CSMPretrainer", "tiny", 1, 5): str(tmp_path / "pre" / "checkpoint_final.pth")}
    split = {"val": ["v"], "pretraining": ["p"], "fractions": {"10": ["a", "b"]}}
    first = Context(args, str(tmp_path), fake_run, "D", 1, {}, ".nii.gz", split, {"pretrain": 10, "finetune": 6},
                    ["csm"], ckpt, {}, 1000.0, fold=2, tag="_f10")
    first.train_arm("csm", "CSMClassifierTrainer", "CSMPretrainer", "tiny")
    assert first.ran == ["train cls_csm_f10"]
    write_grid(first, {"10": fraction(first.timings)})
    summary = write_grid(first, {"10": fraction(first.timings)})  # rewritten after the next fraction: still one
    (call,) = summary["invocations"]
    assert call["ran"] == ["train cls_csm_f10"] and call["started"].startswith("1970-01-01T00:16:40")
    assert call["options"]["arms"] == "csm" and call["machine"]["torch_threads"] == 2

    # the next invocation finds the fine-tuning finished (its checkpoint exists) and reuses it
    fold = tmp_path / "results" / "cls_csm_f10" / "D" / "CSMClassifierTrainer__nnUNetCSMPlans__3d_fullres" / "fold_2"
    fold.mkdir(parents=True)
    (fold / "checkpoint_final.pth").write_bytes(b"")
    later = dataclasses.replace(first, timings={}, t_start=2000.0, ran=[],
                                args=argparse.Namespace(**{**vars(args), "arms": "csm,scratch"}))
    later.train_arm("csm", "CSMClassifierTrainer", "CSMPretrainer", "tiny")
    later.train_arm("scratch", "CSMClassifierTrainer", None, "tiny")
    assert later.timings["train cls_csm_f10"] == 30.0 and later.ran == ["train cls_scratch_f10"]
    summary = write_grid(later, {"10": fraction(later.timings)})
    assert [c["ran"] for c in summary["invocations"]] == [["train cls_csm_f10"], ["train cls_scratch_f10"]]
    assert summary["invocations"][1]["options"]["arms"] == "csm,scratch"
    fresh = dataclasses.replace(later, t_start=3000.0, args=argparse.Namespace(**{**vars(args), "resume": False}))
    assert len(write_grid(fresh, {"10": fraction(later.timings)})["invocations"]) == 1


def test_a_resume_of_results_written_before_invocations_were_recorded_keeps_an_entry_for_their_arms(tmp_path):
    """Results files older than the ``invocations`` list hold arms that no entry described: a --resume then listed
    only itself, as if it had run them all. The kept entry says what the file held and what it last named."""
    import argparse

    from csm_nnunet.experiment import Context, kept_invocations, write_grid

    machine = {"cpu": "old", "cores": 2, "torch_threads": 2, "torch": "2", "device": "cpu"}
    legacy = {"arms": {"scratch": {}, "csm": {}}, "machine": machine, "wall_s": 600.0}
    (entry,) = kept_invocations(legacy)
    assert entry["held"] == ["csm", "scratch"] and entry["started"] is None and entry["ran"] is None
    assert entry["machine"] == machine and entry["wall_s"] == 600.0
    recorded = {"arms": {"csm": {}}, "invocations": [{"started": "x", "ran": ["train csm"]}]}
    assert kept_invocations(recorded) == recorded["invocations"] and kept_invocations({}) == []
    assert kept_invocations({"arms": {}, "machine": machine}) == []

    args = argparse.Namespace(study="seg", preset="tiny", seeds=1, pretrain_per_repeat=False, resume=True, crop=None,
                              finetune_lr=None, threads=2, device="cpu", arms="csm")
    split = {"val": ["v"], "pretraining": ["p"], "fractions": {"10": ["a", "b"]}}
    ctx = Context(args, str(tmp_path), None, "D", 1, {}, ".nii.gz", split, {"pretrain": 8, "finetune": 4}, ["csm"],
                  {}, {}, 1000.0, fold=2, tag="_f10")
    results = tmp_path / "results_f10.json"
    results.write_text(json.dumps(legacy))
    summary = ctx.summary(str(results))
    assert summary["invocations"][0]["held"] == ["csm", "scratch"]
    assert summary["invocations"][0]["machine"]["cpu"] == "old" and summary["machine"]["cpu"] != "old"

    grid = {"fractions": {"10": {"arms": {"csm": {}}}}, "machine": machine, "wall_s": 60.0}
    (tmp_path / "results_grid.json").write_text(json.dumps(grid))
    fraction = {"split": {"labelled": ["a", "b"]}, "fold": 2, "timings_s": {}, "machine": machine,
                "arms": {"csm": {"dice": {"complete": {"1": 0.5}}}}}
    old, new = write_grid(ctx, {"10": fraction})["invocations"]
    assert old["held"] == {"10": ["csm"]} and new["started"].startswith("1970-01-01T00:16:40")


def test_every_arm_names_a_trainer_nnunet_can_find():
    """An arm whose trainer is not exported by ``csm_nnunet.trainers`` (what the discovery shim re-exports) would
    only fail inside ``nnUNetv2_train``, minutes into an experiment."""
    import csm_nnunet.trainers as trainers

    named = {spec[0] for spec in ARMS.values()} | {spec[0] for spec in CLS_ARMS.values()}
    missing = sorted(t for t in named if t not in trainers.__all__ or not hasattr(trainers, t))
    assert not missing, missing


def test_a_resumed_grid_keeps_the_pretraining_times_behind_earlier_arms(tmp_path):
    """An invocation that only adds a scratch arm pretrains nothing; the grid still shows the CSM arms of the earlier
    invocation, so its compute total must still count their pretraining (it printed 71 instead of 119 min once)."""
    import argparse
    import dataclasses

    from csm_nnunet.experiment import Context, write_grid

    def fraction(timings: dict) -> dict:
        arms = {"csm": {"metrics": {"complete": {"auc": 0.8, "accuracy": 0.7, "sensitivity": 1.0, "specificity": 0.5}}}}
        return {"split": {"labelled": ["a", "b"]}, "fold": 2, "arms": arms, "timings_s": timings,
                "machine": {"cpu": "x", "cores": 2, "torch_threads": 2, "torch": "2", "device": "cpu"}}

    args = argparse.Namespace(study="cls", preset="tiny", seeds=1, pretrain_per_repeat=True, resume=True, crop=None)
    ctx = Context(args, str(tmp_path), None, "D", 1, {}, ".nii.gz",
                  {"val": ["v"], "pretraining": ["p"], "fractions": {"10": ["a", "b"]}}, {"pretrain": 8, "finetune": 4},
                  ["csm"], {}, {"plan_and_preprocess": 60.0, "pretrain CSMPretrainer_tiny": 600.0}, 0.0)
    assert write_grid(ctx, {"10": fraction({"train csm_f10": 100.0})})["compute_s"] == 760.0
    added = dataclasses.replace(ctx, timings={"plan_and_preprocess": 60.0})  # the scratch arm's invocation
    summary = write_grid(added, {"10": fraction({"train csm_f10": 100.0, "train scratch_f10": 90.0})})
    assert summary["timings_s"]["pretrain CSMPretrainer_tiny"] == 600.0 and summary["compute_s"] == 850.0
    fresh = dataclasses.replace(added, args=argparse.Namespace(**{**vars(args), "resume": False}))
    assert write_grid(fresh, {"10": fraction({"train scratch_f10": 90.0})})["compute_s"] == 150.0


def test_a_grid_resumed_with_other_fractions_keeps_the_columns_earlier_invocations_finished(tmp_path, monkeypatch):
    """``--fractions 100`` after ``--fractions 10,50,100`` (to add runs at 100 %) wrote a grid of 100 % alone; the
    10 and 50 % results were still in the folder. A resumed grid keeps them while they match the folder's split."""
    import argparse

    from csm_nnunet import experiment as ex

    cases = [f"case_{i:03d}" for i in range(24)]
    (tmp_path / "preprocessed" / "D").mkdir(parents=True)
    machine = {"cpu": "x", "cores": 2, "torch_threads": 2, "torch": "2", "device": "cpu"}
    auc = {"10": 0.6, "25": 0.65, "50": 0.7, "100": 0.9}

    def fake_study(sub: ex.Context) -> dict:  # what run_classification writes per fraction, without training
        pct = sub.tag[len("_f"):]
        summary = {"split": {"val": sub.split["val"], "labelled": sub.split["labelled"]}, "fold": sub.fold,
                   "steps": sub.steps, "machine": machine, "timings_s": {f"train cls_csm{sub.tag}": 10.0},
                   "arms": {"csm": {"metrics": {"complete": dict(auc=auc[pct], accuracy=0.5, sensitivity=1.0,
                                                                         specificity=0.0)}}}}
        (tmp_path / f"results_cls{sub.tag}.json").write_text(json.dumps(summary))
        return summary

    def grid(fractions: tuple[int, ...], resume: bool = True, seed: int = 1, finetune: int = 4) -> dict:
        args = argparse.Namespace(study="cls", preset="tiny", seeds=1, pretrain_per_repeat=True, resume=resume,
                                  crop=None, finetune_lr=None)
        split = ex.write_splits(str(tmp_path / "preprocessed" / "D"), cases, 4, 3, seed, fractions)
        ctx = ex.Context(args, str(tmp_path), None, "D", 1, {}, ".nii.gz", split,
                         {"pretrain": 8, "finetune": finetune}, ["csm"], {}, {}, 0.0)
        monkeypatch.setattr(ex, "prepare", lambda _: ctx)
        return ex.run_experiment(args)

    monkeypatch.setattr(ex, "run_classification", fake_study)
    assert list(grid((10, 50, 100))["fractions"]) == ["10", "50", "100"]
    again = grid((100,))
    assert list(again["fractions"]) == ["10", "50", "100"] and again["compute_s"] == 30.0
    assert {pct: f["fold"] for pct, f in again["fractions"].items()} == {"10": 2, "50": 3, "100": 4}
    assert again["split"]["fractions"]["50"] == json.loads((tmp_path / "results_cls_f50.json").read_text())[
        "split"]["labelled"]
    assert "| csm | 0.600 | 0.700 | 0.900 |" in (tmp_path / "results_grid_cls.md").read_text()
    assert list(grid((25,))["fractions"]) == ["10", "25", "50", "100"]  # a new fraction goes in label order
    assert list(grid((25,), resume=False)["fractions"]) == ["25"]
    # results that no longer describe the folder are not carried: other fine-tuning steps, then another split
    assert list(grid((10,), finetune=8)["fractions"]) == ["10"]
    grid((10, 50, 100))
    assert list(grid((100,), seed=2)["fractions"]) == ["100"]


def test_finetune_lr_reaches_the_fine_tuning_runs_only_under_their_own_names(tmp_path):
    """``--finetune-lr`` must change the fine-tuning runs' lr (CSM_LR in their environment) and nothing else, and
    put them beside the default-lr runs of the same work folder rather than on top of them: own results folder, log
    and timing key (a shared key would let one overwrite the other's time in timings.json)."""
    import argparse

    from csm_nnunet.experiment import Context, add_arguments, settings_note, variant_tag, wall_note

    calls: list[tuple[list[str], str, dict, str]] = []

    def fake_run(cmd, results, extra=None, log_name="", epochs=None):
        calls.append((cmd, results, dict(extra or {}), log_name))
        return 12.5

    def context(**over) -> Context:
        args = argparse.Namespace(**{"study": "cls", "crop": 24, "finetune_lr": 1e-3, "epochs": 3, "iters": 2,
                                     "device": "cpu", "pretrain_per_repeat": False, "pretrain_epochs": 5, **over})
        ckpt = {("CSMPretrainer", "tiny8", 1, 5): str(tmp_path / "pre" / "checkpoint_final.pth")}
        return Context(args, str(tmp_path), fake_run, "Dataset901_X", 901, {}, ".nii.gz", {}, {"finetune": 6},
                       ["csm"], ckpt, {}, 0.0, fold=2, tag="_f10")

    ctx = context()
    results, res = ctx.train_arm("csm", "CSMClassifierTrainer", "CSMPretrainer", "tiny8")
    cmd, folder, extra, log_name = calls[-1]
    assert os.path.basename(results) == "cls_crop24_lr0.001_csm_f10" == os.path.basename(folder)
    assert extra["CSM_LR"] == "0.001" and extra["CSM_CROP"] == "24" and "-pretrained_weights" in cmd
    assert log_name == "train_cls_crop24_lr0.001_csm_f10" and res["finetune_lr"] == 1e-3
    assert ctx.timings == {"train cls_crop24_lr0.001_csm_f10": 12.5}

    default = context(finetune_lr=None)
    default.train_arm("csm", "CSMClassifierTrainer", "CSMPretrainer", "tiny8")
    assert "CSM_LR" not in calls[-1][2] and calls[-1][3] == "train_cls_crop24_csm_f10"
    seg = context(study="seg", finetune_lr=None)  # --crop is a classifier setting: no suffix for seg
    assert seg.run_name("csm") == "csm_f10" and variant_tag(seg.args) == ""
    assert context(study="seg").run_name("scratch") == "scratch_lr0.001_f10"

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["cls", "--out", "x", "--finetune-lr", "2e-3"]).finetune_lr == 2e-3
    for bad in ("0", "1.5", "fast"):
        with pytest.raises(SystemExit):
            parser.parse_args(["cls", "--out", "x", "--finetune-lr", bad])

    footer = wall_note({"wall_s": 60, "finetune_lr": 1e-3, "environment": {"CSM_MASK_SEED": "7"}})
    assert "min. Fine-tuning peak lr 0.001 (--finetune-lr); set in" in footer and "CSM_MASK_SEED=7" in footer
    assert settings_note({"finetune_lr": None, "environment": {}}) == ""


def test_augmentation_workers_none_on_cpu_nnunets_default_on_cuda_and_the_users_value_wins(tmp_path, monkeypatch):
    """On 2 CPU cores worker processes cost more than they give, so the runner turns them off there; on CUDA the
    main process must not augment while the GPU waits, so nnU-Net picks its own number. A value the user exported is
    nnU-Net's documented knob and is kept on either device."""
    monkeypatch.delenv("nnUNet_n_proc_DA", raising=False)
    assert Runner(str(tmp_path), 2, "cpu").env("r")["nnUNet_n_proc_DA"] == "0"
    assert "nnUNet_n_proc_DA" not in Runner(str(tmp_path), 16, "cuda").env("r")
    assert Runner(str(tmp_path), 16, "cuda").env("r", {"nnUNet_n_proc_DA": "1"})["nnUNet_n_proc_DA"] == "1"
    monkeypatch.setenv("nnUNet_n_proc_DA", "3")
    for device in ("cpu", "cuda"):
        assert Runner(str(tmp_path), 2, device).env("r")["nnUNet_n_proc_DA"] == "3"
    assert Runner(str(tmp_path), 2).preprocessing_processes == "1"
    assert Runner(str(tmp_path), 16).preprocessing_processes == "8"
    line = machine_line({"cpu": "x", "cores": 16, "torch_threads": 16, "da_workers": 12, "torch": "2",
                         "device": "cuda", "gpu": "NVIDIA H200"})
    assert line == ("Machine: x (16 cores, 16 torch threads, 12 augmentation workers), torch 2, "
                    "device cuda (NVIDIA H200)")
    assert "augmentation" not in machine_line({"cpu": "x", "cores": 2, "torch_threads": 2, "da_workers": 0})


def test_steps_without_epochs_show_a_heartbeat_instead_of_silence(monkeypatch, capsys):
    """Planning and prediction take a minute or more on 2 cores: off a terminal, one line per minute elapsed."""
    from csm_nnunet import experiment as ex

    now = {"t": 1000.0}
    monkeypatch.setattr(ex.time, "time", lambda: now["t"])
    shown = -1
    printed = []
    for elapsed in (2, 30, 59, 61, 90, 119, 125, 200):
        now["t"] = 1000.0 + elapsed
        shown = ex._show_elapsed(1000.0, shown)
        printed.append(capsys.readouterr().out.strip())
    assert printed == ["", "", "", "running     61 s", "", "", "running    125 s", "running    200 s"]

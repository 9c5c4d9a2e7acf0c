"""End to end through nnU-Net's own, unmodified console scripts, as a user runs them after ``pip install``.

Synthetic data (our generator) and real MRI: ../shared/data/Dataset801_OpenMSLesjak2mm (3 MS patients, T1, T1POST,
T2, FLAIR; CC-BY; Lesjak et al., "A Novel Public MR Image Dataset of Multiple Sclerosis Patients With Lesion
Segmentations Based on Multi-rater Consensus", Neuroinformatics 16:51-63, 2018).

Runs are tiny (CSM_PRESET=tiny, a few iterations) so the suite fits CI on 2 CPU cores.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from e2e_helpers import BIN, REAL, SEG, SHORT, fold_dir, log_text, plan, predict, run, train, write_splits


def test_doctor_finds_everything(nnunet_env):
    proc = run(["csm_nnunet", "doctor"], nnunet_env)
    assert "0 failed" in proc.stdout, proc.stdout
    assert run([str(BIN / "python"), "-m", "csm_nnunet", "doctor", "--quiet"], nnunet_env).returncode == 0


def test_csm_planner_plans_token_multiples(synthetic):
    plans = json.loads((Path(synthetic["nnUNet_preprocessed"]) / "Dataset990_CSMSynth" /
                        "nnUNetCSMPlans.json").read_text())
    patch = plans["configurations"]["3d_fullres"]["patch_size"]
    assert all(p % 16 == 0 for p in patch), patch


def test_pretrain_resume_and_artifacts(synthetic):
    env = synthetic
    folder = fold_dir(env, "Dataset990_CSMSynth", "CSMPretrainer", "nnUNetCSMPlans")
    train(env, 990, "CSMPretrainer", "nnUNetCSMPlans")
    final = folder / "checkpoint_final.pth"
    assert final.is_file() and (folder / "checkpoint_best.pth").is_file() and (folder / "progress.png").is_file()
    assert list((folder / "snapshots").glob("reconstruction_epoch_*.png"))
    assert not list(folder.glob("*.tmp")), "a temporary checkpoint was left behind"
    assert not (folder / "validation").exists(), "a pretrainer must not export segmentations"
    ckpt = torch.load(final, map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == "CSMPretrainer" and ckpt["current_epoch"] == 2
    assert ckpt["csm_network"]["series_names"] == ["T1", "T1ce", "T2", "FLAIR"]
    assert len(ckpt["logging"]["train_losses"]) == 2 and len(ckpt["logging"]["val_losses"]) == 2
    text = log_text(folder)
    assert "num_epochs = 2 (from environment" in text and "preset = 'tiny'" in text
    # --c continues from the final checkpoint when more epochs are asked for
    train(env, 990, "CSMPretrainer", "nnUNetCSMPlans", {"CSM_NUM_EPOCHS": "3"}, ("--c",))
    ckpt = torch.load(final, map_location="cpu", weights_only=False)
    assert ckpt["current_epoch"] == 3 and len(ckpt["logging"]["train_losses"]) == 3
    epochs = re.findall(r": Epoch (\d+)\s*$", log_text(folder), re.M)
    assert epochs == ["0", "1", "2"], epochs  # epoch 2 ran after resuming; 0 and 1 were not repeated


OVERFIT_SCRIPT = """
import json, random, numpy, torch
from nnunetv2.run.run_training import get_trainer_from_args
# seeded: weights and the batch were drawn afresh each run, and one CI run fell 30 % short (0.704 of the first loss)
torch.manual_seed(0); numpy.random.seed(0); random.seed(0)
trainer = get_trainer_from_args("990", "3d_fullres", "all", "CSMPretrainer", "nnUNetCSMPlans",
                                device=torch.device("cpu"))
trainer.on_train_start()
batch = next(trainer.dataloader_train)
missing = trainer.dataset_json["missing_series"]
present = trainer._present(batch["keys"])
expected = [[name not in missing.get(str(k), []) for name in trainer.series_names] for k in batch["keys"]]
assert present.tolist() == expected, (present, expected)
losses = []
for _ in range(25):
    trainer._mask_generator.manual_seed(0)  # the same batch and the same masks every step: an overfit
    losses.append(float(trainer.train_step(batch)["loss"]))
trainer.on_train_end()
print(json.dumps(losses))
"""


def test_reconstruction_loss_falls_on_a_short_overfit(synthetic):
    """nnU-Net's own trainer factory, dataloader and our train_step on one fixed batch: the loss must fall."""
    proc = run([str(BIN / "python"), "-c", OVERFIT_SCRIPT], {**synthetic, **SHORT, "CSM_NUM_EPOCHS": "1"})
    losses = json.loads(proc.stdout.strip().splitlines()[-1])
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("trainer", ["CSMPretrainer_SamePositionMask", "CSMPretrainer_SeriesMaskNoRecon",
                                     "CSMPretrainer_Mask50", "CSMPretrainer_NormPix",
                                     "CSMPretrainer_LR5e3", "MAEPretrainer"])
def test_variants_run_through_nnunet(synthetic, trainer):
    train(synthetic, 990, trainer, "nnUNetCSMPlans", {"CSM_NUM_EPOCHS": "1", "CSM_ITERS_PER_EPOCH": "1"})
    folder = fold_dir(synthetic, "Dataset990_CSMSynth", trainer, "nnUNetCSMPlans")
    ckpt = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == trainer
    assert ckpt["csm_network"]["fused"] == (trainer == "MAEPretrainer")
    peak = {group["initial_lr"] for group in ckpt["optimizer_state"]["param_groups"]}
    assert peak == ({5e-3} if trainer == "CSMPretrainer_LR5e3" else {1e-3})


def test_real_mri_with_csm_plans(real):
    train(real, 801, "CSMPretrainer", "nnUNetCSMPlans")
    folder = fold_dir(real, REAL.name, "CSMPretrainer", "nnUNetCSMPlans")
    ckpt = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["csm_network"]["series_names"] == ["T1", "T1POST", "T2", "FLAIR"]


def test_real_mri_with_existing_nnunet_plans_and_odd_patch(real):
    """Drops into plans people already have; a patch that is no token multiple is rounded down and logged."""
    plans_file = Path(real["nnUNet_preprocessed"]) / REAL.name / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    cfg = plans["configurations"]["3d_fullres"]
    cfg["patch_size"] = [56, 72, 64]
    plans["plans_name"] = "nnUNetPlansOdd"
    (plans_file.parent / "nnUNetPlansOdd.json").write_text(json.dumps(plans))
    train(real, 801, "CSMPretrainer", "nnUNetPlans")
    train(real, 801, "CSMPretrainer", "nnUNetPlansOdd", {"CSM_NUM_EPOCHS": "1", "CSM_ITERS_PER_EPOCH": "1"})
    folder = fold_dir(real, REAL.name, "CSMPretrainer", "nnUNetPlansOdd")
    assert "sampling [48, 64, 64] instead" in log_text(folder)
    ckpt = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["csm_network"]["patch_size"] == [48, 64, 64]


def test_patch_smaller_than_a_token_fails_cleanly(real):
    plans_file = Path(real["nnUNet_preprocessed"]) / REAL.name / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    plans["configurations"]["3d_fullres"]["patch_size"] = [8, 64, 64]
    plans["plans_name"] = "nnUNetPlansTiny"
    (plans_file.parent / "nnUNetPlansTiny.json").write_text(json.dumps(plans))
    proc = train(real, 801, "CSMPretrainer", "nnUNetPlansTiny", check=False)
    assert proc.returncode != 0
    assert "smaller than one token (16^3) on axis [0]" in proc.stderr and "CSMPlanner" in proc.stderr
    assert not (Path(real["nnUNet_results"]) / REAL.name / "CSMPretrainer__nnUNetPlansTiny__3d_fullres").exists()


def test_2d_configuration_is_refused(real):
    proc = run(["nnUNetv2_train", "801", "2d", "all", "-tr", "CSMPretrainer", "-device", "cpu"],
               {**real, **SHORT}, check=False)
    assert proc.returncode != 0
    assert "csm-nnunet's ViTs are 3D only (2D is not supported)" in proc.stderr
    assert not (Path(real["nnUNet_results"]) / REAL.name / "CSMPretrainer__nnUNetPlans__2d").exists()


def test_stale_preprocessing_with_other_channel_count_is_named(real):
    """dataset.json edited after preprocessing: the data on disk has 4 channels, dataset.json now lists 3."""
    pre = Path(real["nnUNet_preprocessed"])
    stale = pre / "Dataset803_OpenMSStale"
    shutil.copytree(pre / REAL.name, stale)
    ds = json.loads((stale / "dataset.json").read_text())
    ds["channel_names"] = {"0": "T1", "1": "T2", "2": "FLAIR"}
    (stale / "dataset.json").write_text(json.dumps(ds))
    plans = json.loads((stale / "nnUNetPlans.json").read_text())
    plans["dataset_name"] = stale.name
    (stale / "nnUNetPlans.json").write_text(json.dumps(plans))
    proc = train(real, 803, "CSMPretrainer", "nnUNetPlans", check=False)
    assert proc.returncode != 0
    assert "has 4 channels but dataset.json channel_names lists 3" in proc.stderr, proc.stderr[-2000:]
    assert not list((Path(real["nnUNet_results"]) / stale.name).rglob("checkpoint_*.pth"))


def test_one_series_dataset_warns_and_trains(real):
    raw = Path(real["nnUNet_raw"])
    one = raw / "Dataset802_OpenMSOneSeries"
    (one / "imagesTr").mkdir(parents=True)
    shutil.copytree(REAL / "labelsTr", one / "labelsTr")
    for f in (REAL / "imagesTr").glob("*_0003.nii.gz"):  # FLAIR only
        shutil.copy(f, one / "imagesTr" / f.name.replace("_0003", "_0000"))
    ds = json.loads((REAL / "dataset.json").read_text())
    ds["channel_names"] = {"0": "FLAIR"}
    (one / "dataset.json").write_text(json.dumps(ds))
    plan(real, 802, fpe=None)  # the plain command, nnU-Net's own fingerprint extractor
    # its 10^8-voxel intensity sample vs CSMFingerprintExtractor's 10^6 (the fixture's 801): same FLAIR lesion voxels
    pre = Path(real["nnUNet_preprocessed"])
    key = "foreground_intensity_properties_per_channel"
    ours = json.loads((pre / REAL.name / "dataset_fingerprint.json").read_text())[key]["3"]
    ref = json.loads((pre / one.name / "dataset_fingerprint.json").read_text())[key]["0"]
    stats = ("mean", "median", "std", "percentile_00_5", "percentile_99_5")
    assert all(abs(ours[s] - ref[s]) < 0.02 * ref["std"] for s in stats), (ours, ref)
    assert any(ours[s] != ref[s] for s in stats), "the same statistics: was the smaller sample drawn at all?"
    train(real, 802, "CSMPretrainer", "nnUNetCSMPlans", {"CSM_NUM_EPOCHS": "1", "CSM_ITERS_PER_EPOCH": "1"})
    folder = fold_dir(real, one.name, "CSMPretrainer", "nnUNetCSMPlans")
    assert "single series ['FLAIR']" in log_text(folder) and "intra-series masking" in log_text(folder)
    assert (folder / "checkpoint_final.pth").is_file()


# ------------------------------------------------------------------ segmentation fine-tuning (CSMSegTrainer)
def test_finetune_predict_evaluate_with_missing_series(synthetic, pretrained, tmp_path):
    """Fold 0 of a user-written split (nnU-Net's default 5-fold split needs >= 5 cases), so nnU-Net's final
    validation and nnUNetv2_find_best_configuration see a real cross-validation fold."""
    env = synthetic
    write_splits(env)
    train(env, 990, "CSMSegTrainer", "nnUNetCSMPlans", SEG, ("-pretrained_weights", str(pretrained)), fold="0")
    folder = fold_dir(env, "Dataset990_CSMSynth", "CSMSegTrainer", "nnUNetCSMPlans", fold="0")
    text = log_text(folder)
    assert "pretrained encoder adaptation" in text and "T1ce <- pretrained #1" in text, text[-3000:]
    assert (folder / "checkpoint_final.pth").is_file()
    assert (folder / "validation" / "summary.json").is_file(), "nnU-Net's final validation must run"
    run(["nnUNetv2_find_best_configuration", "990", "-c", "3d_fullres", "-tr", "CSMSegTrainer", "-p",
         "nnUNetCSMPlans", "-f", "0", "--disable_ensembling", "-np", "1"], env)
    instructions = Path(env["nnUNet_results"]) / "Dataset990_CSMSynth" / "inference_instructions.txt"
    assert "-tr CSMSegTrainer" in instructions.read_text()

    raw = Path(env["nnUNet_raw"]) / "Dataset990_CSMSynth"
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    case = "brain_002"
    for f in (raw / "imagesTr").glob(f"{case}_*.nii.gz"):
        shutil.copy(f, inp / f.name)
    # the same case again with T1ce (channel 1) missing: stored as an all-zero image, as documented
    import SimpleITK as sitk

    for f in (raw / "imagesTr").glob(f"{case}_*.nii.gz"):
        img = sitk.ReadImage(str(f))
        if f.name.endswith("_0001.nii.gz"):
            img = img * 0
        sitk.WriteImage(img, str(inp / f.name.replace(case, "missing_t1ce")))
    predict(env, 990, inp, out, fold="0")
    ref = sitk.ReadImage(str(raw / "labelsTr" / f"{case}.nii.gz"))
    for name in (case, "missing_t1ce"):
        pred = sitk.ReadImage(str(out / f"{name}.nii.gz"))
        assert pred.GetSize() == ref.GetSize() and pred.GetSpacing() == ref.GetSpacing()
    gt = tmp_path / "gt"
    gt.mkdir()
    shutil.copy(raw / "labelsTr" / f"{case}.nii.gz", gt / f"{case}.nii.gz")
    shutil.copy(raw / "labelsTr" / f"{case}.nii.gz", gt / "missing_t1ce.nii.gz")
    run(["nnUNetv2_evaluate_folder", str(gt), str(out), "-djfile", str(raw / "dataset.json"), "-pfile",
         str(folder.parent / "plans.json")], env)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["mean"]) == {"1", "2", "3"}


def test_finetune_on_a_different_series_set(synthetic, pretrained):
    """Pretrained on {T1, T1ce, T2, FLAIR}; fine-tuned on {T1ce, FLAIR}: matched by name, the log says so."""
    env = synthetic
    src = Path(env["nnUNet_raw"]) / "Dataset990_CSMSynth"
    dst = Path(env["nnUNet_raw"]) / "Dataset992_CSMSynthTwo"
    (dst / "imagesTr").mkdir(parents=True)
    shutil.copytree(src / "labelsTr", dst / "labelsTr")
    for f in (src / "imagesTr").glob("*.nii.gz"):
        channel = f.name[-11:-7]
        if channel in ("0001", "0003"):
            shutil.copy(f, dst / "imagesTr" / f.name.replace(f"_{channel}", "_0000" if channel == "0001" else "_0001"))
    ds = json.loads((src / "dataset.json").read_text())
    ds["channel_names"] = {"0": "T1ce", "1": "FLAIR"}
    ds.pop("missing_series", None)
    (dst / "dataset.json").write_text(json.dumps(ds))
    plan(env, 992)
    train(env, 992, "CSMSegTrainer", "nnUNetCSMPlans", SEG, ("-pretrained_weights", str(pretrained)))
    text = log_text(fold_dir(env, dst.name, "CSMSegTrainer", "nnUNetCSMPlans"))
    assert "T1ce <- pretrained #1, FLAIR <- pretrained #3" in text, text[-3000:]
    assert "pretrained series not used: T1, T2" in text


def test_export_primus_for_nnunets_own_primus_trainer(synthetic, tmp_path):
    env = synthetic
    train(env, 990, "CSMPretrainer_NoSeriesMask", "nnUNetCSMPlans", {"CSM_PRESET": "PrimusS", "CSM_NUM_EPOCHS": "1",
                                                                      "CSM_ITERS_PER_EPOCH": "1"})
    model = fold_dir(env, "Dataset990_CSMSynth", "CSMPretrainer_NoSeriesMask", "nnUNetCSMPlans").parent
    out = tmp_path / "primus_s.pth"
    proc = run(["csm_nnunet", "export-primus", str(model), "--trainer", "nnUNet_Primus_S_Trainer", "-d", "990",
                "-p", "nnUNetCSMPlans", "-o", str(out)], env)
    assert "T1ce <- T1ce" in proc.stdout and out.is_file()
    # nnU-Net's own loader, on the network nnU-Net's own Primus trainer builds for these plans
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.training.nnUNetTrainer.primus.primus_trainers import nnUNet_Primus_S_Trainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(str(Path(env["nnUNet_preprocessed"]) / "Dataset990_CSMSynth" / "nnUNetCSMPlans.json"))
    net = nnUNet_Primus_S_Trainer.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 4, 4, False)
    load_pretrained_weights(net, str(out))
    src = torch.load(model / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert torch.equal(net.state_dict()["eva.blocks.11.mlp.fc2.weight"],
                       src["network_weights"]["eva.blocks.11.mlp.fc2.weight"])


def test_real_mri_pretrain_finetune_predict_evaluate(real, tmp_path):
    """Dataset801 (real MS MRI, 4 series): pretrain, fine-tune from it, predict a case, evaluate with nnU-Net."""
    env = real
    train(env, 801, "CSMPretrainer_SamePositionMask", "nnUNetCSMPlans", {"CSM_NUM_EPOCHS": "1"})
    ckpt = fold_dir(env, REAL.name, "CSMPretrainer_SamePositionMask", "nnUNetCSMPlans") / "checkpoint_final.pth"
    train(env, 801, "CSMSegTrainer", "nnUNetCSMPlans", SEG, ("-pretrained_weights", str(ckpt)))
    folder = fold_dir(env, REAL.name, "CSMSegTrainer", "nnUNetCSMPlans")
    assert "T1POST <- pretrained #1" in log_text(folder)
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    for f in (REAL / "imagesTr").glob("ms_07_*.nii.gz"):
        shutil.copy(f, inp / f.name)
    predict(env, 801, inp, out)
    gt = tmp_path / "gt"
    gt.mkdir()
    shutil.copy(REAL / "labelsTr" / "ms_07.nii.gz", gt / "ms_07.nii.gz")
    run(["nnUNetv2_evaluate_folder", str(gt), str(out), "-djfile", str(REAL / "dataset.json"), "-pfile",
         str(folder.parent / "plans.json")], env)
    summary = json.loads((out / "summary.json").read_text())
    assert "1" in summary["mean"] and 0.0 <= summary["mean"]["1"]["Dice"] <= 1.0


def test_classifier_train_validate_and_classify(synthetic, pretrained, tmp_path):
    """CSMClassifierTrainer from CSM weights on fold 1 (both classes in validation) and from scratch on fold 0 (one
    class: AUC undefined, said so); the AUC in summary.json is sklearn's on predictions.csv; ``csm_nnunet classify``
    on raw files with the masks reproduces the validation probabilities (same nnU-Net preprocessing and crop)."""
    import csv

    from sklearn.metrics import roc_auc_score

    env = synthetic
    write_splits(env)
    ds_name = "Dataset990_CSMSynth"
    train(env, 990, "CSMClassifierTrainer", "nnUNetCSMPlans", None, ("-pretrained_weights", str(pretrained)),
          fold="1")
    folder = fold_dir(env, ds_name, "CSMClassifierTrainer", "nnUNetCSMPlans", fold="1")
    text = log_text(folder)
    assert "pretrained encoder adaptation" in text and "val AUC" in text, text[-3000:]
    assert (folder / "checkpoint_best.pth").is_file() and (folder / "validation" / "roc.png").is_file()
    summary = json.loads((folder / "validation" / "summary.json").read_text())
    rows = list(csv.DictReader((folder / "validation" / "predictions.csv").open()))
    assert [r["case"] for r in rows] == ["brain_002", "brain_003"]
    names = summary["class_names"]
    y = [names.index(r["label"]) for r in rows]
    assert sorted(y) == [0, 1] and summary["n_per_class"] == {"benign": 1, "malignant": 1}
    assert summary["auc"] == pytest.approx(roc_auc_score(y, [float(r["p_malignant"]) for r in rows]), abs=1e-9)

    train(env, 990, "CSMClassifierTrainer", "nnUNetCSMPlans", None, fold="0")
    folder0 = fold_dir(env, ds_name, "CSMClassifierTrainer", "nnUNetCSMPlans", fold="0")
    summary0 = json.loads((folder0 / "validation" / "summary.json").read_text())
    assert summary0["auc"] is None and "AUC undefined" in summary0["auc_note"]
    assert "the validation AUC is undefined" in log_text(folder0)

    raw = Path(env["nnUNet_raw"]) / ds_name
    inp = tmp_path / "in"
    inp.mkdir()
    for case in ("brain_002", "brain_003"):
        for f in (raw / "imagesTr").glob(f"{case}_*.nii.gz"):
            shutil.copy(f, inp / f.name)
    model = folder.parent
    out = tmp_path / "p.csv"
    run(["csm_nnunet", "classify", "-i", str(inp), "-o", str(out), "-m", str(model), "-f", "1", "--masks",
         str(raw / "labelsTr")], env)
    got = list(csv.DictReader(out.open()))
    assert [r["case"] for r in got] == ["brain_002", "brain_003"]
    for a, b in zip(got, rows):
        assert float(a["p_malignant"]) == pytest.approx(float(b["p_malignant"]), abs=1e-4)
    both = tmp_path / "both.csv"
    run(["csm_nnunet", "classify", "-i", str(inp), "-o", str(both), "-m", str(model), "-f", "0", "1"], env)
    for r in csv.DictReader(both.open()):
        assert float(r["p_benign"]) + float(r["p_malignant"]) == pytest.approx(1.0, abs=1e-5)

    # a missing channel file: a clear error, no CSV
    next(inp.glob("brain_003_0002.nii.gz")).unlink()
    bad = tmp_path / "bad.csv"
    proc = run(["csm_nnunet", "classify", "-i", str(inp), "-o", str(bad), "-m", str(model)], env, check=False)
    assert proc.returncode == 1 and "brain_003_0002.nii.gz" in proc.stderr and not bad.exists()


def test_classifier_refuses_bad_labels_before_writing_anything(synthetic):
    env = synthetic
    ds_file = Path(env["nnUNet_preprocessed"]) / "Dataset990_CSMSynth" / "dataset.json"
    original = ds_file.read_text()
    ds = json.loads(original)
    ds["classification_labels"]["brain_001"] = "malignant"
    try:
        ds_file.write_text(json.dumps(ds))
        proc = train(env, 990, "CSMClassifierTrainer_Balanced", "nnUNetCSMPlans", None, check=False, fold="0")
    finally:
        ds_file.write_text(original)
    assert proc.returncode != 0 and "integer class ids" in proc.stderr and "brain_001" in proc.stderr
    assert not fold_dir(env, "Dataset990_CSMSynth", "CSMClassifierTrainer_Balanced", "nnUNetCSMPlans").parent.exists()
    write_splits(env)
    proc = train(env, 990, "CSMClassifierTrainer_Balanced", "nnUNetCSMPlans", None, check=False, fold="2")
    assert proc.returncode != 0 and "a classifier needs two classes to learn from" in proc.stderr
    folder = fold_dir(env, "Dataset990_CSMSynth", "CSMClassifierTrainer_Balanced", "nnUNetCSMPlans", fold="2")
    assert not list(folder.glob("checkpoint_*.pth"))


def test_reconstruct_hidden_and_missing_series_on_the_input_grid(synthetic, pretrained, tmp_path):
    """``csm_nnunet reconstruct`` with one series hidden (file given) and one not acquired ('none'): one output per
    synthesised series, each with the input's size, spacing, origin and direction; bad input writes nothing."""
    import SimpleITK as sitk

    env = synthetic
    raw = Path(env["nnUNet_raw"]) / "Dataset990_CSMSynth" / "imagesTr"
    # a non-trivial geometry: the result must come back onto it exactly
    files = []
    for c in range(4):
        img = sitk.ReadImage(str(raw / f"brain_003_{c:04d}.nii.gz"))
        img.SetOrigin((10.0, -5.0, 2.5))
        img.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
        files.append(tmp_path / f"in_{c}.nii.gz")
        sitk.WriteImage(img, str(files[-1]))
    model = pretrained.parent.parent
    out = tmp_path / "synth.nii.gz"
    proc = run(["csm_nnunet", "reconstruct", "-m", str(model), "-i", str(files[0]), str(files[1]), str(files[2]),
                "none", "--hide", "T2", "-o", str(out)], env)
    assert "synthesising ['T2', 'FLAIR']" in proc.stdout and "correlation with the given (hidden) image" in proc.stdout
    ref = sitk.ReadImage(str(files[0]))
    for name in ("T2", "FLAIR"):
        got = sitk.ReadImage(str(tmp_path / f"synth_{name}.nii.gz"))
        assert got.GetSize() == ref.GetSize() and got.GetSpacing() == ref.GetSpacing()
        assert got.GetOrigin() == pytest.approx(ref.GetOrigin()) and got.GetDirection() == pytest.approx(
            ref.GetDirection())
        assert float(sitk.GetArrayFromImage(got).std()) > 0
    assert not list(tmp_path.glob("*.tmp*"))
    bad = tmp_path / "bad.nii.gz"
    proc = run(["csm_nnunet", "reconstruct", "-m", str(model), "-i", str(files[0]), "--hide", "T2", "-o", str(bad)],
               env, check=False)
    assert proc.returncode == 1 and "one file per series" in proc.stderr and not bad.exists()

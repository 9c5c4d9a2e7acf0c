"""Malformed inputs and what each gets (docs/reliability.md): a message naming the file/field and the fix, and no
partial output. Most checks run in-process on tiny files; the console scripts run only where the behaviour lives in
nnU-Net's entry points (which planner/fingerprint extractor/trainer runs, what it writes before failing).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from e2e_helpers import fold_dir, run, train

from csm_nnunet.validate import (
    InputError,
    check_finite_batch,
    check_raw_dataset,
    check_trainable_cases,
)

SPACING = (1.5, 1.5, 1.5)


# ------------------------------------------------------------------------------------------------------ helpers
def _write(path: Path, array: np.ndarray, spacing=SPACING, origin=(0.0, 0.0, 0.0)) -> None:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing[: img.GetDimension()])
    img.SetOrigin(origin[: img.GetDimension()])
    sitk.WriteImage(img, str(path))


def _raw_dataset(folder: Path, cases: int = 2, shape=(16, 16, 16), ending: str = ".mha",
                 channels=("T1", "T2")) -> Path:
    """A tiny, valid raw nnU-Net dataset (noise images, a cube label) to break in one way per test."""
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for i in range(cases):
        for c in range(len(channels)):
            _write(folder / "imagesTr" / f"case_{i:03d}_{c:04d}{ending}",
                   rng.normal(100, 10, shape).astype(np.float32))
        label = np.zeros(shape, np.uint8)
        label[tuple(slice(4, 12) for _ in shape)] = 1
        _write(folder / "labelsTr" / f"case_{i:03d}{ending}", label)
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {str(i): c for i, c in enumerate(channels)}, "labels": {"background": 0, "lesion": 1},
        "numTraining": cases, "file_ending": ending}))
    return folder


def _image(folder: Path, case: int, channel: int, ending: str = ".mha") -> Path:
    return folder / "imagesTr" / f"case_{case:03d}_{channel:04d}{ending}"


def _poke(path: Path, value: float) -> None:
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    arr[3, 4, 5] = value
    _write(path, arr)


def _dataset_json(folder: Path, **changes) -> None:
    ds = json.loads((folder / "dataset.json").read_text())
    ds.update(changes)
    (folder / "dataset.json").write_text(json.dumps(ds))


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# --------------------------------------------------------------------- raw training data (CSMPlanner, -fpe)
def _missing_channel(d):
    _image(d, 1, 1).unlink()


def _extra_channel(d):
    shutil.copy(_image(d, 1, 1), _image(d, 1, 2))


def _nan(d):
    _poke(_image(d, 1, 1), np.nan)


def _inf(d):
    _poke(_image(d, 0, 0), np.inf)


def _two_d(d):
    _write(_image(d, 1, 0), np.ones((16, 16), np.float32))


def _four_d(d):
    vols = [sitk.GetImageFromArray(np.ones((16, 16, 16), np.float32)) for _ in range(2)]
    sitk.WriteImage(sitk.JoinSeries(vols), str(_image(d, 1, 1)))


def _vector(d):
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((16, 16, 16, 3), np.float32), isVector=True), str(_image(d, 1, 1)))


def _shape(d):
    _write(_image(d, 1, 1), np.ones((16, 16, 12), np.float32))


def _spacing(d):
    _write(_image(d, 1, 1), np.ones((16, 16, 16), np.float32), spacing=(1.5, 1.5, 3.0))


def _origin(d):
    _write(_image(d, 1, 1), np.ones((16, 16, 16), np.float32), origin=(5.0, 0.0, 0.0))


def _label_grid(d):
    _write(d / "labelsTr" / "case_001.mha", np.zeros((16, 16, 12), np.uint8))


def _missing_label(d):
    (d / "labelsTr" / "case_001.mha").unlink()


def _empty(d):
    for f in (d / "imagesTr").iterdir():
        f.unlink()


def _bad_name(d):
    _image(d, 1, 1).rename(d / "imagesTr" / "case_001.mha")


def _not_an_image(d):
    _image(d, 1, 0).write_bytes(b"this is not an image")


def _truncated_mha(d):
    _truncate(_image(d, 1, 1))


def _unknown_missing_series(d):
    _dataset_json(d, missing_series={"case_001": ["T1ce"]})


def _all_series_missing(d):
    _dataset_json(d, missing_series={"case_001": ["T1", "T2"]})


def _no_channel_names(d):
    ds = json.loads((d / "dataset.json").read_text())
    del ds["channel_names"]
    (d / "dataset.json").write_text(json.dumps(ds))


RAW_CASES = {  # name -> (break the dataset, distinctive part of the message)
    "missing_channel_file": (_missing_channel, r"case 'case_001' has no file for channel 1 \('T2'\): "
                                               r".*case_001_0001\.mha is missing.*missing_series"),
    "extra_channel_file": (_extra_channel, r"case 'case_001' has .*case_001_0002\.mha, but dataset\.json "
                                           r"channel_names lists 2 series.*remove the file or add the series"),
    "nan_voxels": (_nan, r"case_001_0001\.mha \(series 'T2'\) has 1 NaN/Inf voxel\(s\) of 4096.*replace them"),
    "inf_voxels": (_inf, r"case_000_0000\.mha \(series 'T1'\) has 1 NaN/Inf voxel\(s\)"),
    "2d_image": (_two_d, r"case_001_0000\.mha \(series 'T1'\) is a 2D image \(size \[16, 16\]\).*3D volume"),
    "4d_image": (_four_d, r"case_001_0001\.mha \(series 'T2'\) is a 4D image \(size \[16, 16, 16, 2\]\): give one "
                          r"3D file per series"),
    "vector_image": (_vector, r"case_001_0001\.mha \(series 'T2'\) has 3 values per voxel.*one scalar 3D file"),
    "shape_mismatch": (_shape, r"case_001_0001\.mha \(series 'T2'\) is not on the voxel grid of "
                               r".*case_001_0000\.mha \(series 'T1'\): size \[12, 16, 16\] vs \[16, 16, 16\].*"
                               r"resample/register"),
    "spacing_mismatch": (_spacing, r"case_001_0001\.mha .* not on the voxel grid .*spacing \[1\.5, 1\.5, 3\] vs"),
    "origin_mismatch": (_origin, r"case_001_0001\.mha .* not on the voxel grid .*origin \[5, 0, 0\] vs \[0, 0, 0\]"),
    "label_grid_mismatch": (_label_grid, r"label file .*case_001\.mha is not on the voxel grid of its images"),
    "missing_label_file": (_missing_label, r"labelsTr/case_001\.mha is missing.*csm_nnunet prepare-unlabeled"),
    "empty_dataset": (_empty, r"no training images \(\*\.mha\) in .*imagesTr: the dataset is empty"),
    "file_without_channel_suffix": (_bad_name, r"case_001\.mha: expected <case>_XXXX\.mha"),
    "not_an_image": (_not_an_image, r"cannot read .*case_001_0000\.mha \(series 'T1'\) \(.*\): the file is damaged "
                                    r"or not an image"),
    "truncated_image": (_truncated_mha, r"cannot read the voxels of .*case_001_0001\.mha .*damaged \(truncated\?\)"),
    "missing_series_unknown_name": (_unknown_missing_series, r"missing_series\['case_001'\] names \['T1ce'\], which "
                                                             r"are not series of this dataset"),
    "missing_series_every_series": (_all_series_missing, r"missing_series\['case_001'\] lists every series"),
    "no_channel_names": (_no_channel_names, r"dataset\.json has no 'channel_names'"),
}


@pytest.mark.parametrize("name", list(RAW_CASES))
def test_raw_dataset_check_names_the_file_and_writes_nothing(name, tmp_path):
    folder = _raw_dataset(tmp_path / "Dataset960_Bad")
    assert check_raw_dataset(str(folder)) == ["case_000", "case_001"]  # the unbroken dataset passes
    breaker, message = RAW_CASES[name]
    breaker(folder)
    before = _snapshot(tmp_path)
    with pytest.raises(InputError, match=message):
        check_raw_dataset(str(folder), log=None)
    assert _snapshot(tmp_path) == before


def test_missing_series_of_an_unknown_case_warns_and_passes(tmp_path):
    folder = _raw_dataset(tmp_path / "Dataset960_Bad")
    _dataset_json(folder, missing_series={"case_999": ["T2"]})
    with pytest.warns(UserWarning, match=r"missing_series names 1 case\(s\) the dataset does not have, ignored: "
                                         r"\['case_999'\]"):
        assert check_raw_dataset(str(folder), log=None) == ["case_000", "case_001"]


def test_nan_in_nifti_depends_on_the_reader_as_in_nnunet(tmp_path):
    """SimpleITK's NIfTI reader (nnU-Net's default for .nii.gz) returns NaN/Inf voxels as 0, so nnU-Net never sees
    them and neither does the check; with nnU-Net's NibabelIO they survive, and the check (reading with the dataset's
    reader, as CSMPlanner does) refuses them. A truncated .nii.gz reads as zeros in ITK: refused by its gzip stream."""
    from nnunetv2.imageio.nibabel_reader_writer import NibabelIO
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    folder = _raw_dataset(tmp_path / "Dataset960_Bad", ending=".nii.gz")
    f = _image(folder, 1, 1, ".nii.gz")
    _poke(f, np.nan)
    assert check_raw_dataset(str(folder), reader_class=SimpleITKIO, log=None) == ["case_000", "case_001"]
    with pytest.raises(InputError, match=r"case_001_0001\.nii\.gz \(series 'T2'\) has 1 NaN/Inf voxel"):
        check_raw_dataset(str(folder), reader_class=NibabelIO, log=None)
    _truncate(f)
    with pytest.raises(InputError, match=r"case_001_0001\.nii\.gz is truncated or damaged \(Compressed file ended"):
        check_raw_dataset(str(folder), reader_class=SimpleITKIO, log=None)


def test_fingerprint_extractor_refuses_before_nnunet_reads_or_writes(nnunet_env):
    """-fpe CSMFingerprintExtractor: a missing channel file is named before nnU-Net's fingerprinting (which would read
    every case and then fail with an IndexError); no dataset_fingerprint.json, no plans."""
    folder = _raw_dataset(Path(nnunet_env["nnUNet_raw"]) / "Dataset960_CSMBadMissing")
    _missing_channel(folder)
    proc = run(["nnUNetv2_plan_and_preprocess", "-d", "960", "-c", "3d_fullres", "-np", "1", "-pl", "CSMPlanner",
                "-fpe", "CSMFingerprintExtractor"], {**nnunet_env, "nnUNet_n_proc_DA": "1"}, check=False)
    assert proc.returncode != 0
    assert "case 'case_001' has no file for channel 1 ('T2')" in proc.stderr, proc.stderr[-2000:]
    assert not list(Path(nnunet_env["nnUNet_preprocessed"]).glob(f"{folder.name}/*.json"))


def test_planner_refuses_before_writing_plans(nnunet_env):
    """CSMPlanner checks every case before planning. Inf voxels pass nnU-Net's fingerprinting (its NaN assertion does
    not look for Inf); the fingerprint is stubbed here to keep the test fast: the planner only loads it."""
    folder = _raw_dataset(Path(nnunet_env["nnUNet_raw"]) / "Dataset961_CSMBadInf")
    _inf(folder)
    pre = Path(nnunet_env["nnUNet_preprocessed"]) / folder.name
    pre.mkdir(parents=True)
    (pre / "dataset_fingerprint.json").write_text("{}")
    proc = run(["nnUNetv2_plan_experiment", "-d", "961", "-pl", "CSMPlanner"], {**nnunet_env, "nnUNet_n_proc_DA": "1"},
               check=False)
    assert proc.returncode != 0
    assert "case_000_0000.mha (series 'T1') has 1 NaN/Inf voxel(s)" in proc.stderr, proc.stderr[-2000:]
    assert sorted(p.name for p in pre.iterdir()) == ["dataset_fingerprint.json"]


# ------------------------------------------------------------------------------------------- trainers
def _copy_preprocessed(env: dict, name: str, keep: list[str] | None = None) -> Path:
    """Copy of the synthetic fixture's preprocessed dataset under ``name`` (never mutate the shared one)."""
    src = Path(env["nnUNet_preprocessed"]) / "Dataset990_CSMSynth"
    dst = Path(env["nnUNet_preprocessed"]) / name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("splits_final.json"))
    for plans_file in dst.glob("nnUNet*Plans.json"):
        plans = json.loads(plans_file.read_text())
        plans["dataset_name"] = name
        plans_file.write_text(json.dumps(plans))
    if keep is not None:
        for f in (dst / "nnUNetCSMPlans_3d_fullres").iterdir():
            if not any(f.name.startswith(k + ".") or f.name.startswith(k + "_seg.") for k in keep):
                f.unlink()
    return dst


@pytest.fixture(scope="module")
def one_case(synthetic) -> Path:
    """Dataset970: the synthetic set's preprocessed brain_000 alone, planned with a 64^3 patch (the case is 48^3)."""
    dst = _copy_preprocessed(synthetic, "Dataset970_CSMOneCase", keep=["brain_000"])
    plans_file = dst / "nnUNetCSMPlans.json"
    plans = json.loads(plans_file.read_text())
    plans["configurations"]["3d_fullres"]["patch_size"] = [64, 64, 64]
    plans_file.write_text(json.dumps(plans))
    return dst


def test_one_case_dataset_and_patch_larger_than_the_image(synthetic, one_case):
    """One case: fold 'all' pretrains (nnU-Net's loader pads the 48^3 case to the 64^3 patch); fold 0 cannot be split
    by nnU-Net's automatic 5-fold split and is refused before nnU-Net creates the fold folder."""
    env, dst = synthetic, one_case
    train(env, 970, "CSMPretrainer", "nnUNetCSMPlans", {"CSM_NUM_EPOCHS": "1", "CSM_ITERS_PER_EPOCH": "1"})
    folder = fold_dir(env, dst.name, "CSMPretrainer", "nnUNetCSMPlans")
    ckpt = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["csm_network"]["patch_size"] == [64, 64, 64]
    assert np.isfinite(ckpt["logging"]["train_losses"]).all() and np.isfinite(ckpt["logging"]["val_losses"]).all()
    proc = train(env, 970, "CSMPretrainer", "nnUNetCSMPlans", check=False, fold="0")
    assert proc.returncode != 0
    assert "fold 0: the dataset has 1 case(s), and nnU-Net's automatic 5-fold split needs at least 5" in proc.stderr
    assert "Train fold 'all'" in proc.stderr
    assert not fold_dir(env, dst.name, "CSMPretrainer", "nnUNetCSMPlans", fold="0").exists()


def test_malformed_csm_variable_is_refused_before_the_output_folder(synthetic, one_case):
    proc = train(synthetic, 970, "CSMSegTrainer", "nnUNetCSMPlans", {"CSM_PRESET": "huge"}, check=False)
    assert proc.returncode != 0
    assert "environment variable CSM_PRESET='huge' is not a preset; choose one of" in proc.stderr, proc.stderr[-2000:]
    assert not fold_dir(synthetic, one_case.name, "CSMSegTrainer", "nnUNetCSMPlans").parent.exists()


def test_nan_in_preprocessed_data_stops_finetuning_before_a_step(synthetic):
    """Data planned without CSMPlanner is not checked at planning; the trainer refuses the first batch with NaN/Inf
    (nnU-Net's own step would train on it and write NaN weights), naming the cases; no checkpoint is written."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    env = synthetic
    dst = _copy_preprocessed(env, "Dataset971_CSMNaN")
    data_folder = dst / "nnUNetCSMPlans_3d_fullres"
    ds = nnUNetDatasetBlosc2(str(data_folder))
    for key in ds.identifiers:
        data, seg, _, props = ds.load_case(key)
        data, seg = np.array(data), np.array(seg)
        data[1] = np.nan  # what nnU-Net's z-score normalisation makes of one NaN voxel in a raw series
        for suffix in (".b2nd", "_seg.b2nd"):  # blosc2 does not write over an existing array file
            (data_folder / f"{key}{suffix}").unlink()
        with warnings.catch_warnings():  # nnU-Net asks for chunk sizes; its defaults are fine for 4 tiny cases
            warnings.simplefilter("ignore")
            nnUNetDatasetBlosc2.save_case(data, seg, props, str(data_folder / key))
    proc = train(env, 971, "CSMSegTrainer", "nnUNetCSMPlans", {"CSM_NUM_EPOCHS": "1", "CSM_ITERS_PER_EPOCH": "1"},
                 check=False)
    assert proc.returncode != 0
    assert "NaN/Inf voxels in case(s) ['brain_" in proc.stderr and "nnUNetv2_plan_and_preprocess again" in proc.stderr
    assert not list(fold_dir(env, dst.name, "CSMSegTrainer", "nnUNetCSMPlans").glob("checkpoint_*.pth"))


def test_finite_batch_and_trainable_cases_checks(tmp_path):
    x = torch.zeros(3, 2, 4, 4, 4)
    check_finite_batch(x, ["a", "b", "c"])
    x[1, 0, 0, 0, 0] = float("inf")
    x[2, 1, 1, 1, 1] = float("nan")
    with pytest.raises(InputError, match=r"NaN/Inf voxels in case\(s\) \['b', 'c'\] of /pre/folder"):
        check_finite_batch(x, ["a", "b", "c"], "/pre/folder")
    with pytest.raises(InputError, match=r"no preprocessed cases in .*missing; run nnUNetv2_plan_and_preprocess"):
        check_trainable_cases(str(tmp_path / "missing"), "all", str(tmp_path / "splits_final.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no preprocessed cases"):
        check_trainable_cases(str(tmp_path / "empty"), 0, str(tmp_path / "splits_final.json"))


# ---------------------------------------------------------------- numerics: all-zero and constant series
def test_constant_series_normalise_to_zero_and_nnunets_loss_stays_finite():
    """Accepted, not refused: an all-zero series is how a missing acquisition is stored, and nnU-Net's z-score
    normalisation maps a constant series to zeros. The networks' own finite losses and gradients on such batches are
    tested in tests/test_reliability.py; here nnU-Net's part: its normalisation, and its Dice + CE on the fine-tuning
    network's output for a batch with an all-zero series and an all-zero case."""
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import ZScoreNormalization
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    from csm_nnunet.segmentation import CSMSegmentationNetwork

    norm = ZScoreNormalization(use_mask_for_norm=False, intensityproperties={})
    constant = norm.run(np.full((8, 8, 8), 7.0, np.float32), None)
    assert np.isfinite(constant).all() and not constant.any()
    patch = (32, 32, 32)
    x = torch.randn(2, 2, *patch, generator=torch.Generator().manual_seed(0))
    x[0, 1] = 0.0  # a missing (or normalised constant) series
    x[1] = 0.0  # a case with nothing but zeros in this window
    target = torch.zeros(2, 1, *patch)
    target[0, 0, 8:16, 8:16, 8:16] = 1
    torch.manual_seed(0)
    net = CSMSegmentationNetwork(2, 2, patch, "tiny", base_channels=8, deep_supervision=False)
    loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss)(net(x), target)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


# ------------------------------------------------------------------------------ checkpoints (adapt.py)
def test_pretrained_weights_that_are_not_a_pretraining_checkpoint(tmp_path):
    from csm_nnunet.adapt import load_pretrained_checkpoint
    from csm_nnunet.segmentation import CSMSegmentationNetwork

    series = ["T1", "T2"]
    net = CSMSegmentationNetwork(2, 2, (32, 32, 32), "tiny", base_channels=8)
    with pytest.raises(IsADirectoryError, match=r"is a folder; pass the checkpoint file in it, e\.g\. "
                                                r".*checkpoint_final\.pth"):
        load_pretrained_checkpoint(tmp_path, net, series, log=None)
    empty, text, image = tmp_path / "empty.pth", tmp_path / "notes.pth", tmp_path / "image.nii.gz"
    empty.write_bytes(b"")
    text.write_text("not a checkpoint")
    _write(image, np.ones((8, 8, 8), np.float32))
    for f in (empty, text, image):
        with pytest.raises(ValueError, match=rf"cannot read pretrained checkpoint '{f}' .*truncated or corrupt, or "
                                             r"not a torch checkpoint at all"):
            load_pretrained_checkpoint(f, net, series, log=None)
    seg_ckpt = tmp_path / "seg_checkpoint_final.pth"  # a fine-tuned CSMSegTrainer model where a pretraining is expected
    torch.save({"network_weights": net.state_dict(), "trainer_name": "CSMSegTrainer", "init_args": {}}, seg_ckpt)
    with pytest.raises(ValueError, match=r"is not a csm-nnunet pretraining checkpoint.*from trainer 'CSMSegTrainer'; "
                                         r"pass a checkpoint of a csm-nnunet pretraining run"):
        load_pretrained_checkpoint(seg_ckpt, net, series, log=None)


def test_series_unknown_to_the_checkpoint_start_fresh_and_are_listed():
    """Not an error: a fine-tuning series without a pretrained namesake gets a fresh embedding, and the training log
    says so (a wrongly spelled name, e.g. 't1' for 'T1', shows up there)."""
    from csm_nnunet.adapt import adapt_encoder_state
    from csm_nnunet.network import CSMMaskedAutoencoder
    from csm_nnunet.segmentation import CSMSegmentationNetwork

    mae = CSMMaskedAutoencoder(["T1", "T2"], (32, 32, 32), "tiny")
    net = CSMSegmentationNetwork(2, 2, (32, 32, 32), "tiny", base_channels=8)
    report = adapt_encoder_state(mae.state_dict(), mae.config(), net, ["t1", "DWI"])
    text = report.format()
    assert "series new (fresh embedding): t1, DWI" in text and "pretrained series not used: T1, T2" in text
    assert any("no target series ['t1', 'DWI'] matches a pretrained series ['T1', 'T2']" in n for n in report.notes)


# -------------------------------------------------------------------------- classify / reconstruct inputs
def _case_copy(env: dict, out: Path, case: str = "brain_000") -> list[Path]:
    raw = Path(env["nnUNet_raw"]) / "Dataset990_CSMSynth" / "imagesTr"
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for c in range(4):
        files.append(out / f"{case}_{c:04d}.nii.gz")
        shutil.copy(raw / files[-1].name, files[-1])
    return files


def _fake_model(env: dict, folder: Path, checkpoint: dict | bytes | None, fold: str = "0") -> Path:
    """A model folder as nnU-Net writes it (plans.json, dataset.json, fold_X/checkpoint_final.pth)."""
    pre = Path(env["nnUNet_preprocessed"]) / "Dataset990_CSMSynth"
    (folder / f"fold_{fold}").mkdir(parents=True)
    shutil.copy(pre / "nnUNetCSMPlans.json", folder / "plans.json")
    shutil.copy(pre / "dataset.json", folder / "dataset.json")
    ckpt = folder / f"fold_{fold}" / "checkpoint_final.pth"
    if isinstance(checkpoint, bytes):
        ckpt.write_bytes(checkpoint)
    elif checkpoint is not None:
        torch.save(checkpoint, ckpt)
    return folder


def _unet_weights(env: dict) -> dict:
    """State dict of the U-Net nnU-Net's own trainer builds for the synthetic plans (an nnUNetTrainer model)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pre = Path(env["nnUNet_preprocessed"]) / "Dataset990_CSMSynth"
    pm = PlansManager(str(pre / "nnUNetCSMPlans.json"))
    heads = pm.get_label_manager(json.loads((pre / "dataset.json").read_text())).num_segmentation_heads
    return nnUNetTrainer.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 4, heads,
                                                    enable_deep_supervision=False).state_dict()


def test_classify_checks_inputs_and_checkpoints_before_writing(synthetic, tmp_path, capsys):
    from csm_nnunet.cli import main as cli_main

    env = synthetic
    inp = tmp_path / "in"
    files = _case_copy(env, inp)
    out = tmp_path / "p.csv"
    full = tmp_path / "full.pth"  # a real torch file, truncated below
    torch.save({"network_weights": {"w": torch.zeros(1000)}, "trainer_name": "CSMClassifierTrainer"}, full)
    model = _fake_model(env, tmp_path / "truncated", full.read_bytes()[:200])

    def classify(model_folder: Path, output: Path = out, extra: tuple[str, ...] = ()) -> str:
        assert cli_main(["classify", "-i", str(inp), "-o", str(output), "-m", str(model_folder), *extra]) == 1
        assert not output.exists() and not list(output.parent.glob("*.tmp"))
        return capsys.readouterr().err

    err = classify(model)
    assert "cannot load the model's checkpoint(s)" in err and "fold_0/checkpoint_final.pth is not a complete torch " \
                                                             "checkpoint" in err, err
    other = _fake_model(env, tmp_path / "unet", {"trainer_name": "nnUNetTrainer", "network_weights": _unet_weights(env),
                                                 "init_args": {"configuration": "3d_fullres"}})
    err = classify(other)
    assert "was trained with nnUNetTrainer, not a CSMClassifierTrainer" in err, err
    err = classify(_fake_model(env, tmp_path / "nofold", None), extra=("-chk", "checkpoint_best.pth"))
    assert "no fold_<n>/checkpoint_best.pth in" in err, err
    err = classify(model, tmp_path / "no_such_folder" / "p.csv")
    assert "is not an existing, writable folder" in err, err
    # input cases are checked before the model is loaded: the broken checkpoint is never reached
    _write(files[2], np.ones((8, 8, 8), np.float32))
    err = classify(model)
    assert "brain_000_0002.nii.gz (series 'T2') is not on the voxel grid of" in err, err
    _case_copy(env, inp)
    _truncate(files[2])
    assert "brain_000_0002.nii.gz is truncated or damaged" in classify(model)


def test_reconstruct_checks_inputs_and_checkpoints_before_writing(synthetic, pretrained, tmp_path, capsys):
    from csm_nnunet.cli import main as cli_main

    env = synthetic
    files = _case_copy(env, tmp_path / "in")
    out = tmp_path / "synth.nii.gz"

    def reconstruct(model_folder: Path, inputs: list[Path], output: Path = out) -> str:
        args = ["reconstruct", "-m", str(model_folder), "-i", *map(str, inputs), "--hide", "T2", "-o", str(output)]
        assert cli_main(args) == 1
        assert not list(output.parent.glob("synth*"))
        return capsys.readouterr().err

    model = pretrained.parent.parent
    four_d = tmp_path / "four_d.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([sitk.ReadImage(str(files[0]))] * 2), str(four_d))
    err = reconstruct(model, [files[0], files[1], four_d, files[3]])
    assert "four_d.nii.gz (series 'T2') is a 4D image" in err, err
    moved = tmp_path / "moved.nii.gz"
    img = sitk.ReadImage(str(files[1]))
    img.SetOrigin((3.0, 0.0, 0.0))
    sitk.WriteImage(img, str(moved))
    err = reconstruct(model, [files[0], moved, files[2], files[3]])
    assert "moved.nii.gz (series 'T1ce') is not on the voxel grid of" in err and "origin [3, 0, 0]" in err, err
    err = reconstruct(model, files, tmp_path / "missing_folder" / "synth.nii.gz")
    assert "is not an existing, writable folder" in err, err
    seg_model = _fake_model(env, tmp_path / "seg", {"trainer_name": "CSMSegTrainer", "network_weights": {}},
                            fold="all")
    err = reconstruct(seg_model, files)
    assert "is not a csm-nnunet pretraining checkpoint (no 'csm_network'); trainer CSMSegTrainer" in err, err
    broken = _fake_model(env, tmp_path / "broken", pretrained.read_bytes()[:1000], fold="all")
    err = reconstruct(broken, files)
    assert "checkpoint_final.pth could not be read" in err and "the file is damaged" in err, err

"""prepare-unlabeled: body-mask labels that make an unlabeled raw dataset plannable, and its refusals."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from csm_nnunet.cli import main as cli_main
from csm_nnunet.synthetic import make_synthetic_dataset
from csm_nnunet.unlabeled import UnlabeledDatasetError, body_mask, otsu_threshold, prepare_unlabeled

LESJAK = Path("/work/shared/data/Dataset801_OpenMSLesjak2mm")


def _strip_labels(folder: Path) -> None:
    """Turn a labelled raw dataset into an unlabeled one: no labelsTr, no labels in dataset.json."""
    shutil.rmtree(folder / "labelsTr")
    ds = json.loads((folder / "dataset.json").read_text())
    for key in ("labels", "numTraining"):
        ds.pop(key, None)
    (folder / "dataset.json").write_text(json.dumps(ds))


def _snapshot(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file below ``folder`` (hidden files included)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """An unlabeled synthetic dataset with missing (all-zero) series; copied per test."""
    folder = tmp_path_factory.mktemp("tpl") / "Dataset993_Unlabeled"
    make_synthetic_dataset(str(folder), num_cases=3, kind="brain", shape=(32, 32, 32), seed=2, missing_series_prob=0.3)
    shutil.copytree(folder / "labelsTr", folder.parent / "truth")  # lesion labels, to check the body mask covers them
    _strip_labels(folder)
    return folder


@pytest.fixture
def raw(template: Path, tmp_path: Path) -> Path:
    folder = tmp_path / template.name
    shutil.copytree(template, folder)
    return folder


def test_body_masks_written(raw: Path, template: Path) -> None:
    images_before = _snapshot(raw / "imagesTr")
    written = prepare_unlabeled(str(raw))
    assert sorted(Path(p).name for p in written) == [f"brain_{i:03d}.nii.gz" for i in range(3)]
    for path in written:
        label = sitk.ReadImage(path)
        image = sitk.ReadImage(str(raw / "imagesTr" / Path(path).name.replace(".nii.gz", "_0000.nii.gz")))
        assert label.GetSize() == image.GetSize() and label.GetSpacing() == image.GetSpacing()
        assert label.GetOrigin() == image.GetOrigin() and label.GetDirection() == image.GetDirection()
        mask = sitk.GetArrayFromImage(label)
        assert mask.dtype == np.uint8 and set(np.unique(mask).tolist()) == {0, 1}
        assert 0.1 < mask.mean() < 0.6  # a head, not the whole field of view or a speck
        lesion = sitk.GetArrayFromImage(sitk.ReadImage(str(template.parent / "truth" / Path(path).name))) > 0
        assert mask[lesion].all()  # the lesion lies inside the body
    assert _snapshot(raw / "imagesTr") == images_before  # images untouched
    ds = json.loads((raw / "dataset.json").read_text())
    assert ds["labels"] == {"background": 0, "body": 1}
    assert ds["numTraining"] == 3 and ds["csm_body_mask_labels"] is True
    assert ds["channel_names"] == {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
    assert ds["missing_series"]  # other keys are kept
    assert not [p for p in os.listdir(raw) if p.startswith(".")]  # no staging folder or temp json left
    # re-running on body-mask labels is allowed and gives the same labels
    labels_before = _snapshot(raw / "labelsTr")
    prepare_unlabeled(str(raw))
    assert _snapshot(raw / "labelsTr") == labels_before


def test_nnunet_fingerprinting_accepts_body_masks(raw: Path) -> None:
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    prepare_unlabeled(str(raw))
    files = [str(raw / "imagesTr" / f"brain_000_{c:04d}.nii.gz") for c in range(4)]
    _, _, intensities, stats, _ = DatasetFingerprintExtractor.analyze_case(
        files, str(raw / "labelsTr" / "brain_000.nii.gz"), SimpleITKIO, num_samples=1000)
    assert all(len(i) == 1000 for i in intensities)
    assert all(np.isfinite(s["median"]) for s in stats)


def test_real_skull_stripped_data(tmp_path: Path) -> None:
    raw = tmp_path / LESJAK.name
    shutil.copytree(LESJAK, raw)
    _strip_labels(raw)
    prepare_unlabeled(str(raw))
    for case in ("ms_07", "ms_19", "ms_26"):
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTr" / f"{case}.nii.gz"))) > 0
        nonzero = np.any([sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "imagesTr" / f"{case}_{c:04d}.nii.gz")))
                          != 0 for c in range(4)], axis=0)
        assert (mask & nonzero).sum() / (mask | nonzero).sum() > 0.9  # the brain, i.e. the non-zero region
        lesion = sitk.GetArrayFromImage(sitk.ReadImage(str(LESJAK / "labelsTr" / f"{case}.nii.gz"))) > 0
        assert mask[lesion].mean() > 0.99


def test_threshold_option(raw: Path) -> None:
    before = _snapshot(raw)
    with pytest.raises(UnlabeledDatasetError, match=r"brain_000.*empty.*lower --threshold"):
        prepare_unlabeled(str(raw), threshold=1e9)
    assert _snapshot(raw) == before
    prepare_unlabeled(str(raw), threshold=100.0)
    assert (raw / "labelsTr" / "brain_000.nii.gz").is_file()


def _expect_refusal(raw: Path, match: str, **kwargs) -> None:
    before = _snapshot(raw)
    with pytest.raises(UnlabeledDatasetError, match=match):
        prepare_unlabeled(str(raw), **kwargs)
    assert _snapshot(raw) == before  # nothing half-written, no temp files left


def test_missing_dataset_json(raw: Path) -> None:
    (raw / "dataset.json").unlink()
    _expect_refusal(raw, r"dataset\.json is missing; write a dataset\.json with channel_names")


def test_missing_images_folder(raw: Path) -> None:
    shutil.rmtree(raw / "imagesTr")
    _expect_refusal(raw, r"imagesTr is missing; put the images there")


def test_case_missing_a_channel_file(raw: Path) -> None:
    (raw / "imagesTr" / "brain_001_0002.nii.gz").unlink()
    _expect_refusal(raw, r"case 'brain_001' is missing channel 2 \('T2'\).*brain_001_0002\.nii\.gz does not exist")


def test_channel_count_differs_from_dataset_json(raw: Path) -> None:
    ds = json.loads((raw / "dataset.json").read_text())
    ds["channel_names"]["4"] = "DWI"
    (raw / "dataset.json").write_text(json.dumps(ds))
    _expect_refusal(raw, r"channel_names lists 5 channel\(s\).*every case.*only has channel indices \[0, 1, 2, 3\]")
    del ds["channel_names"]["4"], ds["channel_names"]["3"]
    (raw / "dataset.json").write_text(json.dumps(ds))
    _expect_refusal(raw, r"channel_names lists 3 channel\(s\).*channel indices \[0, 1, 2, 3\]")


def test_existing_annotations_need_overwrite(raw: Path, template: Path) -> None:
    shutil.copytree(template.parent / "truth", raw / "labelsTr")  # real lesion annotations
    _expect_refusal(raw, r"labelsTr already holds 3 label file\(s\).*real annotations.*--overwrite")
    prepare_unlabeled(str(raw), overwrite=True)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTr" / "brain_000.nii.gz")))
    assert mask.mean() > 0.1  # a body mask now, not the lesion


def test_empty_mask(raw: Path) -> None:
    for c in range(4):  # a blank case
        path = raw / "imagesTr" / f"brain_002_{c:04d}.nii.gz"
        img = sitk.ReadImage(str(path))
        blank = sitk.GetImageFromArray(np.zeros(sitk.GetArrayFromImage(img).shape, dtype=np.float32))
        blank.CopyInformation(img)
        sitk.WriteImage(blank, str(path), True)
    _expect_refusal(raw, r"body mask of case 'brain_002' .*brain_002_0000\.nii\.gz.* is empty")


def test_cli(raw: Path, capsys) -> None:
    assert cli_main(["prepare-unlabeled", str(raw)]) == 0
    assert "wrote 3 body-mask label(s)" in capsys.readouterr().out
    shutil.rmtree(raw / "imagesTr")
    assert cli_main(["prepare-unlabeled", str(raw), "--threshold", "5"]) == 1
    assert "imagesTr is missing" in capsys.readouterr().err


def test_otsu_and_body_mask_helpers() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(10, 2, 5000), rng.normal(100, 5, 5000)])
    t = otsu_threshold(values)
    assert ((values > t) == (np.arange(10000) >= 5000)).all()  # separates the two intensity classes
    assert otsu_threshold(np.zeros(100)) is None
    vol = np.zeros((1, 20, 20, 20), dtype=np.float32)
    vol[0, 5:15, 5:15, 5:15] = 100.0
    vol[0, 9:11, 9:11, 9:11] = 0.0  # a dark hole inside the body is filled
    vol[0, 0, 0, 0] = 100.0  # an isolated bright voxel is dropped
    mask = body_mask(vol)
    assert mask.sum() == 1000 and mask[0, 0, 0] == 0

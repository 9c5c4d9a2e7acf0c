"""The synthetic phantom generator: determinism, layout, labels, cross-series class signal, missing series, CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from csm_nnunet.cli import main as cli_main
from csm_nnunet.synthetic import SyntheticDatasetError, make_synthetic_dataset


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _case(folder: Path, case: str, n_series: int) -> tuple[list[np.ndarray], np.ndarray]:
    images = [_read(folder / "imagesTr" / f"{case}_{c:04d}.nii.gz") for c in range(n_series)]
    return images, _read(folder / "labelsTr" / f"{case}.nii.gz")


@pytest.fixture(scope="module")
def brain(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("syn") / "Dataset990_Brain"
    return folder, make_synthetic_dataset(str(folder), num_cases=8, kind="brain", seed=7)


@pytest.fixture(scope="module")
def prostate(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("syn") / "Dataset991_Prostate"
    return folder, make_synthetic_dataset(str(folder), num_cases=8, kind="prostate", seed=7)


def test_same_seed_same_arrays_other_seed_differs(tmp_path: Path) -> None:
    a = make_synthetic_dataset(str(tmp_path / "a"), num_cases=2, kind="prostate", shape=(24, 32, 32), seed=5)
    b = make_synthetic_dataset(str(tmp_path / "b"), num_cases=3, kind="prostate", shape=(24, 32, 32), seed=5)
    make_synthetic_dataset(str(tmp_path / "c"), num_cases=2, kind="prostate", shape=(24, 32, 32), seed=6)
    for case in a["classification_labels"]:  # case i depends only on (seed, i), not on the number of cases
        assert a["classification_labels"][case] == b["classification_labels"][case]
        ia, la = _case(tmp_path / "a", case, 3)
        ib, lb = _case(tmp_path / "b", case, 3)
        ic, _ = _case(tmp_path / "c", case, 3)
        assert la.tobytes() == lb.tobytes()
        assert all(x.tobytes() == y.tobytes() for x, y in zip(ia, ib))
        assert not np.array_equal(ia[0], ic[0])


def test_dataset_json_and_files(brain) -> None:
    folder, ds = brain
    with open(folder / "dataset.json") as f:
        assert json.load(f) == ds
    assert ds["channel_names"] == {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
    assert ds["labels"] == {"background": 0, "edema": 1, "enhancing": 2, "necrosis": 3}
    assert ds["numTraining"] == 8 and ds["file_ending"] == ".nii.gz"
    assert ds["class_names"] == ["benign", "malignant"]
    assert sorted(ds["classification_labels"]) == [f"brain_{i:03d}" for i in range(8)]
    assert set(ds["classification_labels"].values()) == {0, 1}
    assert ds["missing_series"] == {}
    assert len(os.listdir(folder / "imagesTr")) == 8 * 4 and len(os.listdir(folder / "labelsTr")) == 8
    assert not [p for p in os.listdir(folder.parent) if p.startswith(".")]  # no temp folder left behind


def test_shape_spacing_and_dtypes(tmp_path: Path) -> None:
    shape, spacing = (20, 32, 40), (3.0, 1.0, 0.8)  # (z, y, x)
    make_synthetic_dataset(str(tmp_path / "d"), num_cases=1, kind="brain", shape=shape, spacing=spacing)
    for name in ("imagesTr/brain_000_0000.nii.gz", "imagesTr/brain_000_0003.nii.gz", "labelsTr/brain_000.nii.gz"):
        img = sitk.ReadImage(str(tmp_path / "d" / name))
        assert sitk.GetArrayFromImage(img).shape == shape
        assert img.GetSpacing() == pytest.approx(spacing[::-1])  # SimpleITK order (x, y, z)
    assert _read(tmp_path / "d" / "imagesTr" / "brain_000_0000.nii.gz").dtype == np.float32
    assert _read(tmp_path / "d" / "labelsTr" / "brain_000.nii.gz").dtype == np.uint8


def test_label_values(brain, prostate) -> None:
    for (folder, ds), allowed in ((brain, {0, 1, 2, 3}), (prostate, {0, 1, 2})):
        n = len(ds["channel_names"])
        for case, cls in ds["classification_labels"].items():
            values = set(np.unique(_case(folder, case, n)[1]).tolist())
            assert values <= allowed
            if allowed == {0, 1, 2}:
                assert values == {0, 1, 2}  # every prostate case has gland and lesion
            else:  # oedema and core always; the enhancing label exactly in malignant cases
                assert {0, 1, 3} <= values and (2 in values) == bool(cls)


def _normalised(images: list[np.ndarray], reference: np.ndarray) -> list[np.ndarray]:
    """Each series divided by its median in a reference tissue: removes the arbitrary per-case intensity scale."""
    return [im / np.median(im[reference]) for im in images]


def test_brain_class_needs_t1ce_versus_t1(brain) -> None:
    folder, ds = brain
    t1, diff = {0: [], 1: []}, {0: [], 1: []}
    for case, cls in ds["classification_labels"].items():
        images, lab = _case(folder, case, 4)
        n = _normalised(images, lab == 1)  # oedema: same contrast in both classes
        core = lab >= 2
        t1[cls].append(np.percentile(n[0][core], 90))
        diff[cls].append(np.percentile((n[1] - n[0])[core], 90))
    assert min(diff[1]) > max(diff[0]) + 0.4  # enhancement separates the classes with a wide margin
    assert min(t1[1]) < max(t1[0]) and min(t1[0]) < max(t1[1])  # T1 alone: the class ranges overlap


def test_prostate_class_needs_adc_and_dwi(prostate) -> None:
    folder, ds = prostate
    feats = {0: [], 1: []}
    for case, cls in ds["classification_labels"].items():
        images, lab = _case(folder, case, 3)
        n = _normalised(images, lab == 1)  # gland
        lesion = lab == 2
        feats[cls].append((np.median(n[1][lesion]), np.median(n[2][lesion])))  # (ADC, DWI)
    adc = {c: [f[0] for f in v] for c, v in feats.items()}
    dwi = {c: [f[1] for f in v] for c, v in feats.items()}
    ratio = {c: [d / a for a, d in v] for c, v in feats.items()}
    assert min(ratio[1]) > 2 * max(ratio[0])  # restricted diffusion = bright DWI relative to ADC: separates
    assert min(adc[0]) < max(adc[1])  # some benign lesions are as dark on ADC as malignant ones
    assert max(dwi[0]) > min(dwi[1])  # and some as bright on DWI


def test_missing_series(tmp_path: Path) -> None:
    ds = make_synthetic_dataset(str(tmp_path / "m"), num_cases=6, kind="brain", shape=(24, 24, 24), seed=1,
                                missing_series_prob=0.5)
    assert ds["missing_series"], "with p=0.5 some series must be missing"
    names = list(ds["channel_names"].values())
    for i in range(6):
        case = f"brain_{i:03d}"
        images, _ = _case(tmp_path / "m", case, 4)
        missing = ds["missing_series"].get(case, [])
        assert len(missing) < 4  # at least one series is kept
        for c, name in enumerate(names):
            assert (not images[c].any()) == (name in missing)
    # the anatomy does not depend on the missing-series draw
    full = make_synthetic_dataset(str(tmp_path / "f"), num_cases=6, kind="brain", shape=(24, 24, 24), seed=1)
    assert full["missing_series"] == {}
    case = next(iter(ds["missing_series"]))
    kept = [c for c, name in enumerate(names) if name not in ds["missing_series"][case]]
    a, la = _case(tmp_path / "m", case, 4)
    b, lb = _case(tmp_path / "f", case, 4)
    assert np.array_equal(la, lb) and all(np.array_equal(a[c], b[c]) for c in kept)


def test_refuses_non_empty_target_and_bad_arguments(tmp_path: Path) -> None:
    target = tmp_path / "exists"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(SyntheticDatasetError, match="not empty"):
        make_synthetic_dataset(str(target), num_cases=1)
    assert os.listdir(target) == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["exists"]  # no temp folder left behind
    with pytest.raises(SyntheticDatasetError, match="unknown kind"):
        make_synthetic_dataset(str(tmp_path / "x"), kind="knee")
    with pytest.raises(SyntheticDatasetError, match="missing_series_prob"):
        make_synthetic_dataset(str(tmp_path / "x"), missing_series_prob=1.0)
    # an existing empty folder is fine
    (tmp_path / "empty").mkdir()
    make_synthetic_dataset(str(tmp_path / "empty"), num_cases=1, shape=(16, 16, 16))
    assert (tmp_path / "empty" / "dataset.json").is_file()


def test_cli(tmp_path: Path, capsys) -> None:
    out = tmp_path / "Dataset992_Cli"
    argv = ["make-dataset", "--kind", "prostate", "--cases", "2", "--out", str(out), "--shape", "16", "24", "24",
            "--seed", "3", "--missing-prob", "0.3", "--lowres-series"]
    assert cli_main(argv) == 0
    with open(out / "dataset.json") as f:
        ds = json.load(f)
    assert ds["numTraining"] == 2 and ds["channel_names"] == {"0": "T2w", "1": "ADC", "2": "DWI"}
    assert ds["csm_synthetic"]["shape"] == [16, 24, 24] and ds["csm_synthetic"]["missing_series_prob"] == 0.3
    assert ds["csm_synthetic"]["lowres_series"] == {"T2w": [2, 1, 1], "ADC": [2, 2, 2], "DWI": [2, 2, 2]}
    assert cli_main(argv) == 1
    assert "not empty" in capsys.readouterr().err


def _roughness(volume: np.ndarray, axis: int) -> float:
    """Mean absolute difference between neighbouring voxels along ``axis``: lower where a series is blurred."""
    return float(np.mean(np.abs(np.diff(volume.astype(np.float64), axis=axis))))


def test_default_phantoms_are_those_of_earlier_versions(tmp_path: Path) -> None:
    """Every documented experiment regenerates its data with ``make-dataset``: the default output must not drift.
    Pinned per-series mean and sd and label counts, written by the generator before ``--lowres-series`` existed."""
    pinned = {
        "brain": ([(136.5828, 184.685), (179.1269, 246.9571), (185.9769, 254.1615), (99.2418, 124.0522)],
                  [24307, 236, 31, 2]),
        "prostate": ([(253.5669, 264.1642), (348.7578, 541.7386), (46.1088, 30.8581)], [23708, 817, 51]),
    }
    for kind, (stats, counts) in pinned.items():
        make_synthetic_dataset(str(tmp_path / kind), num_cases=1, kind=kind, shape=(24, 32, 32), seed=3)
        images, labels = _case(tmp_path / kind, f"{kind}_000", len(stats))
        for image, (mean, sd) in zip(images, stats):
            assert float(image.astype(np.float64).mean()) == pytest.approx(mean, rel=1e-5, abs=1e-3)
            assert float(image.astype(np.float64).std()) == pytest.approx(sd, rel=1e-5, abs=1e-3)
        assert np.bincount(labels.astype(int).ravel()).tolist() == counts


def test_lowres_series_are_coarser_and_the_rest_is_unchanged(tmp_path: Path) -> None:
    shape = (31, 34, 36)  # not multiples of the factors: the block mean pads, the interpolation still fills the grid
    cases = (("brain", ("T2", "FLAIR"), ()), ("prostate", ("T2w",), ("ADC", "DWI")))
    for kind, coarse_in_z, coarse_everywhere in cases:
        iso = make_synthetic_dataset(str(tmp_path / f"{kind}_iso"), num_cases=2, kind=kind, shape=shape, seed=4)
        low = make_synthetic_dataset(str(tmp_path / f"{kind}_low"), num_cases=2, kind=kind, shape=shape, seed=4,
                                     lowres_series=True)
        assert iso["csm_synthetic"]["lowres_series"] == {}
        assert sorted(low["csm_synthetic"]["lowres_series"]) == sorted(coarse_in_z + coarse_everywhere)
        names = list(iso["channel_names"].values())
        for case in iso["classification_labels"]:
            images_iso, labels_iso = _case(tmp_path / f"{kind}_iso", case, len(names))
            images_low, labels_low = _case(tmp_path / f"{kind}_low", case, len(names))
            assert labels_iso.tobytes() == labels_low.tobytes()  # same anatomy and lesion
            first_coarse = min(names.index(n) for n in coarse_in_z + coarse_everywhere)
            for c, name in enumerate(names):
                a, b = images_iso[c], images_low[c]
                assert b.shape == a.shape == shape and np.isfinite(b).all() and b.min() >= 0
                if c < first_coarse:  # drawn before any coarse series: byte-identical
                    assert a.tobytes() == b.tobytes(), name
                if name in coarse_in_z:  # thick slices: smoother across slices, relative to within them
                    assert _roughness(b, 0) / _roughness(b, 1) < 0.8 * _roughness(a, 0) / _roughness(a, 1), name
                if name in coarse_everywhere:  # coarse in every axis: smoother within slices as well
                    assert _roughness(b, 1) < 0.7 * _roughness(a, 1), name

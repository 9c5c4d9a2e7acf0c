"""Make an unlabeled raw dataset plannable by nnU-Net (``csm_nnunet prepare-unlabeled``).

Why: pretraining data usually has no annotations, but nnU-Net's fingerprinting and planning read ``labelsTr`` and
sample foreground intensities from it; missing labels stop it, and all-zero dummy labels crash it (no foreground
voxels to take intensity percentiles of). We therefore write a *body mask* as the label of every case: the voxels
brighter than a per-series threshold in any series, reduced to the largest connected component with holes filled.
That gives nnU-Net a sensible foreground for its intensity statistics and foreground oversampling, and costs nothing
to compute. dataset.json gets ``labels = {background: 0, body: 1}`` and ``"csm_body_mask_labels": true`` so that
later tools (and this command, when re-run) know these labels are not annotations.

The threshold per series is Otsu's threshold of the image histogram (computed here with numpy), which separates
air/background from tissue in raw MRI as well as in skull-stripped images; ``--threshold`` replaces it with one
absolute value for all series. Images are only read, never written.

Everything is validated before anything is written, labels are computed into a staging folder and moved into
``labelsTr`` with ``os.replace`` only when every case succeeded, and dataset.json is replaced atomically last, so a
failure leaves the dataset as it was.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile

import numpy as np

from csm_nnunet.fileio import write_json_atomically

BODY_MASK_FLAG = "csm_body_mask_labels"
BODY_LABELS = {"background": 0, "body": 1}


class UnlabeledDatasetError(ValueError):
    """A raw dataset that cannot be prepared; the message names the file and the fix."""


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float | None:
    """Otsu's threshold of ``values`` (maximises the between-class variance), or None for a constant image.

    The histogram range is clipped to the 0.1-99.9th percentile so a few extreme voxels do not squeeze all tissue
    into one bin.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = np.percentile(values, [0.1, 99.9])
    if not hi > lo:
        lo, hi = float(values.min()), float(values.max())
        if not hi > lo:
            return None
    hist, edges = np.histogram(np.clip(values, lo, hi), bins=bins, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2.0
    w0 = np.cumsum(hist).astype(np.float64)  # voxels at or below each candidate threshold
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    with np.errstate(divide="ignore", invalid="ignore"):
        mu0 = m0 / w0
        mu1 = (m0[-1] - m0) / w1
        between = w0 * w1 * (mu0 - mu1) ** 2
    between[~np.isfinite(between)] = -1.0
    return float(edges[int(np.argmax(between)) + 1])


def body_mask(images: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Body (foreground) mask of a multi-series case ``images`` (C, Z, Y, X) as a uint8 array (Z, Y, X).

    A voxel is body if it exceeds its series' threshold in *any* series (series that are constant, e.g. an all-zero
    missing series, are ignored); then the largest 26-connected component is kept and its holes are filled, so
    dark-in-every-series structures inside the body (air in the bowel, CSF in T1-only data) stay foreground.
    """
    from scipy import ndimage

    mask = np.zeros(images.shape[1:], dtype=bool)
    for channel in images:
        t = threshold if threshold is not None else otsu_threshold(channel)
        if t is not None:
            mask |= channel > t
    if not mask.any():
        return mask.astype(np.uint8)
    components, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    if n > 1:
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        mask = components == int(np.argmax(sizes))
    return ndimage.binary_fill_holes(mask).astype(np.uint8)


def _load_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UnlabeledDatasetError(f"{path} is not valid JSON ({e}); fix the file") from e


def _find_cases(images_dir: str, file_ending: str, channel_names: dict) -> dict[str, list[str]]:
    """Map case -> list of its channel files (in channel order); raise on anything inconsistent."""
    pattern = re.compile(r"(.+)_(\d{4})" + re.escape(file_ending))
    found: dict[str, set[int]] = {}
    for name in sorted(os.listdir(images_dir)):
        m = pattern.fullmatch(name)
        if m:
            found.setdefault(m.group(1), set()).add(int(m.group(2)))
    if not found:
        raise UnlabeledDatasetError(
            f"{images_dir} contains no images named <case>_<XXXX>{file_ending}; put the images there with a 4-digit "
            f"channel index, or fix file_ending in dataset.json")
    n = len(channel_names)
    expected = set(range(n))
    on_disk = set().union(*found.values())
    common = set.intersection(*found.values())
    if on_disk - expected:
        raise UnlabeledDatasetError(
            f"dataset.json channel_names lists {n} channel(s) {dict(channel_names)} but the files in {images_dir} "
            f"have channel indices {sorted(on_disk)}; make channel_names list one entry per _XXXX index")
    if expected - common and all(found[c] == common for c in found):
        raise UnlabeledDatasetError(
            f"dataset.json channel_names lists {n} channel(s) {dict(channel_names)} but every case in {images_dir} "
            f"only has channel indices {sorted(common)}; remove the extra entries from channel_names or add the files")
    for case, chans in found.items():
        for c in sorted(expected - chans):
            path = os.path.join(images_dir, f"{case}_{c:04d}{file_ending}")
            raise UnlabeledDatasetError(
                f"case {case!r} is missing channel {c} ({channel_names[str(c)]!r}): {path} does not exist; add the "
                f"file (an all-zero image if the series was not acquired) or remove the case's other files")
    return {case: [os.path.join(images_dir, f"{case}_{c:04d}{file_ending}") for c in range(n)] for case in found}


def _read_case(files: list[str]):
    """(images (C, Z, Y, X) float32, SimpleITK image of channel 0 for the geometry)."""
    import SimpleITK as sitk

    arrays, ref = [], None
    for path in files:
        try:
            img = sitk.ReadImage(path)
        except RuntimeError as e:
            raise UnlabeledDatasetError(f"cannot read {path} ({str(e).strip().splitlines()[-1]}); "
                                        f"replace it with a readable image") from e
        if img.GetNumberOfComponentsPerPixel() != 1:
            raise UnlabeledDatasetError(f"{path} has {img.GetNumberOfComponentsPerPixel()} components per voxel; "
                                        f"nnU-Net expects one series per file")
        arr = sitk.GetArrayFromImage(img).astype(np.float32, copy=False)
        if ref is None:
            ref = img
        elif arr.shape != arrays[0].shape:
            raise UnlabeledDatasetError(f"{path} has shape {arr.shape} but {files[0]} has {arrays[0].shape}; all "
                                        f"series of a case must be resampled to the same grid")
        arrays.append(arr)
    return np.stack(arrays), ref


def prepare_unlabeled(raw_folder: str, threshold: float | None = None, overwrite: bool = False) -> list[str]:
    """Write body-mask labels for every case of the raw dataset ``raw_folder``; return the label file paths.

    Refuses (``UnlabeledDatasetError``) when ``labelsTr`` already holds label files that are real annotations (i.e.
    dataset.json lacks ``"csm_body_mask_labels": true``) unless ``overwrite`` is set; body-mask labels from an
    earlier run are simply regenerated.
    """
    import SimpleITK as sitk

    raw_folder = os.path.abspath(raw_folder)
    json_path = os.path.join(raw_folder, "dataset.json")
    images_dir = os.path.join(raw_folder, "imagesTr")
    labels_dir = os.path.join(raw_folder, "labelsTr")
    if not os.path.isdir(raw_folder):
        raise UnlabeledDatasetError(f"{raw_folder} is not a folder; pass the raw dataset folder "
                                    f"(e.g. $nnUNet_raw/Dataset500_Name)")
    if not os.path.isfile(json_path):
        raise UnlabeledDatasetError(
            f"{json_path} is missing; write a dataset.json with channel_names and file_ending "
            f'(e.g. {{"channel_names": {{"0": "T1", "1": "T2"}}, "file_ending": ".nii.gz"}})')
    ds = _load_json(json_path)
    if "dataset" in ds:
        raise UnlabeledDatasetError(f"{json_path} lists files under 'dataset'; prepare-unlabeled only supports the "
                                    f"imagesTr/<case>_<XXXX> layout - remove the 'dataset' entry and use that layout")
    channel_names = ds.get("channel_names") or ds.get("modality")
    if not isinstance(channel_names, dict) or not channel_names:
        raise UnlabeledDatasetError(f'{json_path} has no channel_names; add e.g. "channel_names": {{"0": "T1"}}')
    file_ending = ds.get("file_ending")
    if not isinstance(file_ending, str) or not file_ending:
        raise UnlabeledDatasetError(f'{json_path} has no file_ending; add e.g. "file_ending": ".nii.gz"')
    if not os.path.isdir(images_dir):
        raise UnlabeledDatasetError(f"{images_dir} is missing; put the images there as <case>_<XXXX>{file_ending}")
    cases = _find_cases(images_dir, file_ending, channel_names)

    existing = [f for f in os.listdir(labels_dir) if f.endswith(file_ending)] if os.path.isdir(labels_dir) else []
    if existing and not ds.get(BODY_MASK_FLAG, False) and not overwrite:
        raise UnlabeledDatasetError(
            f"{labels_dir} already holds {len(existing)} label file(s) that dataset.json does not mark as body masks "
            f"(no \"{BODY_MASK_FLAG}\": true), so they look like real annotations; plan with them as they are, or "
            f"re-run with --overwrite to replace them by body masks")

    staging = tempfile.mkdtemp(prefix=".csm_labels_tmp-", dir=raw_folder)
    written: list[str] = []
    try:
        staged: list[tuple[str, str]] = []
        for case, files in sorted(cases.items()):
            images, ref = _read_case(files)
            mask = body_mask(images, threshold)
            if not mask.any():
                hint = ("lower --threshold" if threshold is not None
                        else "check that the images are not blank, or pass --threshold")
                raise UnlabeledDatasetError(
                    f"the body mask of case {case!r} ({files[0]}, ...) is empty: no voxel is above the threshold in "
                    f"any series; {hint}")
            label = sitk.GetImageFromArray(mask)
            label.CopyInformation(ref)
            tmp_path = os.path.join(staging, case + file_ending)
            sitk.WriteImage(label, tmp_path, True)
            staged.append((tmp_path, os.path.join(labels_dir, case + file_ending)))

        os.makedirs(labels_dir, exist_ok=True)
        for tmp_path, final in staged:
            os.replace(tmp_path, final)
            written.append(final)

        ds["labels"] = dict(BODY_LABELS)
        ds["numTraining"] = len(cases)
        ds[BODY_MASK_FLAG] = True
        write_json_atomically(json_path, ds, indent=2)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("raw_folder", metavar="RAW_FOLDER",
                        help="raw dataset folder with imagesTr/ and dataset.json, e.g. $nnUNet_raw/Dataset500_Name")
    parser.add_argument("--threshold", type=float, default=None,
                        help="absolute intensity above which a voxel is body in any series (default: Otsu's "
                             "threshold per series and case)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing labelsTr files even if they look like real annotations")


def run(args: argparse.Namespace) -> int:
    try:
        written = prepare_unlabeled(args.raw_folder, threshold=args.threshold, overwrite=args.overwrite)
    except UnlabeledDatasetError as e:
        print(f"csm_nnunet prepare-unlabeled: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(written)} body-mask label(s) to {os.path.join(os.path.abspath(args.raw_folder), 'labelsTr')}; "
          f"dataset.json now has labels {BODY_LABELS} and \"{BODY_MASK_FLAG}\": true")
    return 0
